"The Streamlit app: AppTest drives the page headlessly; a real Chromium loads it from `lora-kit app`."
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the app needs the app extra: pip install 'lora_kit[app]'")
from streamlit.testing.v1 import AppTest

import lora_kit.app as app
from lora_kit.finetune import DEMO_ADAPTER, load_adapted


def test_the_app_loads_the_dashboard_data_not_the_widgets():
    "A fresh interpreter imports each module; only the widgets lesson may pull in ipywidgets."
    loads_ipywidgets = {}
    for module in ("lora_kit.app", "lora_kit.widgets"):  # lora_kit.widgets: the check can see ipywidgets
        r = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('ipywidgets' in sys.modules)"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        loads_ipywidgets[module] = r.stdout.strip()
    assert loads_ipywidgets == {"lora_kit.app": "False", "lora_kit.widgets": "True"}


@pytest.fixture
def page(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    def make(adapter=str(DEMO_ADAPTER)):
        monkeypatch.setenv(app.ENV_ADAPTER, adapter)
        return AppTest.from_string(app.PAGE_SCRIPT, default_timeout=120).run()
    return make


def test_renders_with_defaults(page):
    at = page()
    assert not at.exception and not at.error
    assert "base vs LoRA adapter" in at.title[0].value
    assert [t.label for t in at.tabs] == ["Generate", "Efficiency", "Adapter"]


def test_generate_shows_base_and_adapter_outputs(page):
    metrics = json.loads((DEMO_ADAPTER / "metrics.json").read_text())
    right = next(s for s in metrics["samples"] if s["generated"] == s["expected"])  # one the adapter translates
    at = page()
    at.checkbox[0].uncheck()  # the prompt below is already in the chat template
    at.text_area[0].input(right["prompt_text"]).run()
    at.button[0].click().run()
    assert not at.exception
    base, adapter = [c.value for c in at.code][:2]
    assert adapter == right["expected"] and base != adapter


PROMPT = app.prompt_text("Translate to Indonesian:\n\nmy old teacher reads the new book.")


@pytest.fixture(scope="module")
def demo_model():
    return load_adapted(DEMO_ADAPTER)


@pytest.mark.parametrize("merged", [False, True])
def test_speeds_are_timed_on_the_same_tokens_after_a_warm_up(demo_model, merged):
    "The base replies '.' (one token): timed on its reply alone, with one-off costs, it looked 5x slower than the adapter."
    model, tokenizer = demo_model
    out = app.compare(model, tokenizer, PROMPT, max_new_tokens=32, merged=merged)
    assert out["base"] and out["adapter"] and out["base"] != out["adapter"]
    assert out["base_timed_tokens"] == out["adapter_timed_tokens"] == 32  # speeds themselves: a benchmark, not a test
    assert out["base_s_per_token"] > 0 and out["adapter_s_per_token"] > 0


def test_an_empty_reply_gets_no_speed_figure(demo_model, monkeypatch):
    model, tokenizer = demo_model
    real = app.generate
    def base_says_nothing(model, *args, **kwargs):  # inside `lora_disabled` the adapters are switched off
        adapters_on = next(iter(app.adapter_layers(model).values())).enabled
        return real(model, *args, **kwargs) if adapters_on else [""]
    monkeypatch.setattr(app, "generate", base_says_nothing)
    out = app.compare(model, tokenizer, PROMPT, max_new_tokens=8)
    assert out["base"] == "" and out["base_s_per_token"] is None and out["adapter_s_per_token"] > 0
    assert app.speed_caption(out["base_s_per_token"], out["base_timed_tokens"]) == "no speed figure: empty reply"


def test_bad_adapter_path_shows_an_error_and_keeps_running(page, tmp_path):
    at = page(str(tmp_path / "no-adapter-here"))
    assert not at.exception
    assert "No adapter_config.json" in at.error[0].value


def test_rank_slider_changes_the_numbers(page):
    at = page()
    before = at.metric[0].value
    at.select_slider[0].set_value(64).run()
    assert not at.exception and at.metric[0].value != before


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_real_browser_sees_title_and_two_outputs(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", "app", "--port", str(port)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2); break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the app did not start"
                time.sleep(0.5)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            tab = browser.new_page(viewport={"width": 1300, "height": 900})
            tab.goto(f"http://127.0.0.1:{port}", timeout=60_000)
            tab.get_by_role("button", name="Generate").click(timeout=120_000)
            outputs = tab.locator("[data-testid='stCode']")
            outputs.nth(1).wait_for(timeout=120_000)  # the base's and the adapter's generations
            assert tab.title() == "lora_kit: LoRA on LLaMA-2"
            assert tab.get_by_text("Base + adapter").count() == 1 and outputs.count() >= 2
            tab.screenshot(path=os.environ.get("LORA_KIT_APP_SCREENSHOT", str(tmp_path / "app.png")), full_page=True)
            browser.close()
    finally:  # the command runs streamlit as a child: stop both, or the server outlives the test
        os.killpg(server.pid, signal.SIGTERM); server.wait(timeout=30)
