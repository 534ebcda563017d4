"""`make gpu-rehearsal`: `make gpu-check` on a stand-in of the GPU machine (its versions of transformers, accelerate,
tokenizers, huggingface-hub; none of bitsandbytes, datasets, fastcore, execnb), offline, from the bundle alone.

Slow (a virtual environment of ~20 packages, then the dry run): deselected from `pytest`, run by `make gpu-rehearsal`,
which `.ci/run` runs after `make test`."""
import json, subprocess, sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.gpu_rehearsal]
ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def test_gpu_check_runs_offline_from_the_bundle_on_a_stand_in_of_the_gpu_machine(tmp_path):
    r = subprocess.run([sys.executable, "tools/gpu_rehearsal.py", "--keep", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=1500)
    print(r.stdout)  # each step's and phase's time: shown by `make gpu-rehearsal`
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = json.loads((tmp_path / "gpu-wheels" / "manifest.json").read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert {"bitsandbytes", "datasets", "fastcore", "execnb"} <= names and manifest["bytes"] <= 60 * MiB
    assert not names & {"torch", "transformers", "peft", "accelerate", "numpy", "safetensors", "tokenizers"}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["dry_run"] and {n: p["status"] for n, p in report["phases"].items()} == dict.fromkeys(
        ("environment", "estimates", "loftq", "training", "paths", "cuda_lessons", "sharded"), "done")
    assert report["phases"]["sharded"]["result"]["max_loss_gap"] < 1e-5  # FSDP2 on the machine's accelerate and transformers
    env = report["phases"]["environment"]["result"]
    assert env["versions"]["transformers"] == "5.17.0" and env["versions"]["accelerate"] == "1.15.0"  # the machine's
    assert sorted(env["bundle"]["installed"]) == sorted(w["file"] for w in manifest["wheels"])  # all offline, from it
    assert report["phases"]["cuda_lessons"]["result"] == {"nbs/00_core.ipynb": "passed", "nbs/04_accounting.ipynb": "passed"}
    assert len(report["phases"]["training"]["result"]["rows"]) == 5 and len(report["phases"]["paths"]["result"]["rows"]) == 6
