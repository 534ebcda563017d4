"The training loop under two processes (torchrun, gloo on CPU) matches one process with the same global batch."
import json, os, subprocess, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("train_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, tmp):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    run([sys.executable, str(WORKER), str(tmp_path / "single"), "--grad-accum", "2"], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(WORKER), str(tmp_path / "ddp")], tmp_path)
    single = json.loads((tmp_path / "single" / "rank0" / "result.json").read_text())
    ddp = [json.loads((tmp_path / "ddp" / f"rank{r}" / "result.json").read_text()) for r in (0, 1)]
    assert single["world_size"] == 1 and ddp[0]["world_size"] == 2
    for a, b in zip(single["losses"], ddp[0]["losses"]): assert abs(a - b) < 1e-5, (single["losses"], ddp[0]["losses"])
    assert single["losses"][-1] < single["losses"][0]
    weights = [load_file(tmp_path / d / "adapter.safetensors") for d in ("single/rank0", "ddp/rank0", "ddp/rank1")]
    for key in weights[0]:
        assert torch.equal(weights[1][key], weights[2][key]), f"ranks disagree on {key}"
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-5), f"1 vs 2 processes differ on {key}"
