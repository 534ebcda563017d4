"`pip install .` gives a package that works outside the repository."
import os, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pip_install_then_import_outside_repo(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    code = "import lora_kit, lora_kit.cli, lora_kit.core; print(lora_kit.__version__, lora_kit.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    version, location = r.stdout.split()
    assert version == re.search(r'__version__ = "([^"]+)"', (ROOT / "lora_kit" / "__init__.py").read_text()).group(1)
    assert Path(location).is_relative_to(target)
    assert (target / "bin" / "lora-kit").exists()


TRAINING_STACK = ("datasets", "lora_kit.train", "lora_kit.finetune")  # accelerate is left out: transformers imports it itself
OPEN_AND_USE = """
import sys
from lora_kit.qlora import DEMO_ADAPTER, open_adapter
import lora_kit.export, lora_kit.app
model, tokenizer, config = open_adapter(DEMO_ADAPTER)
print(config["r"], sorted(m for m in {stack!r} if m in sys.modules))
"""


@pytest.mark.slow
def test_opening_an_adapter_for_the_app_or_the_export_loads_no_training_stack():
    "Issue 29: one function opens an adapter with its base, and export and app use it without finetune, train or datasets."
    r = subprocess.run([sys.executable, "-c", OPEN_AND_USE.format(stack=TRAINING_STACK)], capture_output=True, text=True,
                       timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["16", "[]"], r.stdout
