"""Seconds from starting the Train tab's job to its first loss point, without the page: `TrainJob.start` with the flags
the tab gives a 30-step run of the demo (8 held-out prompts), polling progress.jsonl every 50 ms. The browser test
(tests/test_app_train.py -k real_browser, run with -s) prints the same interval as seen on the page; BENCHMARKS.md has both."""
import argparse, statistics, tempfile, time
from pathlib import Path
from lora_kit.app import TrainJob, run_config
from lora_kit.core import setting_args


def first_point(folder:Path) -> dict:
    "Seconds from start to the job's `start` event (base loaded, baseline measured) and to its first `step` event."
    config = run_config(folder, steps=30, eval_examples=8)
    begun = time.monotonic()
    job, seen = TrainJob.start(folder, setting_args(config, ("output",))), {}
    while "step" not in seen:
        for event in job.events(): seen.setdefault(event["event"], time.monotonic() - begun)
        if not job.running() and "step" not in seen: raise RuntimeError(job.error())
        time.sleep(0.05)
    job.cancel()
    return seen


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    runs = [first_point(Path(tempfile.mkdtemp()) / "run") for _ in range(repeats)]
    for key in ("start", "step"):
        values = [r[key] for r in runs]
        print(f"{key:>5}: median {statistics.median(values):.1f} s, range {min(values):.1f}-{max(values):.1f} s over {repeats}")


if __name__ == "__main__": main()
