"""Re-runs and concurrent runs into one `--output`, and a disk that refuses a write, as a user meets them.

A folder that holds a run is refused unless `--resume` or `--overwrite` says what to do; a second run while one is
writing is refused at once (a lock); a failed write leaves no partial adapter and says what happened."""
import errno, json, signal, subprocess, sys, time

import pytest

from lora_kit.cli import main
from lora_kit.core import LOCK_NAME
from lora_kit.train import CHECKPOINTS
from conftest import SUBPROCESS_ENV

QUICK = ["finetune", "--max-steps", "2", "--eval-examples", "2", "--batch-size", "2", "--save-every", "1", "--warmup-steps", "0"]


def run(capsys, *args):
    code = main([*QUICK, *map(str, args)])
    return code, capsys.readouterr().err


def steps_saved(out): return sorted(p.name for p in (out / CHECKPOINTS).iterdir())


def test_a_second_run_into_a_finished_one_is_refused_then_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(capsys, "--output", out)  # the first run
    assert code == 0, err
    first = json.loads((out / "metrics.json").read_text())
    assert steps_saved(out) == ["step-000001", "step-000002"]
    code, err = run(capsys, "--output", out)
    assert code == 2 and err.count("\n") == 1 and "continue it with --resume, replace it with --overwrite" in err
    assert json.loads((out / "metrics.json").read_text()) == first  # untouched
    code, err = run(capsys, "--output", out, "--resume", "--max-steps", "3")
    assert code == 0, err
    assert steps_saved(out) == ["step-000001", "step-000002", "step-000003"]  # continued: the old checkpoints kept
    code, err = run(capsys, "--output", out, "--overwrite", "--save-every", "2")
    assert code == 0, err
    assert steps_saved(out) == ["step-000002"]  # replaced: nothing of the earlier run is left to mix in
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_second_run_while_one_writes_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", "finetune", "--max-steps", "2000", "--eval-examples", "2",
                              "--output", str(out)], env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() is not None else "no lock"
            time.sleep(0.1)
        started = time.monotonic()
        code, err = run(capsys, "--output", out, "--overwrite")
        assert code == 2 and f"being written by another lora-kit run (process {first.pid})" in err and err.count("\n") == 1
        assert time.monotonic() - started < 30  # refused before any model or data is loaded (they take longer)
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGKILL); first.wait(timeout=60)
    assert not (out / "adapter_model.safetensors").exists()  # killed before the end: no adapter, whole or partial


def test_a_disk_full_while_saving_the_adapter_leaves_nothing_partial(tmp_path, capsys, monkeypatch):
    "A write that fails part-way (the disk fills up): one line saying so, and no adapter file, whole or partial."
    import lora_kit.inject as inject
    def disk_fills_up(tensors, filename, metadata=None):
        with open(filename, "wb") as f: f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(inject, "save_file", disk_fills_up)
    out = tmp_path / "full"
    code, err = run(capsys, "--output", out, "--save-every", "0")
    last = err.strip().split("\n")[-1]  # stderr also has the training's progress bar
    assert code == 2 and "Traceback" not in err
    assert "adapter_model.safetensors: No space left on device. Nothing half-written was left; free some space and run again." in last
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob(".*tmp"))
