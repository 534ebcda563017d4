"`make gpu-check` without a GPU: the same script at tiny shapes on the CPU, said so, exit 0, a complete report."
import json, os, subprocess, sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes", reason="gpu-check measures QLoRA: pip install 'lora_kit[qlora]'")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine, run `make gpu-check` itself")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no GPU here" in r.stdout and "dry run" in r.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] and report["cuda_lessons"] == {}
    rows = {(row["setup"], row["implementation"]): row for row in report["rows"]}
    assert set(rows) == {(s, i) for s in ("NF4 QLoRA", "fp32 LoRA") for i in ("lora_kit", "peft + bitsandbytes")}
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["peak_bytes"] > 0
        assert 0.5 < row["peak_bytes"] / row["estimate_bytes"] < 2  # the closed form tracks the measured step
    paths = {(row["path"], row["dropout"]) for row in report["paths"]}
    assert paths == {(path, p) for path in ("fp32", "autocast bf16", "qlora bf16") for p in (0.05, 0.0)}
    assert all(row["saved_bytes"] < 1 for row in report["paths"])  # the lean layer keeps less than peft on every path
    table = (tmp_path / "report.md").read_text()
    assert table.count("\n| ") == 2 * 1 + 4 + 6 and "dry run" in table  # two headers, one row per measurement and path
