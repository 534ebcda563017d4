"The app's Train tab (issue 35): AppTest drives the form, a real job, its panel and the comparison; `lora-kit app` stops the jobs it started."
import json, os, signal, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the app needs the app extra: pip install 'lora_kit[app]'")
from streamlit.testing.v1 import AppTest

import lora_kit.app as app
from lora_kit.core import count_params
from lora_kit.data import DataError
from lora_kit.finetune import DEMO_ALPHA, DEMO_RANK, DEMO_TARGETS, FinetuneConfig
from lora_kit.inject import add_lora
from lora_kit.qlora import load_base
from lora_kit.cli import build_parser, finetune_config
from conftest import free_port


@pytest.fixture
def train_page(monkeypatch, tmp_path):
    "The page with its runs in `tmp_path/runs`, and the Train tab of each run of it."
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(app.RUNS_ENV, str(tmp_path / "runs"))
    at = AppTest.from_string(app.PAGE_SCRIPT, default_timeout=180).run()
    assert not at.exception, at.exception
    return at


def tab(at):
    return next(t for t in at.tabs if t.label == "Train")


def widget(elements, label, index=0):
    return [w for w in elements if w.label == label][index]


def metrics(at) -> dict:
    return {m.label: m.value for m in tab(at).metric}


def trainable(rank, targets=DEMO_TARGETS, **kw) -> int:
    "What `add_lora` makes trainable on the shipped base: the count the estimate must give."
    return count_params(add_lora(load_base("tiny")[0], targets, r=rank, **kw), trainable_only=True)


def wait_for(at, done, timeout=300):
    "Rerun the page (what the panel's fragment does every second) until `done(at)`."
    deadline = time.monotonic() + timeout
    while not done(at):
        assert time.monotonic() < deadline, [m.value for m in tab(at).markdown]
        time.sleep(1)
        at.run()
    return at


def run_states(at) -> dict:
    "Run name -> state, from the panels' titles (`**name**: state`)."
    return dict(m.value.strip("*").split("**: ") for m in tab(at).markdown if m.value.startswith("**") and "**: " in m.value)


def start(at, steps=5, rank=None, name=None, **choices):
    "Fill the form (steps, rank, run name, other widgets by label) and press Start."
    t = tab(at)
    widget(t.number_input, "Steps").set_value(steps)
    widget(t.number_input, "Held-out prompts").set_value(4)
    for label, value in choices.items(): widget([*t.selectbox, *t.toggle], label).set_value(value)
    if rank: widget(t.select_slider, "Rank").set_value(rank)
    at.run()
    if name: widget(tab(at).text_input, "Run name").set_value(name); at.run()
    widget(tab(at).button, "Start training").click().run()
    return at


# --- the form ---------------------------------------------------------------------------------------------------

def test_the_tab_shows_the_estimate_of_the_demo_settings(train_page):
    assert [t.label for t in train_page.tabs] == ["Generate", "Efficiency", "Adapter", "Train"]
    shown = metrics(train_page)
    assert shown["Trainable parameters"] == f"{trainable(DEMO_RANK):,}"
    assert widget(tab(train_page).number_input, "Alpha").value == DEMO_ALPHA
    assert widget(tab(train_page).selectbox, "Variant").value == "LoRA+"


@pytest.mark.parametrize("variant, count", [("LoRA-FA", lambda: trainable(4, lorafa=True)), ("DoRA", lambda: trainable(4, use_dora=True))])
def test_rank_and_variant_change_the_estimate(train_page, variant, count):
    widget(tab(train_page).select_slider, "Rank").set_value(4)
    widget(tab(train_page).selectbox, "Variant").set_value(variant)
    train_page.run()
    assert metrics(train_page)["Trainable parameters"] == f"{count():,}"


def test_fp16_on_a_cpu_is_refused_before_start(train_page):
    widget(tab(train_page).selectbox, "Precision").set_value("fp16")
    train_page.run()
    assert [e.value for e in tab(train_page).error] == ["precision='fp16' needs a GPU; use 'bf16' or 'no' on a CPU."]
    assert not [b for b in tab(train_page).button if b.label == "Start training"]


@pytest.mark.parametrize("name, expected", [("a/b", "type a plain folder name"), (".hidden", "type a plain folder name")])
def test_a_bad_run_name_is_refused(train_page, name, expected):
    widget(tab(train_page).text_input, "Run name").set_value(name)
    train_page.run()
    assert expected in tab(train_page).error[0].value


def test_the_default_run_name_is_one_not_taken(tmp_path):
    for taken in ("lora-r8", "lora-r8-2"):
        (tmp_path / taken).mkdir()
        (tmp_path / taken / app.JOB_FILE).write_text("{}")
    (tmp_path / "lora-r8-3").mkdir()  # a folder without a run is free
    assert app.free_run_name(tmp_path, "lora-r8") == "lora-r8-3"
    assert app.free_run_name(tmp_path, "dora-r8") == "dora-r8"


def test_pissa_on_a_4bit_base_is_refused_naming_the_setting(train_page):
    widget(tab(train_page).selectbox, "Variant").set_value("PiSSA")
    widget(tab(train_page).toggle, "QLoRA").set_value(True)
    train_page.run()
    assert "DoRA, PiSSA and LoftQ need the base weights in 16 or 32 bits" in tab(train_page).error[0].value


def test_a_missing_base_folder_is_refused(train_page, tmp_path):
    widget(tab(train_page).text_input, "Base to train").set_value(str(tmp_path / "no-such-model"))
    train_page.run()
    assert tab(train_page).error, "a base that does not exist must be refused on the page"


@pytest.mark.parametrize("variant", app.VARIANTS)
def test_the_flags_give_the_forms_run_through_the_cli(tmp_path, variant):
    "What `lora-kit finetune`'s own parser reads from the flags is the run the form describes."
    config = app.run_config(tmp_path / "run", variant, steps=40, lr=1e-3, precision="bf16", rank=8, alpha=4.0,
                            targets=("q_proj", "k_proj"), eval_examples=7)
    flags = ["finetune", "--output", str(config.output), *app.setting_args(config, ("output",))]
    assert finetune_config(build_parser(["finetune"]).parse_args(flags)) == config
    assert app.variant_of(config) == variant


def test_an_upload_is_checked_row_by_row_and_named_as_uploaded(tmp_path):
    good = b'{"instruction": "Say hi", "input": "", "output": "hi"}\n' * 3
    saved = app.uploaded_data("mine.jsonl", good, tmp_path)
    assert saved.read_bytes() == good and saved.parent == tmp_path
    with pytest.raises(DataError, match=r"^mine\.csv line 2: .*'output'"):
        app.uploaded_data("mine.csv", b"instruction,input,output\nSay hi,,\n", tmp_path)
    with pytest.raises(DataError, match=r"^notes\.txt: the Train tab reads \.jsonl, \.json, \.csv"):
        app.uploaded_data("notes.txt", b"hello", tmp_path)
    assert not list(tmp_path.glob("*notes*"))  # refused before anything is written


def test_the_reverse_task_swaps_the_demo(tmp_path):
    from lora_kit.data import demo_path
    train, held_out = app.training_data(app.DATA_CHOICES[1], tmp_path)
    demo = [json.loads(l) for l in demo_path("eval").read_text().splitlines()]
    reverse = [json.loads(l) for l in Path(held_out).read_text().splitlines()]
    assert [(r["input"], r["output"]) for r in reverse] == [(d["output"], d["input"]) for d in demo]
    assert app.training_data(app.DATA_CHOICES[0], tmp_path) == (None, None)


# --- a run, from Start to Generate ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_started_on_the_page_ends_and_answers_in_generate(train_page, tmp_path):
    at = start(train_page, steps=6, rank=4, name="small")
    assert run_states(at) == {"small": "running"}
    assert app.TrainJob.attach(tmp_path / "runs" / "small").settings() == app.run_config(
        tmp_path / "runs" / "small", "LoRA+", steps=6, rank=4, eval_examples=4)
    wait_for(at, lambda at: run_states(at) == {"small": "done"})
    assert any(c.value.startswith("Exact match, held-out prompts: 0% → ") for c in tab(at).caption)
    assert widget(tab(at).text_input, "Run name").value == ""  # emptied by Start: the next run gets a free name
    widget(tab(at).text_input, "Run name").set_value("small").run()
    assert [e.value for e in tab(at).error] == ["A run named 'small' exists: choose another name."]
    widget(tab(at).button, "Use in Generate and Adapter").click().run()
    assert at.sidebar.text_input[1].value == str(tmp_path / "runs")
    caption = next(c.value for c in at.tabs[2].caption if "rank" in c.value)
    assert caption.startswith("LoRA, rank 4, alpha 32 on"), caption
    widget(at.tabs[0].button, "Generate").click().run()
    assert [s.value for s in at.tabs[0].subheader][:2] == ["Base model", "Base + adapter"]


@pytest.mark.slow
def test_two_runs_are_put_side_by_side(train_page, tmp_path):
    at = start(train_page, steps=4, rank=2, name="r2")
    at = start(at, steps=4, rank=8, name="r8")
    wait_for(at, lambda at: run_states(at) == {"r8": "done", "r2": "done"})
    assert "Runs side by side" in [s.value for s in tab(at).subheader]
    table = next(m.value for m in tab(at).markdown if m.value.startswith("| run |"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("r8", "LoRA+", "8"), ("r2", "LoRA+", "2")]
    assert [r[5].split("(")[1].split(" of")[0] for r in rows] == [f"{trainable(8):,}", f"{trainable(2):,}"]
    widget(tab(at).button, "Use in Generate and Adapter", index=1).click().run()  # r2's panel, the second
    picker = widget(at.sidebar.selectbox, "Adapter")
    assert (picker.options, picker.value) == (["r2", "r8", app.BASE_CHOICE], "r2")
    assert next(c.value for c in at.tabs[2].caption if "rank" in c.value).startswith("LoRA, rank 2")


@pytest.mark.slow
def test_cancel_stops_the_job_and_keeps_its_checkpoint_and_resume_goes_on(train_page, tmp_path):
    at = start(train_page, steps=60, name="long")
    job = app.TrainJob.attach(tmp_path / "runs" / "long")
    reloaded = AppTest.from_string(app.PAGE_SCRIPT, default_timeout=180).run()  # a reload: a new session finds the job
    assert run_states(reloaded) == {"long": "running"}
    deadline = time.monotonic() + 300
    while not [e for e in job.events() if e["event"] == "step" and e["step"] >= 7] and time.monotonic() < deadline: time.sleep(0.1)
    at.run()
    widget(tab(at).button, "Cancel").click().run()
    assert run_states(at) == {"long": "cancelled"} and not job.running()
    assert "Cancelled: its checkpoints stay" in tab(at).warning[0].value
    kept = sorted(p.name for p in (tmp_path / "runs" / "long" / "checkpoints").iterdir())
    assert kept and kept[-1] >= "step-000006", kept
    widget(tab(at).button, "Resume").click().run()
    assert run_states(at) == {"long": "running"}
    wait_for(at, lambda at: run_states(at) == {"long": "done"})
    steps = [e["step"] for e in job.events() if e["event"] == "step"]
    resumed_from = int(kept[-1].split("-")[1])
    assert steps[-(60 - resumed_from):] == list(range(resumed_from + 1, 61))  # the stream goes on from the checkpoint


def test_a_failed_job_shows_its_one_line(train_page, tmp_path):
    job = app.TrainJob.start(tmp_path / "runs" / "broken", ["--data", str(tmp_path / "missing.jsonl"), "--eval-examples", "2"])
    deadline = time.monotonic() + 120
    while job.running() and time.monotonic() < deadline: time.sleep(0.2)
    train_page.run()
    assert run_states(train_page) == {"broken": "failed"}
    assert [e.value for e in tab(train_page).error] == [job.error()] and "missing.jsonl" in job.error()


# --- the app stops what it started ------------------------------------------------------------------------------

SERVE_WITH_A_JOB = """
import sys
from lora_kit.app import TrainJob, serve
job = TrainJob.start(sys.argv[1], ["--max-steps", "400", "--eval-examples", "2", "--save-every", "5"])
print(job.pid, flush=True)
serve(int(sys.argv[2]))
"""


def alive(pid) -> bool:
    try: os.killpg(pid, 0)
    except ProcessLookupError: return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_app_stops_the_job_it_started(tmp_path, sig):
    "No orphan: the job runs in a session of its own (a Ctrl-C in the terminal does not reach it), so the app must stop it."
    port, output = free_port(), tmp_path / "run"
    server = subprocess.Popen([sys.executable, "-c", SERVE_WITH_A_JOB, str(output), str(port)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        job_pid = int(server.stdout.readline())
        job = app.TrainJob.attach(output)
        deadline = time.monotonic() + 300
        while not [e for e in job.events() if e["event"] == "step"]:
            assert time.monotonic() < deadline and job.running(), "the job did not start training"
            time.sleep(0.3)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=30)
        server.send_signal(sig)
        server.wait(timeout=90)
        assert not alive(job_pid), "the training job outlived the app"
        assert job.state() == "cancelled"
    finally:
        for pid in (server.pid, job_pid if "job_pid" in locals() else None):
            if pid and alive(pid): os.killpg(pid, signal.SIGKILL)


# --- a real browser ---------------------------------------------------------------------------------------------

def chart_steps(page) -> list[int]:
    "The steps of the training-loss points the run's chart draws (Vega's marks carry their data in aria-label)."
    labels = page.locator("[aria-roledescription='point']").evaluate_all("ms => ms.map(m => m.getAttribute('aria-label'))")
    return sorted({int(float(m.group(1).replace(",", ""))) for label in labels if "training" in (label or "")
                   for m in [__import__("re").search(r"step: ([\d,.]+)", label)] if m})


def choose(page, panel, label, option):
    "Pick `option` in the Streamlit selectbox `label` (its list opens in a popover outside the tab)."
    panel.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option).click()


@pytest.mark.slow
def test_real_browser_trains_and_generates(tmp_path):
    """In Chromium: an upload with a bad row refused on the page, then a 30-step run started from the Train tab, its loss chart seen growing while it runs, then its
    adapter answering in Generate; the time from Start to the first loss point is printed (BENCHMARKS.md)."""
    from test_app import CHROMIUM, assert_stops_cleanly, start_app
    if CHROMIUM is None: pytest.skip("Chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    shots = Path(os.environ.get("LORA_KIT_APP_SCREENSHOTS", tmp_path))
    port = free_port()
    server, _ = start_app(port, "--runs", str(tmp_path / "runs"))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}", timeout=60_000)
            page.get_by_role("tab", name="Train").click()
            panel = page.get_by_role("tabpanel", name="Train")
            steps = panel.get_by_role("spinbutton", name="Steps")
            steps.wait_for(timeout=180_000)
            choose(page, panel, "Training data", app.DATA_CHOICES[2])  # an upload with a bad row is refused before Start
            panel.locator("input[type=file]").set_input_files(
                files=[{"name": "bad.csv", "mimeType": "text/csv", "buffer": b"instruction,input,output\nSay hi,,\n"}])
            panel.get_by_text("bad.csv line 2: empty response").wait_for(timeout=60_000)
            assert not panel.get_by_role("button", name="Start training").count()
            choose(page, panel, "Training data", app.DATA_CHOICES[0])
            panel.locator("input[type=file]").wait_for(state="detached", timeout=60_000)  # the demo's form again
            panel.get_by_role("button", name="Start training").wait_for(timeout=60_000)
            steps.fill("30"); steps.press("Enter")
            prompts = panel.get_by_role("spinbutton", name="Held-out prompts")
            prompts.fill("8"); prompts.press("Enter")
            panel.get_by_text("Trainable parameters").wait_for(timeout=60_000)
            panel.get_by_role("button", name="Start training").click()
            started, seen = time.monotonic(), []
            while not panel.get_by_text("done: exact match").count():
                assert time.monotonic() - started < 300, f"the run did not end; chart steps seen {seen}"
                if (now := chart_steps(panel)) and (not seen or now != seen[-1]): seen.append(now)
                if len(seen) == 1 and "first_point" not in locals(): first_point = time.monotonic() - started
                page.wait_for_timeout(200)
            drawn_by = time.monotonic() + 60  # Vega draws the last points after the text that says the run is done
            while (now := chart_steps(panel))[-1:] != [30] and time.monotonic() < drawn_by: page.wait_for_timeout(200)
            if now and (not seen or now != seen[-1]): seen.append(now)
            print(f"\napp training: first loss point {first_point:.1f} s after Start; chart drawn with "
                  f"{[s[-1] for s in seen]} steps while it ran")
            assert seen[-1][-1] == 30, "the run was not the 30 steps typed in"
            assert len(seen) >= 2, f"the chart updated {len(seen)} times while the run trained"
            panel.get_by_role("button", name="Use in Generate and Adapter").wait_for(timeout=60_000)  # the process has ended
            page.screenshot(path=str(shots / "app_train.png"), full_page=True)
            panel.get_by_role("button", name="Use in Generate and Adapter").click()
            page.get_by_role("tab", name="Generate").click()
            page.get_by_role("button", name="Generate", exact=True).click()
            page.get_by_text("Generating, then timing").wait_for(state="detached", timeout=180_000)
            page.get_by_role("heading", name="Base + adapter").wait_for(timeout=60_000)
            assert page.locator("[data-testid='stCode']").nth(1).inner_text().strip()
            browser.close()
    finally:
        assert_stops_cleanly(server, port, signal.SIGINT)
