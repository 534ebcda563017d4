"Black-box tests of the `lora-kit` console script, run as a user runs it."
import dataclasses, json, subprocess, sys

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
    assert r.returncode == 2 and "--alpha: must be a number > 0, got 'nan'" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_finetune_precision_auto_is_the_default_and_is_kept_for_the_training_loop_to_resolve():
    "The config keeps what was asked (auto); the loop runs what `auto_precision` says for this machine (test_train.py)."
    from lora_kit.cli import build_parser, finetune_config
    args = build_parser().parse_args(["finetune"])
    assert args.precision == "auto" and finetune_config(args).train.precision == "auto"
    assert finetune_config(build_parser().parse_args(["finetune", "--precision", "bf16"])).train.precision == "bf16"


def flattened_fields(kind):
    "(field, default) of every field of the dataclass `kind`, a nested dataclass's fields in its place."
    out = []
    for f in dataclasses.fields(kind):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out += [(g, getattr(default, g.name)) for g in dataclasses.fields(default)] if dataclasses.is_dataclass(default) else [(f, default)]
    return out


REQUIRED = {"estimate": ["--model", "tiny"], "generate": ["--adapter", "a", "--prompt", "p"]}  # what a bare parse needs


@pytest.mark.parametrize("command, kind, extras", [("finetune", "lora_kit.finetune:FinetuneConfig", set()),
                                                    ("estimate", "lora_kit.accounting:Setup", {"model", "json"}),
                                                    ("bench", "lora_kit.bench:BenchConfig", {"threads", "tiny", "json"}),
                                                    ("generate", "lora_kit.core:Sampling", {"adapter", "prompt", "model", "base", "four_bit"})])
def test_a_subcommand_has_one_flag_per_config_field_with_the_fields_default_and_help(command, kind, extras):
    "The parser is built from the fields: every field a flag, named as the field says, with its default and help; nothing else."
    import argparse, importlib
    from lora_kit.cli import SUBCOMMANDS
    from lora_kit.core import flag_of, settings_from
    module, name = kind.split(":")
    kind = getattr(importlib.import_module(module), name)
    parser = argparse.ArgumentParser()
    SUBCOMMANDS[command][1](parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = flattened_fields(kind)
    assert set(actions) - {f.name for f, _ in fields} == extras
    for f, default in fields:
        action = actions[f.name]
        assert action.option_strings[0] == (f.metadata["flag"] or "--" + f.name.replace("_", "-")) == flag_of(f)
        assert action.default == default and action.help.startswith(f.metadata["help"].replace("%", "%%"))
    assert settings_from(kind, parser.parse_args(REQUIRED.get(command, []))) == kind()


def test_a_config_error_names_the_field_and_the_cli_names_its_flag(capsys):
    from lora_kit.core import ConfigError
    from lora_kit.finetune import FinetuneConfig
    with pytest.raises(ConfigError) as refused: FinetuneConfig(resume_fallback=True)
    assert refused.value.field == "resume_fallback"
    r = in_process(capsys, "finetune", "--resume-fallback")
    assert r.returncode == 2 and r.stderr.startswith("lora-kit finetune --resume-fallback: resume_fallback=True needs resume=True")


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


@pytest.mark.slow
def test_help_documents_the_exit_codes():
    r = lora_kit("--help")
    assert r.returncode == 0 and "exit codes: 0 done; 2 bad input" in " ".join(r.stdout.split())
    assert "3 training stopped on a non-finite loss" in " ".join(lora_kit("finetune", "--help").stdout.split())


def stderr_lines(r):
    "What the command printed on stderr, the training bar's redraws aside."
    return [l for l in r.stderr.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("training")]


@pytest.mark.slow
def test_warnings_print_once_each_on_one_line_without_a_path(tmp_path):
    "The lean layer's DoRA fallback warns (lesson 06): once, as `warning: ...`, no file path, no source line."
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "finetune", "--dora", "--max-steps", "2", "--eval-examples", "4",
                        "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = stderr_lines(r)
    warned = [l for l in lines if l.startswith("warning: ")]
    assert len(warned) == 1 and "DoRA" in warned[0], lines
    assert lines == warned, lines  # nothing else: no `file.py:N: UserWarning`, no source line, no library notice


@pytest.mark.slow
def test_generation_never_runs_past_the_context(tmp_path):
    "A prompt longer than the base's 256 positions: a reply, and no transformers 'friendly reminder' on stderr."
    from lora_kit.finetune import DEMO_ADAPTER
    r = lora_kit("generate", "--adapter", str(DEMO_ADAPTER), "--prompt", "the small cat eats my hot fish. " * 60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stderr_lines(r) == [], r.stderr[-3000:]


PROMPT = "<s>[INST] Translate to Indonesian:\n\nmy old teacher reads the new book. [/INST]"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapter folders on the embedded tiny base: the shipped demo; `weak`, the demo's update times 0.3 (it says
    'surat' for 'buku'); `both`, the two in peft's multi-adapter layout; `on-copy`, `weak` naming a copy of the base."""
    from lora_kit.finetune import DEMO_ADAPTER
    from lora_kit.inject import add_weighted_adapter, save_adapter
    from lora_kit.qlora import load_base, open_adapter
    root = tmp_path_factory.mktemp("adapters")
    model, _, _ = open_adapter(DEMO_ADAPTER)
    add_weighted_adapter(model, ["default"], [0.3], "weak", combination_type="linear")
    save_adapter(model, root / "weak", base_model_name_or_path="tiny", adapter_name="weak")
    save_adapter(model, root / "both", base_model_name_or_path="tiny")  # "default" in both/, "weak" in both/weak
    base, tokenizer = load_base("tiny")
    base.save_pretrained(root / "base-copy"); tokenizer.save_pretrained(root / "base-copy")
    save_adapter(model, root / "on-copy", base_model_name_or_path=str(root / "base-copy"), adapter_name="weak")
    return dict(demo=DEMO_ADAPTER, **{name: root / name for name in ("weak", "both", "on-copy", "base-copy")})


def alone(folder, model=None, max_new_tokens=12):
    "The reference: the greedy reply of a model holding only the adapter in `folder` (or only the base, for None)."
    from lora_kit.qlora import load_base, open_adapter
    from lora_kit.tiny import generate
    net, tokenizer = open_adapter(folder, model=model)[:2] if folder else load_base(model)
    return generate(net, tokenizer, [PROMPT], max_new_tokens)[0]


def generate_with(capsys, *adapter_args, max_new_tokens=12):
    return in_process(capsys, "generate", *adapter_args, "--prompt", PROMPT, "--max-new-tokens", str(max_new_tokens))


def test_generate_with_two_adapters_gives_each_the_reply_it_gives_alone(adapters, capsys):
    demo, weak = adapters["demo"], adapters["weak"]
    r = generate_with(capsys, "--adapter", str(demo), "--adapter", str(weak))
    assert r.returncode == 0, r.stderr
    assert alone(demo) != alone(weak)  # two different replies: each row ran through its own adapter
    assert r.stdout == f"== demo_adapter ({demo}) ==\n{alone(demo)}\n\n== weak ({weak}) ==\n{alone(weak)}\n"


def test_generate_with_one_adapter_prints_its_reply_alone_as_before(adapters, capsys):
    r = generate_with(capsys, "--adapter", str(adapters["demo"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout == alone(adapters["demo"]) + "\n"


def test_base_flag_adds_the_bases_own_reply_first(adapters, capsys):
    demo = adapters["demo"]
    r = generate_with(capsys, "--base", "--adapter", str(demo))
    assert r.returncode == 0, r.stderr
    assert alone(None, "tiny") != alone(demo)
    assert r.stdout == f"== base (tiny, no adapter) ==\n{alone(None, 'tiny')}\n\n== demo_adapter ({demo}) ==\n{alone(demo)}\n"


def test_a_multi_adapter_folder_gives_each_of_its_adapters(adapters, capsys):
    "`both` holds demo's adapter and `weak`'s: each is a row; the second `weak` is named weak-2."
    both, weak = adapters["both"], adapters["weak"]
    r = generate_with(capsys, "--adapter", str(both), "--adapter", str(weak))
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"== both ({both}) ==\n{alone(both)}\n\n== weak ({both / 'weak'}) ==\n{alone(both / 'weak')}\n\n"
                        f"== weak-2 ({weak}) ==\n{alone(weak)}\n")
    assert alone(both) == alone(adapters["demo"]) and alone(both / "weak") == alone(weak)


def test_adapter_names_follow_their_folders_and_stay_unique(adapters, tmp_path):
    from lora_kit.cli import given_adapters, unique_name
    names = [a.name for a in given_adapters([str(adapters["both"]), str(adapters["weak"]), str(adapters["demo"])])]
    assert names == ["both", "weak", "weak-2", "demo_adapter"]
    taken = set()
    assert [unique_name(tmp_path / n, taken) for n in ("v1.2", "eval", "eval", "half")] == ["v1_2", "eval-2", "eval-3", "half-2"]


def test_adapters_on_different_bases_exit_2_naming_both_unless_model_is_given(adapters, capsys):
    demo, on_copy = adapters["demo"], adapters["on-copy"]
    r = generate_with(capsys, "--adapter", str(demo), "--adapter", str(on_copy))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == ""
    assert f"--adapter {demo} names 'tiny', --adapter {on_copy} names '{adapters['base-copy']}'" in r.stderr
    assert "pass --model" in r.stderr and "run them separately" in r.stderr
    r = generate_with(capsys, "--adapter", str(demo), "--adapter", str(on_copy), "--model", "tiny")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(f"== on-copy ({on_copy}) ==\n{alone(on_copy, model='tiny')}\n")


@pytest.mark.parametrize("folder, problem", [("nowhere", "(no such folder)"), ("empty", "or its subfolders")])
def test_a_folder_without_an_adapter_exits_2_with_one_line(adapters, tmp_path, capsys, folder, problem):
    (tmp_path / "empty").mkdir()
    r = generate_with(capsys, "--adapter", str(adapters["demo"]), "--adapter", str(tmp_path / folder))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"No adapter_config.json in --adapter {tmp_path / folder} {problem}: pass a folder" in r.stderr


def test_sampling_flags_reach_every_adapter(adapters, capsys):
    r = in_process(capsys, "generate", "--adapter", str(adapters["demo"]), "--adapter", str(adapters["weak"]), "--prompt",
                   PROMPT, "--temperature", "0.8", "--top-p", "0.9", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert [l for l in r.stdout.splitlines() if l.startswith("== ")] == [
        f"== demo_adapter ({adapters['demo']}) ==", f"== weak ({adapters['weak']}) =="]
