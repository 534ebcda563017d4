"""The step benchmark: `python -m lora_kit.bench` end to end on the tiny model (tables, JSON, bad input), and its three
paths (fp32, autocast, a 4-bit NF4 base) checked for what they claim to run: the dtypes and classes of the models,
autocast active in the measured forward, and the same starting loss as transformers computes on its own."""
import importlib.util, json, os, re, subprocess, sys, tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lora_kit.bench import (PATHS, TINY_MODEL, BenchConfig, Run, Trainee, bench_batch, bench_checkpoint, bench_llama, format_bench, path_base,
                            find, path_summary, run_bench, saved_activation_bytes)
from lora_kit.cli import main
from lora_kit.core import ConfigError
from lora_kit.efficient import SavedTensorLog
from lora_kit.inject import adapter_layers, plain_path_reasons
from lora_kit.layers import LoRALinear

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
INSTALL = "pip install 'lora_kit[qlora]' (or pip install bitsandbytes)."
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="the qlora path needs the qlora extra: pip install 'lora_kit[qlora]'")


def runs(result) -> set:
    "(method, dropout, path) of every result of a benchmark."
    return {(m["method"], m["dropout"], m["path"]) for m in result["methods"]}


def bench(*args):
    return subprocess.run([sys.executable, "-m", "lora_kit.bench", *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=1200)


@pytest.mark.slow
def test_tiny_run_prints_tables_and_writes_json(tmp_path):
    out = bench("--tiny", "--repeats", "1", "--seq-len", "16", "--methods", "full,peft,efficient", "--dropouts", "0.1",
                "--json", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr
    assert "| efficient/peft p=0.1 |" in out.stdout and "merged" in out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert runs(result) == {("full", None, "fp32"), ("peft", 0.1, "fp32"), ("efficient", 0.1, "fp32")}
    assert result["setup"]["paths"] == ["fp32"]  # the default path: the benchmark as it was before paths
    peft, eff, full = (find(result["methods"], method=m) for m in ("peft", "efficient", "full"))
    assert eff["flops"] == peft["flops"] < full["flops"]  # same matmuls; LoRA skips the weight gradients
    assert eff["trainable_params"] == peft["trainable_params"] < full["trainable_params"]
    assert {"base_wall_s", "merged_wall_s", "unmerged_wall_s", "merged/base cpu"} <= result["inference"].keys()  # no timing asserts


@needs_bitsandbytes
@pytest.mark.slow
def test_three_paths_from_the_command_line(tmp_path):
    out = bench("--tiny", "--repeats", "1", "--seq-len", "16", "--methods", "full,peft,efficient", "--dropouts", "0.1",
                "--path", "fp32,autocast,qlora", "--dtype", "fp16", "--no-inference", "--json", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["setup"]["paths"] == ["fp32", "autocast fp16", "qlora fp16"]
    assert runs(result) == {("full", None, "fp32"), ("peft", 0.1, "fp32"), ("efficient", 0.1, "fp32"),
                            ("full", None, "autocast fp16"), ("peft", 0.1, "autocast fp16"), ("efficient", 0.1, "autocast fp16"),
                            ("peft", 0.1, "qlora fp16"), ("efficient", 0.1, "qlora fp16")}  # no full fine-tuning of 4 bits
    for label in result["setup"]["paths"]:
        assert f"| {label} | 0.1 |" in out.stdout  # a row of the per-path efficient/peft table
        ratio = find(result["ratios"], num="efficient", den="peft", dropout=0.1, path=label)
        eff, peft = (find(result["methods"], method=m, dropout=0.1, path=label) for m in ("efficient", "peft"))
        assert ratio["saved_bytes"] == eff["saved_bytes"] / peft["saved_bytes"] and ratio["step_s"] == eff["step_s"] / peft["step_s"]


@pytest.mark.parametrize("argv, named", [
    (["bench", "--path", "gpu"], "argument --path: must be one or more of fp32, autocast, qlora, comma-separated, got 'gpu'"),
    (["bench", "--path", "fp32,autocast,int8"], "got 'fp32,autocast,int8'"),
    (["bench", "--path", ","], "must be one or more of fp32, autocast, qlora"),
    (["bench", "--methods", "lora"], "argument --methods: must be one or more of full, full+chunked, peft"),
    (["bench", "--dtype", "fp8"], "argument --dtype: must be 'bf16' or 'fp16', got 'fp8'"),
    (["bench", "--device", "gpu"], "argument --device: must be a torch device"),
])
def test_bad_path_and_dtype_exit_2_naming_the_choices(capsys, argv, named):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err, err


def test_a_refusal_across_fields_names_the_command_and_the_flag(capsys):
    "A device this machine cannot run (no CUDA here; or the qlora path off the GPU where there is one) is refused before any run."
    argv = ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cpu", "--path", "qlora"]
    assert main(["bench", "--tiny", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("lora-kit bench --device: ") and captured.out == "", captured


@pytest.mark.slow
def test_bad_arguments_exit_2_with_the_reason():
    out = bench("--methods", "lora")
    assert out.returncode == 2 and "argument --methods: must be one or more of full," in out.stderr
    out = bench("--dropouts", "1.5")
    assert out.returncode == 2 and "argument --dropouts: must be a number >= 0 and < 1" in out.stderr
    out = bench("--path", "qlora,tpu")
    assert out.returncode == 2 and "--path: must be one or more of fp32, autocast, qlora, comma-separated, got 'qlora,tpu'" in out.stderr


@pytest.mark.slow
def test_qlora_path_without_bitsandbytes_exits_2_with_the_install_command():
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from lora_kit.cli import main; sys.exit(main(['bench', '--tiny', '--path', 'fp32,qlora', '--repeats', '1']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(INSTALL), r.stderr
    assert "Traceback" not in r.stderr and "|" not in r.stdout  # refused before any benchmark ran


@pytest.mark.parametrize("settings, field, words", [
    (dict(paths=("gpu",)), "paths", "paths must be one or more of fp32, autocast, qlora"),
    (dict(methods=("lora",)), "methods", "methods must be one or more of full,"),
    (dict(dtype="fp32"), "dtype", "dtype must be 'bf16' or 'fp16', got 'fp32'"),
    (dict(dropouts=()), "dropouts", "dropouts must be a number >= 0 and < 1, or several"),
    (dict(seq_len=1), "seq_len", "seq_len must be an integer >= 2, got 1"),
    (dict(alpha=float("nan")), "alpha", "alpha must be a number > 0"),
    (dict(device="tpu:x"), "device", "device must be a torch device"),
    (dict(device="cuda"), "device", "this torch sees no CUDA GPU" if not torch.cuda.is_available() else "the qlora path"),
])
def test_the_benchmark_config_refuses_what_it_cannot_run_naming_the_field(settings, field, words):
    if settings.get("device") == "cuda" and torch.cuda.is_available(): settings = settings | dict(device="cpu", paths=("qlora",))
    with pytest.raises(ConfigError, match=re.escape(words)) as refused: BenchConfig(**settings)
    assert refused.value.field == field


def test_path_base_refuses_what_it_cannot_build():
    with pytest.raises(ConfigError, match="path must be one or more of fp32, autocast, qlora"): path_base("gpu", "peft", model_config=TINY_MODEL)
    with pytest.raises(ConfigError, match="cannot train"): path_base("qlora", "full", model_config=TINY_MODEL, checkpoint="x")


def test_no_inference_still_turns_the_latency_off():
    "The field is on by default, so its flag is argparse's --inference/--no-inference (test_cli checks the parser against every field)."
    import argparse
    from lora_kit.bench import add_bench_arguments
    parser = add_bench_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).inference is True and parser.parse_args(["--no-inference"]).inference is False


def test_a_path_given_twice_runs_once():
    config = BenchConfig(methods=("peft",), dropouts=(0.0,), repeats=1, seq_len=8, inference=False, paths=("fp32", "autocast", "fp32"), dtype="fp16")
    result = run_bench(config, TINY_MODEL)
    assert result["setup"]["paths"] == ["fp32", "autocast fp16"]
    assert [str(Run(m["method"], m["dropout"], m["path"])) for m in result["methods"]] == ["peft p=0.0", "peft p=0.0 [autocast fp16]"]


# The paths build what they say ---------------------------------------------------------------------------------------

IDS = torch.randint(0, TINY_MODEL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint():
    with tempfile.TemporaryDirectory() as folder: yield bench_checkpoint(folder, torch.bfloat16, TINY_MODEL)


def trainee(method, path, checkpoint, dropout=0.05):
    return Trainee.for_method(method, IDS, path=path, dropout=dropout, model_config=TINY_MODEL, checkpoint=checkpoint)


def adapters(t):
    "(base layer, lora_A weight, lora_B weight) of every adapted layer, for peft's layers and lora_kit's."
    if hasattr(t.model, "peft_config"):
        return [(m.base_layer, m.lora_A["default"].weight, m.lora_B["default"].weight)
                for m in t.model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    return [(m.base, m.lora_A["default"].weight, m.lora_B["default"].weight) for m in adapter_layers(t.model).values()]


@needs_bitsandbytes
@pytest.mark.parametrize("method", ["peft", "lora_kit", "efficient"])
def test_each_path_builds_the_model_it_names(checkpoint, method):
    import bitsandbytes as bnb
    expected_base = {"fp32": (torch.nn.Linear, torch.float32), "autocast": (torch.nn.Linear, torch.bfloat16),
                     "qlora": (bnb.nn.Linear4bit, torch.uint8)}
    for path in PATHS:
        t = trainee(method, path, checkpoint)
        layers = adapters(t)
        assert len(layers) == 7 * TINY_MODEL["num_hidden_layers"]  # all-linear: 7 per block, not the head
        cls, weight_dtype = expected_base[path]
        for base, lora_A, lora_B in layers:
            assert type(base) is cls and base.weight.dtype == weight_dtype and not base.weight.requires_grad, (path, base)
            assert lora_A.dtype == lora_B.dtype == torch.float32 and lora_A.requires_grad  # adapters stay fp32 everywhere
        if method != "peft":  # lora_kit's one layer: "lora_kit" on the plain path, "efficient" on the lean default path
            assert {type(l) for l in adapter_layers(t.model).values()} == {LoRALinear}
            assert plain_path_reasons(t.model) == ({} if method == "efficient" else {"backward='plain' was asked for": len(layers)})
        rest = {p.dtype for n, p in t.model.named_parameters() if "lora_" not in n and p.dtype.is_floating_point}
        assert rest == ({torch.float32} if path == "fp32" else {torch.bfloat16}), (path, rest)
        assert t.autocast == (None if path == "fp32" else torch.bfloat16)


def test_full_fine_tuning_keeps_fp32_weights_under_autocast(checkpoint):
    t = trainee("full", "autocast", checkpoint)
    assert t.autocast == torch.bfloat16
    assert {p.dtype for p in t.model.parameters()} == {torch.float32} and all(p.requires_grad for p in t.model.parameters())


def saved(t, autocast:bool):
    "What one forward of `t`'s loss saves for backward, with or without an autocast set here (not by the trainee)."
    with SavedTensorLog(t.model) as log, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        t.loss_fn(t.model, t.ids)
    return log


@needs_bitsandbytes
@pytest.mark.parametrize("method", ["peft", "efficient"])
def test_measured_forward_runs_under_the_paths_autocast(checkpoint, method):
    "`saved_activation_bytes` counts what an explicit `torch.autocast` forward saves, not what a plain one saves."
    full = trainee("full", "autocast", checkpoint)  # fp32 weights: autocast changes every matmul's saved inputs
    assert saved_activation_bytes(full) == saved(full, True).activation_bytes() != saved(full, False).activation_bytes()
    for path in ("autocast", "qlora"):
        t = trainee(method, path, checkpoint)
        assert saved_activation_bytes(t) == saved(t, True).activation_bytes(), path
        by_linears = [r for r in saved(t, True).unique()  # what the matmuls save (peft's dropout keeps an fp32 mask of its own)
                      if "_proj" in r.module and "dropout" not in r.module and r.dtype.is_floating_point]
        assert by_linears and all(r.dtype == torch.bfloat16 for r in by_linears), (path, [(r.module, r.dtype) for r in by_linears])
    t = trainee(method, "fp32", checkpoint)
    assert not {torch.bfloat16, torch.float16} & {r.dtype for r in saved(t, False).unique()}  # no 16-bit anywhere
    assert saved_activation_bytes(t) == saved(t, False).activation_bytes()


def hf_loss_of(model, ids, autocast:bool):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=ids, labels=ids).loss.item()


@needs_bitsandbytes
def test_three_paths_start_from_transformers_own_loss(checkpoint):
    "Same weights, same batch: before any step every method's loss is transformers' loss of the model that path loads."
    result = run_bench(BenchConfig(methods=("full", "peft", "lora_kit", "efficient"), dropouts=(0.05,), repeats=1, seq_len=16,
                                   batch_size=2, inference=False, paths=PATHS), TINY_MODEL)
    config = TINY_MODEL | dict(max_position_embeddings=512)
    ids = bench_batch(2, 16, TINY_MODEL["vocab_size"])
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        bench_llama(**config).to(torch.bfloat16).save_pretrained(folder)
        nf4 = AutoModelForCausalLM.from_pretrained(folder, quantization_config=four_bit, dtype=torch.bfloat16, device_map="cpu")
    for layer in nf4.modules():  # bitsandbytes' fast CPU kernel needs 32 | out_features, which the tiny MLP's 176 is not
        if hasattr(layer, "support_avx512bf16_for_cpu"): layer.support_avx512bf16_for_cpu = False
    reference = {"fp32": hf_loss_of(bench_llama(**config), ids, False),
                 "autocast bf16": hf_loss_of(bench_llama(**config).to(torch.bfloat16), ids, True),
                 "qlora bf16": hf_loss_of(nf4, ids, True)}
    assert result["setup"]["paths"] == list(reference)
    for m in result["methods"]:
        assert m["initial_loss"] == pytest.approx(reference[m["path"]], abs=2e-3), m
    assert runs(result) == {(m, p, label) for label in reference for m, p in [("full", None), ("peft", 0.05), ("lora_kit", 0.05), ("efficient", 0.05)]
                            if not (m == "full" and label.startswith("qlora"))}
    rows = path_summary(result)
    assert [r["path"] for r in rows] == list(reference) and all(r["saved_bytes"] > 0 for r in rows)
    for row in rows:  # the summary's ratios are the rows' own numbers divided
        eff, peft = (find(result["methods"], method=m, dropout=0.05, path=row["path"]) for m in ("efficient", "peft"))
        assert row["saved_bytes"] == eff["saved_bytes"] / peft["saved_bytes"] and row["step_s"] == eff["step_s"] / peft["step_s"]
        assert row["meets_goal"] == (row["saved_bytes"] <= 0.75 and row["step_s"] <= 1.0)
    assert "efficient/peft per path" in format_bench(result)


def test_the_step_benchmark_loads_without_the_fine_tuning_job():
    "Split by job: `lora_kit.bench` is the step benchmark alone; the demo-task sweeps that run the fine-tune are `lora_kit.sweeps`."
    check = "import sys, lora_kit.{}; print(sorted(m for m in ('lora_kit.finetune', 'lora_kit.train') if m in sys.modules))"
    alone = subprocess.run([sys.executable, "-c", check.format("bench")], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    sweeps = subprocess.run([sys.executable, "-c", check.format("sweeps")], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert (alone.stdout.strip(), sweeps.stdout.strip()) == ("[]", "['lora_kit.finetune', 'lora_kit.train']"), alone.stderr + sweeps.stderr
