"The progress stream a fine-tune writes as it goes (`progress.jsonl`): what the app's Train tab will follow (issue 35)."
import shutil, subprocess, sys, time

from lora_kit.finetune import PROGRESS, finetune, progress_writer, read_progress
from lora_kit.train import CHECKPOINTS, TrainConfig
from conftest import SUBPROCESS_ENV


def test_a_running_job_shows_its_steps_before_it_ends(tmp_path):
    "Polled while `lora-kit finetune` runs, the stream grows step by step; at the end it holds every step, then `done`."
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", "finetune", "--max-steps", "30", "--eval-examples", "4",
                            "--output", str(out)], env=SUBPROCESS_ENV | {"TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    seen, deadline = set(), time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline:
        seen |= {e["step"] for e in read_progress(out / PROGRESS) if e["event"] == "step"}
        time.sleep(0.05)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stderr[-3000:]
    assert len(seen) >= 2 and min(seen) < 30  # read while it ran, not only at the end
    events = read_progress(out / PROGRESS)
    assert [e["event"] for e in events] == ["start", *["step"] * 30, "done"]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 31)) and {e["max_steps"] for e in steps} == {30}
    assert steps[-1]["eta_seconds"] == 0 and all(e["tokens_per_second"] > 0 for e in steps)


def test_a_line_still_being_written_is_left_out(tmp_path):
    path = tmp_path / PROGRESS
    write = progress_writer(path)
    write("start", max_steps=2)
    write("step", step=1, loss=1.5)
    with open(path, "a") as f: f.write('{"event": "step", "st')  # the job, mid-write
    assert read_progress(path) == [dict(event="start", max_steps=2), dict(event="step", step=1, loss=1.5)]
    assert read_progress(tmp_path / "none.jsonl") == []


def test_a_resumed_run_continues_its_stream(tmp_path):
    "The first part's steps stay; the resumed steps follow them, after a second `start`."
    out = tmp_path / "run"
    finetune(output=out, eval_examples=2, train=TrainConfig(max_steps=4, batch_size=4, save_every=2))
    (out / "metrics.json").unlink()
    shutil.rmtree(out / CHECKPOINTS / "step-000004")  # as if killed after the step-2 checkpoint
    finetune(output=out, eval_examples=2, resume=True, train=TrainConfig(max_steps=4, batch_size=4, save_every=2))
    events = [(e["event"], e.get("step")) for e in read_progress(out / PROGRESS)]
    assert events == [("start", None), *[("step", s) for s in range(1, 5)], ("done", None),
                      ("start", None), ("step", 3), ("step", 4), ("done", None)]


def test_a_failed_run_ends_its_stream_on_the_error_and_blocks_no_new_run(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "finetune", "--max-steps", "2", "--eval-examples", "2", "--output", str(out),
                        "--targets", "no_such_proj"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    events = read_progress(out / PROGRESS)
    assert [e["event"] for e in events] == ["failed"] and "no_such_proj" in events[0]["error"]
    assert events[0]["error"] in r.stderr
    finetune(output=out, eval_examples=2, train=TrainConfig(max_steps=1, batch_size=2))  # not refused for the old stream
    assert [e["event"] for e in read_progress(out / PROGRESS)] == ["start", "step", "done"]
