"The app's job runner (`lora_kit.app.TrainJob`, issue 35): start, stream, re-attach, cancel keeping the checkpoint, failure."
import subprocess, sys, time

import pytest

from lora_kit.app import TrainJob
from lora_kit.train import CHECKPOINTS, checkpoints
from conftest import SUBPROCESS_ENV


def wait(condition, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline: time.sleep(0.05)
    assert condition(), "timed out"


def test_a_cancelled_job_stops_and_keeps_its_checkpoint_which_resumes(tmp_path):
    out = tmp_path / "run"
    job = TrainJob.start(out, ["--max-steps", "400", "--eval-examples", "2", "--save-every", "5"])
    wait(lambda: any(e.get("step", 0) >= 6 for e in job.events()))
    again = TrainJob.attach(out)  # a reloaded page, from the folder alone
    assert again.running() and again.state() == "running" and again.pid == job.pid
    assert again.cancel() == "cancelled" and not job.running() and job.state() == "cancelled" and job.error() is None
    steps = [e["step"] for e in job.events() if e["event"] == "step"]
    assert 6 <= steps[-1] < 400 and checkpoints(out)[0].name == "step-000005"
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "finetune", "--output", str(out), "--resume", "--max-steps", "12",
                        "--eval-examples", "2", "--save-every", "5"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]  # --max-steps 12: the schedule differs, but the checkpoint's settings resume


def test_a_job_that_finishes_is_done(tmp_path):
    job = TrainJob.start(tmp_path / "run", ["--max-steps", "3", "--eval-examples", "2"])
    wait(lambda: not job.running())
    assert job.state() == "done" and job.error() is None
    assert [e["event"] for e in job.events()] == ["start", "step", "step", "step", "done"]
    assert job.state(job.events()) == "done" and job.state(job.events()[:-1]) == "failed"  # the events given decide, not a second read


def test_a_refused_job_shows_the_jobs_one_line_error(tmp_path):
    job = TrainJob.start(tmp_path / "run", ["--rank", "0"])
    wait(lambda: not job.running())
    assert job.state() == "failed" and job.error() == "python -m lora_kit.finetune: error: argument --rank: must be an integer >= 1, got '0'"


def test_a_job_failing_inside_shows_its_error(tmp_path):
    job = TrainJob.start(tmp_path / "run", ["--max-steps", "2", "--targets", "no_such_proj"])
    wait(lambda: not job.running())
    assert job.state() == "failed" and "no_such_proj" in job.error()
    assert job.error(job.events()) == job.error() and job.error([{"event": "failed", "error": "given"}]) == "given"  # the events given decide


def test_no_job_in_a_folder_is_none(tmp_path):
    assert TrainJob.attach(tmp_path) is None
    assert not TrainJob(tmp_path, 2**22 + 7, ["lora-kit"]).running()  # no such process


@pytest.mark.parametrize("runner", [["-m", "lora_kit.finetune"], ["-m", "lora_kit.cli", "finetune"]], ids=["job", "older kit's cli"])
def test_a_jobs_settings_are_read_back_from_its_command_line(tmp_path, runner):
    "A runs folder may hold jobs an older kit started through `lora-kit finetune`: their settings read back too."
    job = TrainJob(tmp_path, 2**22 + 7, [sys.executable, *runner, "--output", str(tmp_path), "--rank", "4", "--max-steps", "30"])
    settings = job.settings()
    assert (settings.output, settings.rank, settings.train.max_steps) == (str(tmp_path), 4, 30)
