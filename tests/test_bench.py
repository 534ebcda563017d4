"`python -m lora_kit.bench` end to end on the tiny model: tables, JSON, and bad input."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def bench(*args):
    return subprocess.run([sys.executable, "-m", "lora_kit.bench", *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=1200)


def test_tiny_run_prints_tables_and_writes_json(tmp_path):
    out = bench("--tiny", "--repeats", "1", "--seq-len", "16", "--methods", "full,peft,efficient", "--dropouts", "0.1",
                "--json", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr
    assert "| efficient/peft p=0.1 |" in out.stdout and "merged" in out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["methods"]) == {"full", "peft p=0.1", "efficient p=0.1"}
    peft, eff, full = (result["methods"][k] for k in ("peft p=0.1", "efficient p=0.1", "full"))
    assert eff["flops"] == peft["flops"] < full["flops"]  # same matmuls; LoRA skips the weight gradients
    assert eff["trainable_params"] == peft["trainable_params"] < full["trainable_params"]
    assert {"base_wall_s", "merged_wall_s", "unmerged_wall_s", "merged/base cpu"} <= result["inference"].keys()  # no timing asserts


def test_bad_arguments_exit_2_with_the_reason():
    out = bench("--methods", "lora")
    assert out.returncode == 2 and "Unknown method(s) lora" in out.stderr
    out = bench("--dropouts", "1.5")
    assert out.returncode == 2 and "dropouts must be in [0, 1)" in out.stderr
