"`pip install .` gives a package that works outside the repository."
import re, subprocess, sys
from pathlib import Path

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
