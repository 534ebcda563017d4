"Black-box tests of the `lora-kit` console script, run as a user runs it."
import json, subprocess, sys

import pytest


def lora_kit(*args):
    return subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], capture_output=True, text=True, timeout=120)


def in_process(capsys, *args):
    "The same entry point without a new interpreter (each costs seconds of imports): (exit code, stdout, stderr)."
    from lora_kit.cli import main
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_help_lists_every_subcommand():
    r = lora_kit("--help")
    assert r.returncode == 0
    for sub in ("estimate", "finetune", "generate", "merge", "bench", "app"): assert sub in r.stdout


def test_estimate_json_matches_closed_form():
    r = lora_kit("estimate", "--model", "llama-2-13b", "--rank", "16", "--json")
    assert r.returncode == 0, r.stderr
    est = json.loads(r.stdout)
    # 40 layers x (q_proj + v_proj), each 5120 -> 5120: r * (in + out) per layer
    assert est["params_trainable"] == 40 * 2 * 16 * (5120 + 5120)
    # LLaMA-2-13B: 13,015,864,320 parameters (embeddings, 40 blocks, norm, lm_head)
    assert est["params_total"] - est["params_trainable"] == 13_015_864_320


def test_estimate_json_has_the_contract_keys_and_echoes_inputs():
    r = lora_kit("estimate", "--model", "llama-2-7b", "--method", "qlora", "--rank", "4", "--targets", "all-linear",
                 "--seq-len", "256", "--batch-size", "2", "--grad-checkpointing", "--json")
    assert r.returncode == 0, r.stderr
    est = json.loads(r.stdout)
    assert {k: est[k] for k in ("model", "method", "rank", "seq_len", "batch_size", "grad_checkpointing")} == dict(
        model="llama-2-7b", method="qlora", rank=4, seq_len=256, batch_size=2, grad_checkpointing=True)
    assert est["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    mem = est["memory_bytes"]
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(mem)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    # AdamW: two fp32 moments per trainable parameter
    assert mem["optimizer"] == 8 * est["params_trainable"]
    # a LoRA step is between the 4NT and 6NT rules of thumb (N without the embedding lookup, T = 512 tokens)
    n = est["params_total"] - est["params_trainable"] - 32000 * 4096
    assert 4 * n * 512 < est["flops_per_step"] < 6 * n * 512


def test_estimate_table_without_json():
    r = lora_kit("estimate", "--model", "llama-2-70b", "--method", "full")
    assert r.returncode == 0, r.stderr
    assert "memory: total" in r.stdout and "fits H100 80GB" in r.stdout


def test_estimate_reads_a_config_json(tmp_path, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    r = in_process(capsys, "estimate", "--model", str(tmp_path / "config.json"), "--method", "full", "--json")
    assert r.returncode == 0, r.stderr
    with torch.device("meta"): model = LlamaForCausalLM(config)
    assert json.loads(r.stdout)["params_total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("content, reason", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"hidden_size": 64}', "lacks integer field(s) intermediate_size"),
])
def test_bad_config_json_exits_2_with_one_line(tmp_path, capsys, content, reason):
    (tmp_path / "config.json").write_text(content)
    r = in_process(capsys, "estimate", "--model", str(tmp_path / "config.json"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and reason in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, reason", [
    (("estimate", "--rank", "0"), "argument --rank: must be an integer >= 1, got '0'"),
    (("estimate", "--model", "llama-3"), "neither a preset"),
    (("estimate", "--rank", "eight"), "argument --rank: must be an integer >= 1, got 'eight'"),
    (("estimate", "--method", "dora"), "invalid choice"),
    (("estimate", "--targets", "q,v"), "LoRA targets q, v unknown"),
    (("estimate", "--seq-len", "0"), "argument --seq-len: must be an integer >= 1"),
    (("estimate", "--batch-size", "0"), "argument --batch-size: must be an integer >= 1"),
    (("finetune", "--rank", "0"), "--rank: rank=0 must be an integer >= 1"),
    (("finetune", "--precision", "fp64"), "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, reason):
    r = in_process(capsys, *args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and reason in r.stderr and "Traceback" not in r.stderr


def test_console_script_exits_2_on_bad_input():
    r = lora_kit("frobnicate")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_only_the_kits_error_family_is_reported_as_bad_input(monkeypatch, capsys):
    "A bug (any exception outside `LoraKitError`) keeps its traceback instead of looking like bad input."
    import lora_kit.cli as cli
    def buggy(args): raise KeyError("a bug in the kit")
    monkeypatch.setattr(cli, "_print_estimate", buggy)
    with pytest.raises(KeyError, match="a bug in the kit"): cli.main(["estimate"])
    def plain_value_error(args): raise ValueError("not the kit's bad-input family")
    monkeypatch.setattr(cli, "_print_estimate", plain_value_error)
    with pytest.raises(ValueError): cli.main(["estimate"])


def test_a_non_finite_loss_exits_with_3(monkeypatch, capsys):
    import lora_kit.cli as cli
    from lora_kit.train import NonFiniteLossError
    def diverged(args): raise NonFiniteLossError("The loss was nan at step 7; the last good adapter is saved in out.")
    monkeypatch.setattr(cli, "_print_estimate", diverged)
    assert cli.main(["estimate"]) == 3
    assert capsys.readouterr().err.count("\n") == 1


def test_finetune_settings_are_checked_before_anything_loads(tmp_path, capsys):
    r = in_process(capsys, "finetune", "--alpha", "nan", "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "alpha=nan" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_finetune_precision_auto_is_the_default_and_follows_the_device():
    "auto: fp32 (no autocast) on a CPU; on a GPU, what `default_compute_dtype` picks for its compute capability."
    import torch
    from lora_kit.cli import build_parser, finetune_config
    from lora_kit.qlora import default_compute_dtype, mixed_precision
    args = build_parser().parse_args(["finetune"])
    assert args.precision == "auto"
    expected = mixed_precision(default_compute_dtype(torch.cuda.get_device_capability())) if torch.cuda.is_available() else "no"
    assert finetune_config(args).train.precision == expected
    assert finetune_config(build_parser().parse_args(["finetune", "--precision", "bf16"])).train.precision == "bf16"


@pytest.mark.parametrize("capability, dtype", [((7, 5), "float16"), ((7, 0), "float16"), ((8, 0), "bfloat16"),
                                               ((8, 6), "bfloat16"), ((9, 0), "bfloat16"), ((6, 1), "float16")])
def test_compute_dtype_goes_by_compute_capability_not_emulated_bf16(capability, dtype):
    "A T4 (7.5) gets fp16: torch's is_bf16_supported() says yes there since 2.4 (emulation), bf16 tensor cores start at 8.0."
    import torch
    from lora_kit.qlora import default_compute_dtype
    assert default_compute_dtype(capability) == getattr(torch, dtype)


LAZY_CHECK = """
import sys
from lora_kit.cli import main
try: code = main(sys.argv[1:])
except SystemExit as e: code = e.code
print(code, sorted(m for m in ("torch", "transformers", "accelerate", "datasets", "peft") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [("--help",), ("estimate", "--model", "llama-2-70b", "--method", "qlora"),
                                  ("estimate", "--model", "tiny", "--json"), ("estimate", "--rank", "0"), ("estimate", "--help")])
def test_help_and_estimate_load_neither_torch_nor_transformers(args):
    "`lora-kit --help` answers in a fraction of `import torch`'s time: only the chosen subcommand's modules load."
    r = subprocess.run([sys.executable, "-c", LAZY_CHECK, *args], capture_output=True, text=True, timeout=120)
    code, loaded = r.stdout.strip().splitlines()[-1].split(" ", 1)
    assert code in ("0", "2") and loaded == "[]", r.stdout + r.stderr


def test_help_documents_the_exit_codes():
    r = lora_kit("--help")
    assert r.returncode == 0 and "exit codes: 0 done; 2 bad input" in " ".join(r.stdout.split())
    assert "3 training stopped on a non-finite loss" in " ".join(lora_kit("finetune", "--help").stdout.split())


def stderr_lines(r):
    "What the command printed on stderr, the training bar's redraws aside."
    return [l for l in r.stderr.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("training")]


def test_warnings_print_once_each_on_one_line_without_a_path(tmp_path):
    "The lean layer's DoRA fallback warns (lesson 06): once, as `warning: ...`, no file path, no source line."
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "finetune", "--dora", "--max-steps", "2", "--eval-examples", "4",
                        "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = stderr_lines(r)
    warned = [l for l in lines if l.startswith("warning: ")]
    assert len(warned) == 1 and "DoRA" in warned[0], lines
    assert lines == warned, lines  # nothing else: no `file.py:N: UserWarning`, no source line, no library notice


def test_generation_never_runs_past_the_context(tmp_path):
    "A prompt longer than the base's 256 positions: a reply, and no transformers 'friendly reminder' on stderr."
    from lora_kit.finetune import DEMO_ADAPTER
    r = lora_kit("generate", "--adapter", str(DEMO_ADAPTER), "--prompt", "the small cat eats my hot fish. " * 60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stderr_lines(r) == [], r.stderr[-3000:]
