"The Streamlit app: AppTest drives the page headlessly; `lora-kit app` is stopped by signals; a real Chromium uses it."
import json, os, re, shutil, signal, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the app needs the app extra: pip install 'lora_kit[app]'")
from streamlit.testing.v1 import AppTest

import lora_kit.app as app
from lora_kit.core import ConfigError, byte_tokenizer, tiny_llama
from lora_kit.qlora import DEMO_ADAPTER, load_base, open_adapter
from lora_kit.inject import active_adapters, adapter_layers, adapter_names, adapter_state_dict, add_weighted_adapter, save_adapter
from lora_kit.tiny import generate
from conftest import free_port

METRICS = json.loads((DEMO_ADAPTER / "metrics.json").read_text())
LONG_PROMPT = "Translate to Indonesian:\n\n" + "my old teacher reads the new book. " * 143  # 5,000 characters


@pytest.mark.slow
def test_the_app_loads_the_dashboard_data_not_the_widgets():
    "A fresh interpreter imports each module; only the widgets lesson may pull in ipywidgets."
    loads_ipywidgets = {}
    for module in ("lora_kit.app", "lora_kit.widgets"):  # lora_kit.widgets: the check can see ipywidgets
        r = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('ipywidgets' in sys.modules)"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr
        loads_ipywidgets[module] = r.stdout.strip()
    assert loads_ipywidgets == {"lora_kit.app": "False", "lora_kit.widgets": "True"}


@pytest.fixture(scope="module")
def demo_model():
    return open_adapter(DEMO_ADAPTER)[:2]


@pytest.fixture
def page(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    def make(adapter=str(DEMO_ADAPTER), model=""):
        monkeypatch.setenv(app.ENV_ADAPTER, adapter)
        monkeypatch.setenv(app.ENV_MODEL, model)
        return AppTest.from_string(app.PAGE_SCRIPT, default_timeout=180).run()
    return make


def speed_table(at) -> dict:
    "`{form label: median ms/token or the no-figure text}` from the speed table the page shows."
    table = next(m.value for m in at.markdown if "ms/token (median)" in m.value)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {row[0]: row[1] for row in rows}


# --- the page, headless -----------------------------------------------------------------------------------------

def test_renders_with_defaults(page):
    at = page()
    assert not at.exception and not at.error
    assert "base vs LoRA adapter" in at.title[0].value
    assert [t.label for t in at.tabs] == ["Generate", "Efficiency", "Adapter", "Train"]


def test_generate_shows_base_and_adapter_outputs_and_three_speeds(page):
    right = next(s for s in METRICS["samples"] if s["generated"] == s["expected"])  # one the adapter translates
    at = page()
    at.checkbox[0].uncheck()  # the prompt below is already in the chat template
    at.text_area[0].input(right["prompt_text"]).run()
    at.button[0].click().run()
    assert not at.exception
    base, adapter = [c.value for c in at.tabs[0].code][:2]
    assert adapter == right["expected"] and base != adapter
    speeds = speed_table(at)
    assert list(speeds) == list(app.FORMS.values())
    assert all(float(v) > 0 for v in speeds.values())  # the base's reply is not empty here: it gets a figure too


def test_results_stay_when_a_widget_changes(page):
    "Streamlit re-runs the script on every change: the last replies come from the session, marked when out of date."
    at = page()
    at.button[0].click().run()
    replies = [c.value for c in at.tabs[0].code][:2]
    at.select_slider[0].set_value("4").run()          # the efficiency panel's rank
    assert [c.value for c in at.tabs[0].code][:2] == replies and not at.info
    at.text_area[0].input("Translate to Indonesian:\n\nthe dog eats.").run()
    assert [c.value for c in at.tabs[0].code][:2] == replies
    assert "changed since these replies" in at.info[0].value


def test_a_long_prompt_is_cut_with_a_warning(page, demo_model):
    _, tokenizer = demo_model
    at = page()
    at.text_area[0].input(LONG_PROMPT).run()
    context, max_new = 256, int(at.number_input[0].value)  # the tiny base's max_position_embeddings
    assert "too long for this model" in at.warning[0].value and f"reads {context} positions" in at.warning[0].value
    at.button[0].click().run()
    shown = at.tabs[0].code[-1].value  # "Exact prompt text"
    assert len(tokenizer(shown, add_special_tokens=False)["input_ids"]) <= context - max_new
    assert shown.startswith("<s>[INST] Translate to Indonesian:") and shown.endswith("[/INST]")


@pytest.mark.parametrize("chat", [True, False])
def test_fit_prompt_keeps_what_the_tokenizers_truncation_keeps(demo_model, chat):
    _, tokenizer = demo_model
    text, cut = app.fit_prompt(tokenizer, LONG_PROMPT, chat, context=256, max_new_tokens=48)
    ids = tokenizer(LONG_PROMPT, add_special_tokens=False)["input_ids"]
    kept = tokenizer(LONG_PROMPT, add_special_tokens=False, truncation=True, max_length=len(ids) - cut)["input_ids"]
    assert cut > 0 and text == app.prompt_text(tokenizer.decode(kept), chat)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 256 - 48


# --- speed ------------------------------------------------------------------------------------------------------

def form_now(model) -> str:
    "Which of the three forms `model` computes as, read from its adapter layers."
    layers = list(adapter_layers(model).values())
    if not any(l.enabled for l in layers): return "base"
    return "merged" if all(l.merged for l in layers) else "unmerged"


def test_each_form_is_warmed_up_then_timed_on_the_same_tokens(demo_model, monkeypatch):
    "The first page timed the base cold on its own one-token reply and the adapter warm on its whole reply: 5x apart."
    model, tokenizer = demo_model
    calls, real = [], app.timed_tokens
    def recorded(model, tokenizer, prompt, n_tokens):
        n, seconds = real(model, tokenizer, prompt, n_tokens)
        calls.append((form_now(model), n_tokens, n))
        return n, seconds
    monkeypatch.setattr(app, "timed_tokens", recorded)
    out = app.compare(model, tokenizer, app.prompt_text(app.DEFAULT_PROMPT), max_new_tokens=24, n_timed=8, repeats=3)
    forms = list(app.FORMS)
    assert [form for form, _, _ in calls] == forms + forms * 3  # a warm-up each, then rounds taking the forms in turn
    assert {(asked, made) for _, asked, made in calls} == {(8, 8)}  # every timing: the same 8 new tokens
    assert out["base"] and out["adapter"] and out["base"] != out["adapter"]
    assert all(s["tokens"] == 8 and s["repeats"] == 3 and 0 < s["min_ms"] <= s["median_ms"] <= s["max_ms"]
               for s in out["latency"].values())
    assert form_now(model) == "unmerged"  # the model is left as it was found


def test_merged_and_unmerged_give_the_same_greedy_reply(demo_model):
    model, tokenizer = demo_model
    prompt = app.prompt_text(app.DEFAULT_PROMPT)
    replies = {m: app.compare(model, tokenizer, prompt, merged=m, n_timed=2, repeats=1, max_new_tokens=24)["adapter"] for m in (False, True)}
    assert replies[True] == replies[False]


def test_an_empty_reply_gets_no_speed_figure(demo_model, monkeypatch):
    model, tokenizer = demo_model
    real = app.generate
    def base_says_nothing(model, *args, **kwargs):  # inside `lora_disabled` the adapters are switched off
        return real(model, *args, **kwargs) if form_now(model) != "base" else [""]
    monkeypatch.setattr(app, "generate", base_says_nothing)
    out = app.compare(model, tokenizer, app.prompt_text(app.DEFAULT_PROMPT), max_new_tokens=8, n_timed=4, repeats=1)
    assert out["base"] == "" and out["latency"]["base"] is None and out["latency"]["merged"]["median_ms"] > 0
    rows = {r["model"]: r for r in app.latency_rows(out["latency"])}
    assert rows["base model"]["ms/token (median)"] == "no figure: empty reply"
    assert rows["base + adapter, merged"]["vs base"] == ""  # no ratio to a missing figure


# --- errors that say what is wrong ----------------------------------------------------------------------------

def copy_of_demo(tmp_path, **config_changes) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(DEMO_ADAPTER, folder)
    config = json.loads((folder / "adapter_config.json").read_text()) | config_changes
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def other_base(tmp_path) -> Path:
    "A saved LLaMA narrower than the tiny base (hidden size 64): the demo adapter does not fit it."
    folder = tmp_path / "narrow-base"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("a file", "is a file, not an adapter folder"),
    ("not an adapter", "is not an adapter folder: it has no adapter_config.json"),
    ("wrong r", "says r=8, but the saved weights have rank 16"),
    ("other base", "trained on another base"),
    ("unknown base name", "llama-tiny"),
])
def test_bad_input_shows_what_is_wrong_and_keeps_running(page, tmp_path, case, expected):
    adapter, model = str(DEMO_ADAPTER), ""
    if case == "missing": adapter = str(tmp_path / "no-adapter-here")
    if case == "a file": (tmp_path / "notes.txt").write_text("hello"); adapter = str(tmp_path / "notes.txt")
    if case == "not an adapter": adapter = str(tmp_path)
    if case == "wrong r": adapter = str(copy_of_demo(tmp_path, r=8))
    if case == "other base": model = str(other_base(tmp_path))
    if case == "unknown base name": model = "llama-tiny"  # a typo of `tiny`
    at = page(adapter, model)
    assert not at.exception and len(at.error) == 1
    message = at.error[0].value
    assert expected in message and not message.startswith("Cannot use this adapter")
    if case == "other base":  # the numbers: the adapter's tensor against this base's layer
        assert "(16, 256)" in message and "maps 64 inputs to 64 outputs" in message
    if case == "unknown base name":  # offline: at once, no Hub retries; online: not on the Hub
        assert "cannot be reached" in message or "no model on the Hugging Face Hub" in message


def test_an_unknown_base_name_is_refused_without_loading(monkeypatch):
    "The check asks the Hub once (no retry loop): the loader, which retries offline, is never reached."
    import lora_kit.qlora
    monkeypatch.setattr(lora_kit.qlora, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))  # open_adapters' loader
    with pytest.raises(ConfigError, match="llama-tiny"):
        app.open_folder(DEMO_ADAPTER, "llama-tiny")


def test_shipped_metrics_carry_no_machine_paths():
    def strings(value):
        if isinstance(value, dict): return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list): return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []
    found = strings(METRICS) + strings(json.loads((DEMO_ADAPTER / "adapter_config.json").read_text()))
    assert not [s for s in found if os.path.isabs(s) or s.startswith("~") or "\\" in s]
    assert METRICS["base_model"] == "tiny"


# --- the efficiency panel --------------------------------------------------------------------------------------

def metric(at, label):
    return next(m for m in at.metric if m.label == label)


def test_efficiency_numbers_for_the_running_base(page, demo_model):
    model, _ = demo_model
    at = page()
    adapters = sum(t.numel() for t in adapter_state_dict(model).values())
    total = sum(p.numel() for p in model.parameters())
    assert metric(at, "Trainable parameters").value == f"{adapters:,}"  # counted on the loaded model
    assert metric(at, "Trainable share").value == f"{100 * adapters / total:.3g}%"
    assert metric(at, "Trainable share").delta == ""  # a share is not a trend: no arrow
    assert any(c.value.startswith("Measured, not estimated") for c in at.caption)


def test_lorafa_toggle_gives_the_estimate_of_lorafa(page):
    "The Efficiency tab's LoRA-FA switch lowers the headline memory of a LoRA step."
    at = page()
    toggle = next(t for t in at.toggle if t.label.startswith("LoRA-FA"))
    amount = lambda: float(metric(at, "Memory per step (lora, estimate)").value.split()[0].replace(",", ""))
    before = amount()
    toggle.set_value(True).run()
    assert not at.exception and amount() < before  # only B trains, and no adapter keeps its input


def test_rank_options_stop_at_the_smallest_targeted_dimension(page, demo_model):
    model, _ = demo_model
    at = page()
    smallest = min(min(l.in_features, l.out_features) for l in adapter_layers(model).values())  # v_proj: 128 outputs
    assert at.select_slider[0].options[-1] == str(smallest)
    at.selectbox[0].select("llama-2-7b").run()
    assert at.select_slider[0].options[-1] == "4096"


def test_rank_changes_the_numbers(page):
    at = page()
    at.selectbox[0].select("llama-2-7b").run()
    at.select_slider[0].set_value("16").run()
    assert metric(at, "Trainable parameters").value == f"{32 * 16 * 2 * (4096 + 4096):,}"  # o_proj, v_proj: r(in+out) × 32 blocks
    at.select_slider[0].set_value("64").run()
    assert not at.exception and metric(at, "Trainable parameters").value == f"{32 * 64 * 2 * (4096 + 4096):,}"
    assert not any(c.value.startswith("Measured") for c in at.caption)  # a measurement of the tiny run, not of 7B


def test_chart_has_one_bar_per_method_with_its_total(page):
    at = page()
    at.selectbox[0].select("llama-2-7b").run()
    spec = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    bars, totals = spec["layer"][0]["data"]["values"], spec["layer"][1]["data"]["values"]
    assert sorted({b["method"] for b in bars}) == ["full", "lora", "qlora"]
    assert spec["layer"][0]["encoding"]["y"]["field"] == "method" and "GiB" in spec["layer"][0]["encoding"]["x"]["title"]
    for t in totals:
        assert abs(sum(b["amount"] for b in bars if b["method"] == t["method"]) - t["amount"]) < 1e-9
        assert t["label"].endswith(" GiB")


def test_the_adapter_tab_leads_with_the_headline(page):
    at = page()
    tab = at.tabs[2]
    kinds = [type(c).__name__ for c in tab.children.values()]
    assert kinds == ["Block", "Caption", "Image", "Expander"]  # metrics in columns, the variant, the loss plot, the raw settings
    samples = METRICS["samples"]
    after = sum(s["generated"] == s["expected"] for s in samples) / len(samples)
    assert tab.metric[0].label == "Exact match, held-out prompts"
    assert tab.metric[0].value == f"{100 * METRICS['eval_accuracy_before']:g}% → {100 * after:g}%"  # 199 of 200: 99.5%, not a rounded 100%


# --- several adapters on one base ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory) -> Path:
    "peft's layout, written by `save_adapter`: the demo adapter in the folder ('default'), and in `weak/` the demo adapter at 0.3 of its strength."
    folder = tmp_path_factory.mktemp("two_adapters")
    model, _, _ = open_adapter(DEMO_ADAPTER)
    add_weighted_adapter(model, ["default"], [0.3], "weak")
    return save_adapter(model, folder, base_model_name_or_path="tiny")


@pytest.fixture(scope="module")
def alone(two_adapters) -> dict:
    "The greedy reply to the page's default prompt of the tiny base with each adapter loaded on its own, and with none: the reference."
    prompt, max_new = app.prompt_text(app.DEFAULT_PROMPT), 48  # the page's defaults: chat template, 48 new tokens
    models = {"default": open_adapter(two_adapters)[:2], "weak": open_adapter(two_adapters / "weak")[:2], app.BASE_CHOICE: load_base("tiny")}
    replies = {name: generate(model, tokenizer, [prompt], max_new)[0] for name, (model, tokenizer) in models.items()}
    assert len(set(replies.values())) == 3, replies  # three different replies: the checks below can tell them apart
    return replies


def test_a_folder_of_adapters_gets_a_picker_of_each_and_the_base(page, two_adapters):
    at = page(str(two_adapters))
    assert not at.exception and not at.error
    assert at.sidebar.selectbox(key="adapter").options == ["default", "weak", app.BASE_CHOICE]


@pytest.mark.slow
def test_picking_an_adapter_answers_as_that_adapter_alone(page, two_adapters, alone, tmp_path, monkeypatch):
    "Each pick gives the reply of that adapter loaded on its own; merging merges the picked one only; the base loads once."
    folder = shutil.copytree(two_adapters, tmp_path / "adapters")  # a folder the page has not cached yet
    import lora_kit.qlora
    loads, real_load = [], lora_kit.qlora.load_base
    monkeypatch.setattr(lora_kit.qlora, "load_base", lambda *a, **k: loads.append(a) or real_load(*a, **k))  # counted
    at = page(str(folder))
    for choice, merged in (("weak", False), ("default", False), ("weak", True), (app.BASE_CHOICE, False)):
        at.sidebar.selectbox(key="adapter").select(choice).run()
        if choice != app.BASE_CHOICE: at.checkbox[1].set_value(merged).run()  # the base alone: nothing to merge
        at.button[0].click().run()
        assert not at.exception and not at.error
        titles, replies = [s.value for s in at.tabs[0].subheader], [c.value for c in at.tabs[0].code]
        if choice == app.BASE_CHOICE:  # the base alone: one reply, one speed
            assert at.checkbox[1].disabled and titles == ["Base model", "Speed"] and list(speed_table(at)) == ["base model"]
            assert replies[0] == alone[choice]
        else:
            assert titles[:2] == ["Base model", f"Base + adapter {choice}" + (" (merged)" if merged else "")]
            assert replies[:2] == [alone[app.BASE_CHOICE], alone[choice]]
    assert len(loads) == 1  # one base for both adapters, and switching loaded nothing


def test_merging_merges_the_picked_adapter_only(two_adapters):
    model, _ = app.open_folder(two_adapters)
    with app.as_form(model, "merged", "weak"):
        assert {tuple(layer.merged_adapters) for layer in adapter_layers(model).values()} == {("weak",)}
        assert active_adapters(model) == ["weak"]
    assert app.merged_adapters(model) == [] and active_adapters(model) == ["default"]  # left as it was found


def test_all_side_by_side_gives_each_adapters_reply_in_one_batch(page, two_adapters, alone):
    at = page(str(two_adapters))
    at.toggle(key="side_by_side").set_value(True).run()
    assert at.checkbox[1].disabled  # the rows of one batch cannot share merged weights
    at.button[0].click().run()
    assert not at.exception
    assert [s.value for s in at.tabs[0].subheader] == ["Base model", "default", "weak"]
    assert [c.value for c in at.tabs[0].code][:3] == [alone[app.BASE_CHOICE], alone["default"], alone["weak"]]


def test_adapters_of_different_bases_are_refused_naming_both(page, two_adapters, tmp_path):
    folder = shutil.copytree(two_adapters, tmp_path / "mixed")
    config = folder / "weak" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    at = page(str(folder))
    assert not at.exception and len(at.error) == 1
    message = at.error[0].value
    assert all(part in message for part in ("'default'", "'weak'", "'tiny'", "'meta-llama/Llama-2-7b-hf'",
                                            "open each adapter's folder on its own"))


def test_adapters_in_subfolders_only_are_named_after_them(page, tmp_path):
    "A folder that holds no adapter itself, only subfolders that do (`lora-kit finetune` run twice): no 'default'."
    for name in ("en-id", "id-en"): shutil.copytree(DEMO_ADAPTER, tmp_path / name)
    assert adapter_names(app.open_folder(tmp_path)[0]) == ["en-id", "id-en"]
    assert page(str(tmp_path)).sidebar.selectbox(key="adapter").options == ["en-id", "id-en", app.BASE_CHOICE]


def test_a_single_adapter_folder_has_no_picker(page):
    at = page()
    assert not at.exception and not at.sidebar.selectbox
    shown = [t.label for tab in at.tabs[:3] for t in tab.toggle]
    assert shown == ["Sample (else greedy)", "Gradient checkpointing", "LoRA-FA: A frozen, no layer inputs kept (lora, qlora)"]  # no "side by side"
    at.button[0].click().run()
    assert [s.value for s in at.tabs[0].subheader] == ["Base model", "Base + adapter", "Speed"]


# --- the server: signals and a real browser ---------------------------------------------------------------------

def start_app(port, *args):
    "`lora-kit app --port PORT *args` in its own process group, and the seconds from its start until the server answers."
    start = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", "app", "--port", str(port), *args],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
            return server, start
        except OSError:
            if server.poll() is not None or time.monotonic() - start > 180:
                server.kill()
                pytest.fail("the app did not start")
            time.sleep(0.3)


def assert_stops_cleanly(server, port, sig):
    "After `sig` to the command alone: it exits, the port is free, and nothing is left in its process group."
    server.send_signal(sig)
    try: server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        pytest.fail(f"lora-kit app did not stop on {sig.name}")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
    left = True
    try: os.killpg(server.pid, 0)
    except ProcessLookupError: left = False
    if left: os.killpg(server.pid, signal.SIGKILL)
    assert not left, f"a process of lora-kit app outlived {sig.name}"


@pytest.mark.slow
def test_sigterm_leaves_no_server_behind():
    "The first `lora-kit app` ran Streamlit as a child, which a SIGTERM to the command left serving on its port."
    port = free_port()
    server, _ = start_app(port)
    assert_stops_cleanly(server, port, signal.SIGTERM)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MERGED_VS_BASE, ATTEMPTS = 0.25, 3  # |merged / base - 1| allowed for the median ms/token, Generate clicks: see the docstring


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.slow
def test_real_browser(tmp_path):
    """A new user's path in Chromium: time to usable, speeds, a long prompt, the chart; Ctrl-C then stops the server.

    Speeds: merged and base run the same matrix products, so their medians differ by noise only (a few % on a
    quiet machine, see BENCHMARKS.md). The page times each form 5 times on 32 tokens, taking the three in turn so
    that load from other processes hits all of them, and shows the medians. The bound is 25 %, and the page gets up
    to 3 Generate clicks to meet it: on a shared 2-core machine at a load of 5, one measurement in three was off by
    50 % (BENCHMARKS.md), but such load does not repeat itself click after click, while a real fault does: the
    first page's figures (a cold first run, time divided by the tokens of a one-token reply) were 3-10x apart."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    shots = Path(os.environ.get("LORA_KIT_APP_SCREENSHOTS", tmp_path))
    port = free_port()
    server, started = start_app(port)
    try:
        answered = time.monotonic() - started
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            tab = browser.new_page(viewport={"width": 1300, "height": 1100})
            opened = time.monotonic()
            tab.goto(f"http://127.0.0.1:{port}", timeout=60_000)
            tab.get_by_role("tab", name="Efficiency").wait_for(timeout=120_000)
            layout = time.monotonic() - opened
            generate = tab.get_by_role("button", name="Generate", exact=True)
            generate.wait_for(timeout=180_000)  # shown once the model is loaded
            usable = time.monotonic() - started
            print(f"\napp timing: server answers {answered:.1f} s after `lora-kit app`; in the browser, layout "
                  f"{layout:.1f} s after opening; usable (Generate shown) {usable:.1f} s after `lora-kit app`")
            assert tab.title() == "lora_kit: LoRA on LLaMA-2"

            attempts = []
            for _ in range(ATTEMPTS):
                generate.click()
                spinner = tab.get_by_text("Generating, then timing")  # shown while this click's work runs
                spinner.wait_for(timeout=30_000)
                spinner.wait_for(state="detached", timeout=180_000)
                table = tab.locator("table").filter(has_text="ms/token (median)")
                for label in app.FORMS.values(): table.get_by_role("cell", name=label, exact=True).wait_for(timeout=30_000)
                rows = [[cell.strip() for cell in row.split("\t")] for row in table.inner_text().splitlines()[1:]]
                medians = {row[0]: row[1] for row in rows if len(row) > 1}
                assert set(app.FORMS.values()) <= set(medians), table.inner_text()
                attempts.append({form: float(medians[label]) for form, label in app.FORMS.items()})
                print(f"app timing: ms/token (median of 5) {attempts[-1]}")
                if abs(attempts[-1]["merged"] / attempts[-1]["base"] - 1) <= MERGED_VS_BASE: break
            else: pytest.fail(f"merged vs base off by more than {MERGED_VS_BASE:.0%} in {ATTEMPTS} attempts: {attempts}")
            outputs = tab.locator("[data-testid='stCode']")
            outputs.nth(1).wait_for(timeout=30_000)  # the base's and the adapter's replies
            assert outputs.nth(1).inner_text().strip()
            tab.screenshot(path=str(shots / "app_generate.png"), full_page=True)

            prompt = tab.get_by_role("textbox", name="Prompt", exact=True)
            prompt.fill(LONG_PROMPT)
            prompt.press("Control+Enter")  # Streamlit takes a text area's value on Ctrl+Enter or on leaving it
            tab.get_by_text("too long for this model").wait_for(timeout=60_000)

            tab.get_by_role("tab", name="Efficiency").click()
            tab.get_by_role("combobox", name="Numbers for").wait_for(timeout=30_000)
            marks = tab.locator("[aria-roledescription='bar']")
            marks.first.wait_for(timeout=60_000)
            labels = [marks.nth(i).get_attribute("aria-label") for i in range(marks.count())]
            methods = {re.search(r"method: (\w+)", label).group(1) for label in labels}
            assert methods == {"full", "lora", "qlora"}  # one bar per method ...
            assert len(labels) == 3 * 5                  # ... in five stacked parts
            tab.get_by_role("combobox", name="Numbers for").click()
            tab.get_by_role("option", name="llama-2-7b").click()
            tab.locator("[aria-roledescription='bar'][aria-label*='GiB']").first.wait_for(timeout=60_000)
            tab.screenshot(path=str(shots / "app_efficiency.png"), full_page=True)
            browser.close()
    finally:
        assert_stops_cleanly(server, port, signal.SIGINT)


def test_the_adapter_tab_names_the_variant(tmp_path):
    "DoRA and rsLoRA adapters are named as such (lesson 07's variants); the shipped demo adapter is plain LoRA."
    from lora_kit.core import tiny_llama
    from lora_kit.inject import add_lora, save_adapter
    dora = save_adapter(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, use_dora=True), tmp_path / "dora")
    rs = save_adapter(add_lora(tiny_llama(), ["q_proj"], r=4, use_rslora=True), tmp_path / "rs")
    assert [app.adapter_summary(p)["variant"] for p in (dora, rs, DEMO_ADAPTER)] == ["DoRA", "rsLoRA", "LoRA"]
    at = AppTest.from_string(app.PAGE_SCRIPT, default_timeout=120)
    at.run()
    assert any(c.value.startswith("LoRA, rank 16, alpha 32 on") for c in at.caption), [c.value for c in at.caption]
