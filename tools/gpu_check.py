"""`make gpu-check`: the prepared measurement for the first machine with a GPU (no network there, nothing from the Hub).

It builds LLaMA-2-7B from its config with random weights, saves it as a local checkpoint, and measures one training
setup per row — NF4 QLoRA and bf16 LoRA, all linear layers at r=16, 512 tokens × batch 4 — for lora_kit and for
peft + bitsandbytes: tokens per second over the timed steps and `torch.cuda.max_memory_allocated` against
`lora_kit.accounting.estimate`'s total. Then issue 18's comparison: `lora_kit.bench.run_bench` on the fp32,
autocast and qlora paths, lora_kit's lean layer + chunked loss against peft (4 blocks of LLaMA-2-7B's width, one
interleaved run), saved-for-backward bytes, peak memory and step time as ratios. Then it runs the lessons whose `#| cuda` cells need no download
(`nbdev-test --flags cuda`). It writes `report.json` and `report.md` (a table for BENCHMARKS.md) to `--out`.

Without a GPU it runs the same code at tiny shapes on the CPU (a dry run, said so in the report) and exits 0.
"""
import argparse, gc, json, os, platform, subprocess, sys, tempfile, time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA_LESSONS = ("nbs/00_core.ipynb", "nbs/04_accounting.ipynb")  # their `#| cuda` cells need no download
RANK, ALPHA, DROPOUT = 16, 32, 0.05


def base_config(on_gpu: bool):
    "LLaMA-2-7B's config on a GPU; on a CPU a small LLaMA whose widths suit bitsandbytes' CPU kernels."
    from lora_kit.core import llama2_config, tiny_llama_config
    if on_gpu: return llama2_config("llama-2-7b")
    return tiny_llama_config(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512)


def save_random_base(config, folder: Path, device: str) -> Path:
    "Random weights of `config`, built in bf16 on `device`, saved with the kit's byte tokenizer (what `load_base` reads)."
    from transformers import LlamaForCausalLM
    from lora_kit.core import byte_tokenizer
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: a 7B model in fp32 would need 27 GB
    try:
        with torch.device(device): model = LlamaForCausalLM(config)
    finally: torch.set_default_dtype(default)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    del model
    return folder


def lora_kit_model(folder: Path, four_bit: bool, dtype):
    "lora_kit's path: `load_base`, adapters on every linear layer, its efficient layers and chunked loss."
    from lora_kit.bench import chunked_loss
    from lora_kit.efficient import use_efficient_layers
    from lora_kit.finetune import load_base
    from lora_kit.inject import add_lora
    model, _ = load_base(str(folder), four_bit=four_bit, dtype=dtype)
    add_lora(model, "all-linear", r=RANK, alpha=ALPHA, dropout=DROPOUT)
    return use_efficient_layers(model), chunked_loss


def peft_model(folder: Path, four_bit: bool, dtype):
    "The usual peft recipe: transformers + bitsandbytes, `prepare_model_for_kbit_training`, `get_peft_model`."
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from lora_kit.bench import hf_loss
    from lora_kit.qlora import nf4_config
    device_map = {"": 0} if torch.cuda.is_available() else "cpu"
    quant = dict(quantization_config=nf4_config(dtype)) if four_bit else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map, **quant)
    if four_bit: model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config), hf_loss


def measure(make, folder: Path, four_bit: bool, dtype, ids: torch.Tensor, steps: int) -> dict:
    "Tokens per second over `steps` training steps (after 3 warm-up steps) and the peak tensor memory."
    from lora_kit.bench import Trainee, peak_step_bytes
    model, loss_fn = make(folder, four_bit, dtype)
    trainee = Trainee(model, loss_fn, ids)
    autocast = torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        for _ in range(3): trainee.step()
        peak = peak_step_bytes(trainee)
        if ids.device.type == "cuda": torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps): loss = trainee.step()
        if ids.device.type == "cuda": torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    row = dict(tokens_per_second=steps * ids.numel() / seconds, seconds_per_step=seconds / steps,
               peak_bytes=peak, final_loss=float(loss))
    del trainee, model; gc.collect()
    if ids.device.type == "cuda": torch.cuda.empty_cache()
    return row


PATHS_MODEL_GPU = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                      num_key_value_heads=32)  # LLaMA-2-7B's width, 4 blocks: the three paths side by side in one run


def measure_paths(on_gpu: bool, device: str) -> list[dict]:
    "efficient/peft on the fp32, autocast (bf16) and qlora (NF4, bf16) paths: `lora_kit.bench.path_summary` rows."
    from lora_kit.bench import TINY_MODEL, path_summary, run_bench
    result = run_bench(methods=("peft", "efficient"), paths=("fp32", "autocast", "qlora"), dropouts=(0.05, 0.0),
                       repeats=5 if on_gpu else 1, batch_size=4 if on_gpu else 2, seq_len=512 if on_gpu else 32,
                       device=device, model_config=PATHS_MODEL_GPU if on_gpu else TINY_MODEL, inference=False)
    return path_summary(result)


def run_cuda_lessons() -> dict:
    "Run the lessons whose `#| cuda` cells need no download with those cells switched on."
    results = {}
    for lesson in CUDA_LESSONS:
        r = subprocess.run(["nbdev-test", "--flags", "cuda", lesson], cwd=ROOT, capture_output=True, text=True, timeout=300)
        results[lesson] = "passed" if r.returncode == 0 else "failed: " + (r.stderr or r.stdout).strip()[-600:]
    return results


def markdown(report: dict) -> str:
    "The report as a Markdown table, for BENCHMARKS.md."
    kind = ("dry run at tiny shapes: these numbers test the script, they are not a benchmark" if report["dry_run"]
            else "LLaMA-2-7B shapes, random weights")
    lines = [f"Device: {report['device']} ({kind}); "
             f"all-linear r={RANK}, {report['batch_size']} × {report['seq_len']} tokens, {report['steps']} timed steps; "
             f"command: `{report['command']}`", "",
             "| setup | implementation | tokens/s | s/step | peak GiB (max_memory_allocated) | estimate GiB | peak / estimate |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['setup']} | {r['implementation']} | {r['tokens_per_second']:.0f} | {r['seconds_per_step']:.3f} | "
                     f"{r['peak_bytes'] / 2**30:.2f} | {r['estimate_bytes'] / 2**30:.2f} | {r['peak_bytes'] / r['estimate_bytes']:.2f} |")
    lines += ["", "efficient/peft per path (`lora_kit.bench.run_bench`, 4 blocks of LLaMA-2-7B's width; goal: saved <= 0.75x, "
              "step time <= 1.0x):", "", "| path | dropout | saved for backward | peak memory | step time | goal met |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['path']} | {r['dropout']} | {r['saved_bytes']:.3f} | {r['peak_bytes']:.3f} | {r['step_s']:.3f} | "
              f"{'yes' if r['meets_goal'] else 'no'} |" for r in report.get("paths", [])]
    lines += ["", "`#| cuda` lessons: " + (", ".join(f"{k}: {v.splitlines()[0]}" for k, v in report["cuda_lessons"].items())
                                          or "not run (no GPU)")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check", help="folder for report.json and report.md")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 20 on a GPU, 2 on a CPU)")
    args = p.parse_args(argv)
    from lora_kit.accounting import estimate
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the CPU dry run trains in fp32, as lora_kit does on a CPU
    seq_len, batch_size = (512, 4) if on_gpu else (32, 2)
    steps = args.steps or (20 if on_gpu else 2)
    if not on_gpu: print("gpu-check: no GPU here — a dry run of the same code at tiny shapes on the CPU", flush=True)
    config = base_config(on_gpu)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
                  dry_run=not on_gpu, seq_len=seq_len, batch_size=batch_size, steps=steps,
                  command="make gpu-check", torch=torch.__version__, rows=[])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_base(config, Path(tmp) / "base", device)
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
        for setup, four_bit in (("NF4 QLoRA", True), ("bf16 LoRA" if on_gpu else "fp32 LoRA", False)):
            method = "qlora" if four_bit else "lora"
            est = estimate(config, method, rank=RANK, targets="all-linear", seq_len=seq_len, batch_size=batch_size,
                           precision="bf16" if on_gpu else "fp32", attn="sdpa")
            for name, make in (("lora_kit", lora_kit_model), ("peft + bitsandbytes", peft_model)):
                row = measure(make, folder, four_bit, dtype, ids, steps)
                report["rows"].append(dict(setup=setup, implementation=name, estimate_bytes=est["memory_bytes"]["total"], **row))
                print(f"{setup:10} {name:20} {row['tokens_per_second']:9.0f} tokens/s  peak {row['peak_bytes'] / 2**30:.2f} GiB  "
                      f"estimate {est['memory_bytes']['total'] / 2**30:.2f} GiB", flush=True)
    report["paths"] = measure_paths(on_gpu, device)
    for r in report["paths"]:
        print(f"{r['path']:14} p={r['dropout']}: efficient/peft saved {r['saved_bytes']:.3f}, peak {r['peak_bytes']:.3f}, "
              f"step {r['step_s']:.3f}", flush=True)
    report["cuda_lessons"] = run_cuda_lessons() if on_gpu else {}
    report["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
