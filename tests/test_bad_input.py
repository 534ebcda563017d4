"""The bad-input catalogue at the command line: every case exits 2 with one line naming the cause, no traceback.

Library-level checks of the same causes are in test_adapter_errors.py (adapter folders), test_data.py (data files),
test_qlora.py (bitsandbytes missing), test_reliability.py (checkpoints) and the lessons (ranks, alpha, dropout)."""
import json, subprocess, sys, tempfile
from pathlib import Path

import pytest

from lora_kit.cli import main
from lora_kit.core import tiny_llama
from lora_kit.inject import add_lora, save_adapter

GOOD = {"instruction": "Translate to Indonesian:", "input": "i drink your coffee.", "output": "saya minum kopi kamu."}


def lines(path, *rows, raw=None):
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return str(path)


def cases(tmp):
    adapter = save_adapter(add_lora(tiny_llama(), ["q_proj"], r=2), tmp / "adapter", base_model_name_or_path="tiny")
    good = save_adapter(add_lora(tiny_llama(), ["q_proj"], r=2), tmp / "good-adapter", base_model_name_or_path="tiny")
    (tmp / "no-config").mkdir()
    return {
        "rank 0": (["finetune", "--rank", "0"], "argument --rank: must be an integer >= 1, got '0'"),
        "rank negative": (["finetune", "--rank", "-3"], "must be an integer >= 1"),
        "rank larger than the layer": (["finetune", "--rank", "4096", "--data", lines(tmp / "ok.jsonl", GOOD)], "r=4096"),
        "alpha <= 0": (["finetune", "--alpha", "0", "--data", lines(tmp / "ok2.jsonl", GOOD)], "argument --alpha: must be a number > 0, got '0'"),
        "dropout 1": (["finetune", "--dropout", "1.0", "--data", lines(tmp / "ok3.jsonl", GOOD)], "argument --dropout: must be a number >= 0 and < 1, got '1.0'"),
        "targets match nothing": (["finetune", "--targets", "query_key_value", "--data", lines(tmp / "ok4.jsonl", GOOD)], "matched no module"),
        "target is not Linear": (["finetune", "--targets", "self_attn", "--data", lines(tmp / "ok5.jsonl", GOOD)], "nn.Linear layers only"),
        "data file missing": (["finetune", "--data", str(tmp / "missing.jsonl")], "missing.jsonl"),
        "data file empty": (["finetune", "--data", lines(tmp / "empty.jsonl", raw=b"")], "no examples"),
        "wrong columns": (["finetune", "--data", lines(tmp / "cols.jsonl", {"question": "a", "answer": "b"})], "line 1"),
        "empty response": (["finetune", "--data", lines(tmp / "blank.jsonl", GOOD | {"output": "  "})], "empty response"),
        "not UTF-8": (["finetune", "--data", lines(tmp / "latin.jsonl", raw='{"instruction": "caf\xe9"}\n'.encode("latin-1"))], "UTF-8"),
        "model folder without config": (["finetune", "--model", str(tmp / "no-config")], "no config.json"),
        "max-steps 0": (["finetune", "--max-steps", "0"], "must be an integer >= 1"),
        "LoRA+ ratio 0": (["finetune", "--loraplus-ratio", "0"], "argument --loraplus-ratio: must be a number > 0, got '0'"),
        "fp16 on CPU": (["finetune", "--precision", "fp16", "--data", lines(tmp / "ok6.jsonl", *[GOOD] * 40)], "fp16"),
        "adapter folder missing": (["generate", "--adapter", str(tmp / "nowhere"), "--prompt", "x"], "No adapter_config.json"),
        "adapter config not JSON": (["generate", "--adapter", str(adapter), "--prompt", "x"], "not valid JSON"),
        "merge onto an existing folder": (["merge", "--adapter", str(tmp / "adapter"), "--output", str(tmp)], "already exists"),
        "estimate unknown preset": (["estimate", "--model", "llama-9"], "neither a preset"),
        "estimate seq-len 0": (["estimate", "--seq-len", "0"], "--seq-len: must be an integer >= 1"),
        "estimate rank 0": (["estimate", "--rank", "0"], "--rank: must be an integer >= 1"),
        "estimate batch-size 0": (["estimate", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
        "estimate rank not a number": (["estimate", "--rank", "eight"], "argument --rank: must be an integer >= 1, got 'eight'"),
        "estimate unknown method": (["estimate", "--method", "dora"], "argument --method: must be one of 'full', 'lora', 'qlora', got 'dora'"),
        "estimate unknown targets": (["estimate", "--targets", "q,v"], "lora-kit estimate --targets: LoRA targets q, v unknown"),
        "finetune unknown precision": (["finetune", "--precision", "fp64"], "argument --precision: must be one of 'auto', 'no', 'bf16', 'fp16', got 'fp64'"),
        "generate on a base folder without config": (["generate", "--adapter", str(good), "--prompt", "x", "--model", str(tmp / "no-config")],
                                                     "no config.json"),
        "merge without an output": (["merge", "--adapter", str(good)], "the following arguments are required: --output"),
        "save-every -1": (["finetune", "--save-every", "-1"], "argument --save-every: must be an integer >= 0, got '-1'"),
        "warmup-steps -1": (["finetune", "--warmup-steps", "-1"], "argument --warmup-steps: must be an integer >= 0"),
        "seed -1": (["finetune", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
        "epochs 0": (["finetune", "--epochs", "0"], "argument --epochs: must be a number > 0, got '0'"),
        "epochs nan": (["finetune", "--epochs", "nan"], "argument --epochs: must be a number > 0, got 'nan'"),
        "lr negative": (["finetune", "--lr", "-0.001"], "argument --lr: must be a number > 0, got '-0.001'"),
        "lr zero": (["finetune", "--lr", "0"], "argument --lr: must be a number > 0"),
        "lr nan": (["finetune", "--lr", "nan"], "argument --lr: must be a number > 0, got 'nan'"),
        "dropout negative": (["finetune", "--dropout", "-0.1"], "argument --dropout: must be a number >= 0 and < 1, got '-0.1'"),
        "LoRA+ ratio negative": (["finetune", "--loraplus-ratio", "-2"], "argument --loraplus-ratio: must be a number > 0"),
        "batch-size 0": (["finetune", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        "grad-accum 0": (["finetune", "--grad-accum", "0"], "argument --grad-accum: must be an integer >= 1"),
        "max-length 0": (["finetune", "--max-length", "0"], "argument --max-length: must be an integer >= 1, got '0'"),
        "eval-examples 0": (["finetune", "--eval-examples", "0"], "argument --eval-examples: must be an integer >= 1, got '0'"),
        "init unknown": (["finetune", "--init", "olora"], "argument --init: must be kaiming (True: LoRA's, A random and B zero), gaussian, loftq, pissa or pissa_niter_K, got 'olora'"),
        "resume and overwrite": (["finetune", "--resume", "--overwrite"], "lora-kit finetune --overwrite: resume and overwrite exclude each other"),
        "resume-fallback without resume": (["finetune", "--resume-fallback"], "lora-kit finetune --resume-fallback: resume_fallback=True needs resume=True"),
        "4-bit with DoRA": (["finetune", "--4bit", "--dora"], "lora-kit finetune --4bit: DoRA, PiSSA and LoftQ need the base weights in 16 or 32 bits"),
        "tokens-per-batch without packing": (["finetune", "--tokens-per-batch", "1024"],
                                             "lora-kit finetune --tokens-per-batch: tokens_per_batch sets the length of packed rows: use it with packing=True (--packing)"),
        "tokens-per-batch below max-length": (["finetune", "--packing", "--tokens-per-batch", "100", "--max-length", "256"],
                                              "tokens_per_batch=100 is below max_length=256: a packed row must hold the longest example"),
        "tokens-per-batch 0": (["finetune", "--packing", "--tokens-per-batch", "0"], "argument --tokens-per-batch: must be an integer >= 1"),
        "init pissa_niter malformed": (["finetune", "--init", "pissa_niter_x"], "pissa_niter_K, got 'pissa_niter_x'"),
        "schedule unknown": (["finetune", "--schedule", "constant"], "argument --schedule: must be 'cosine' or 'linear', got 'constant'"),
        "estimate dora on full": (["estimate", "--method", "full", "--dora"], "lora-kit estimate --dora: DoRA adapts 16/32-bit bases"),
        "resume without a checkpoint": (["finetune", "--resume", "--output", str(tmp / "fresh")], "holds no checkpoint"),
        "output holds a run": (["finetune", "--output", str(tmp / "adapter")], "continue it with --resume, replace it with --overwrite"),
        "output is a file": (["finetune", "--output", lines(tmp / "out.jsonl", GOOD)], "is a file"),
        "generate temperature negative": (["generate", "--adapter", str(adapter), "--prompt", "x", "--temperature", "-1"],
                                          "--temperature: must be a number >= 0"),
        "generate temperature nan": (["generate", "--adapter", str(adapter), "--prompt", "x", "--temperature", "nan"],
                                     "--temperature: must be a number >= 0, got 'nan'"),
        "generate top-p 1.5": (["generate", "--adapter", str(adapter), "--prompt", "x", "--top-p", "1.5"], "--top-p: must be a number > 0 and <= 1"),
        "generate max-new-tokens 0": (["generate", "--adapter", str(adapter), "--prompt", "x", "--max-new-tokens", "0"],
                                      "--max-new-tokens: must be an integer >= 1"),
        "app port 0": (["app", "--port", "0"], "--port: must be an integer >= 1 and <= 65535"),
        "app port too large": (["app", "--port", "65536"], "--port: must be an integer >= 1 and <= 65535"),
        "unknown subcommand": (["frobnicate"], "invalid choice"),
        "bench threads 0": (["bench", "--threads", "0"], "--threads: must be an integer >= 1"),
        "bench repeats 0": (["bench", "--repeats", "0"], "--repeats: must be an integer >= 1"),
        "bench seq-len 1": (["bench", "--seq-len", "1"], "--seq-len: must be an integer >= 2"),
        "bench alpha nan": (["bench", "--alpha", "nan"], "--alpha: must be a number > 0"),
        "bench dropout 1": (["bench", "--dropouts", "0.05,1"], "--dropouts: must be a number >= 0 and < 1, or several comma-separated"),
        "rank sweep with rank 0": (["rank-sweep", "--ranks", "8,0"], "--ranks: must be an integer >= 1, or several comma-separated"),
        "rank sweep with 0 steps": (["rank-sweep", "--ranks", "8", "--steps", "0"], "--steps: must be an integer >= 1"),
        "rank sweep with 0 eval examples": (["rank-sweep", "--eval-examples", "0"], "--eval-examples: must be an integer >= 1"),
    }


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    out = cases(tmp)
    (tmp / "adapter" / "adapter_config.json").write_text("{r: 2,")  # for "adapter config not JSON"
    return out


with tempfile.TemporaryDirectory() as names_only:
    CASE_NAMES = list(cases(Path(names_only)))  # from the catalogue itself: a case added there always runs


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_bad_input_exits_2_with_one_line(catalogue, capsys, name):
    argv, cause = catalogue[name]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and cause in err and "Traceback" not in err, err


@pytest.mark.slow
def test_4bit_without_bitsandbytes_exits_2_with_the_install_command():
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from lora_kit.cli import main; sys.exit(main(['finetune', '--4bit', '--max-steps', '1']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("pip install 'lora_kit[qlora]' (or pip install bitsandbytes).")
    assert "Traceback" not in r.stderr


REMOTE_CODE_CHECK = """
import json, sys
from pathlib import Path
from lora_kit.core import byte_tokenizer, tiny_llama
from lora_kit.finetune import load_base
folder = Path(sys.argv[1])
tiny_llama().save_pretrained(folder); byte_tokenizer().save_pretrained(folder)
marker = folder / "ran"
(folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\\n"
                                "from transformers import LlamaConfig\\nclass EvilConfig(LlamaConfig): pass\\n")
config = json.loads((folder / "config.json").read_text())
(folder / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoConfig": "evil.EvilConfig"}}))
model, _ = load_base(str(folder))
print(type(model).__name__, marker.exists())
try: load_base(str(folder), trust_remote_code=True)
except Exception: pass  # the planted module is not a real model; what matters is whether it ran
print(marker.exists())
"""


@pytest.mark.slow
def test_remote_code_runs_only_when_asked(tmp_path):
    # in a subprocess: trusting remote code registers classes globally in transformers
    r = subprocess.run([sys.executable, "-c", REMOTE_CODE_CHECK, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    without, with_trust = r.stdout.strip().splitlines()[-2:]
    assert without == "LlamaForCausalLM False", "remote code ran without trust_remote_code"
    assert with_trust == "True", "with trust_remote_code=True the model's own code runs (so the check above can fail)"


@pytest.mark.parametrize("argv, cause", [
    (["--4bit", "--dora"], "--4bit: DoRA, PiSSA and LoftQ need the base weights in 16 or 32 bits"),
    (["--data", "no-such-file.jsonl"], "no-such-file.jsonl"),
], ids=["combination", "missing data"])
def test_the_job_run_as_a_module_exits_2_with_one_line_and_writes_no_adapter(tmp_path, capsys, argv, cause):
    "`python -m lora_kit.finetune` (lesson 12's `main`, what the app's Train tab starts) refuses as `lora-kit finetune` does."
    from lora_kit.finetune import main as finetune_main
    with pytest.raises(SystemExit) as ended:
        finetune_main([*argv, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err  # before it: the library's bar of loading the base, if it got that far
    last = err.splitlines()[-1]
    assert ended.value.code == 2 and last.startswith("python -m lora_kit.finetune: ") and cause in last and "Traceback" not in err, err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
