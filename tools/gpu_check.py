"""`make gpu-check`: the prepared measurement for the first machine with a GPU (no network there, nothing from the Hub).

On a lent GPU machine (no package index; its own torch, transformers and peft) `make gpu-check` runs this with
`--wheels build/gpu-wheels` (made here by `make gpu-bundle`): the bundled wheels of what the machine lacks are
installed without an index or dependencies into a folder of their own (`build/gpu-site`), each one only when the
machine has no package of that name, so nothing of the machine's is replaced; lora_kit is imported from the checkout.
Then the phases run in order of value, each printing its result as soon as it has one, the report rewritten after
each (so a run cut short still leaves one):

(a) `environment`: GPU, compute capability, free memory, versions, what the bundle installed and what was kept;
(b) `estimates`: `default_compute_dtype` and `lora_kit.accounting.estimate` for each row of (d);
(c) `loftq`: issue 31's check, the kit's LoftQ (`add_lora(init_lora_weights="loftq")`) against peft's `LoftQConfig`
    (which runs only on CUDA) on the shipped base, all linear layers at 4 bits: each layer's start error
    ‖W − (Q + s·BA)‖/‖W‖ for both and the largest gap between the two merged weights, at s = 1 and at s = 2;
(d) `training`: LLaMA-2-7B with random weights, built in bf16 on the GPU and written once (the time measured) to
    memory-backed /dev/shm where it fits, else the temporary folder; NF4 QLoRA and bf16 LoRA, all linear layers at
    r=16, 512 tokens × batch 4, for lora_kit and for peft + bitsandbytes, and full fine-tuning in bf16 (the study's
    comparison of lesson 19 at 7B shapes): tokens per second over the timed steps and `torch.cuda.max_memory_allocated`
    against the estimate;
(e) `paths`: issue 18's comparison, `lora_kit.bench.run_bench` on the fp32, autocast and qlora paths, lora_kit's
    lean layer + chunked loss against peft (4 blocks of LLaMA-2-7B's width, one interleaved run);
(f) `cuda_lessons`: the lessons whose `#| cuda` cells need no download, run with execnb as `nbdev-test` runs them;
(g) `sharded`: issue 34's check, `tests/fsdp_worker.py` under torchrun with FSDP2 over 2 GPUs (nccl, bf16) against one
    plain GPU process on the same global batch: the largest loss gap and each process's parameter bytes; skipped, saying
    so, on a machine with one GPU (the CPU dry run shards over 2 CPU processes, gloo, fp32).

`--budget SECONDS` (default 480, inside one 10-minute command) stops starting phases when the next one's expected time
would not fit in what is left; the report names each skipped phase and why. It writes `report.json` and `report.md`
(a table for BENCHMARKS.md) to `--out` (default: `$OUT` where that is set, as on a lent machine, else `gpu-check`).

Without a GPU it runs the same code at tiny shapes on the CPU (a dry run, said so in the report): `make gpu-rehearsal`
runs it so on a stand-in of the GPU machine, offline, from the bundle.
"""
import argparse, gc, json, os, platform, shutil, subprocess, sys, tempfile, time, traceback
from pathlib import Path

import torch

from gpu_bundle import local_version  # the installed version of a distribution, or None

ROOT = Path(__file__).resolve().parent.parent
CUDA_LESSONS = ("nbs/00_core.ipynb", "nbs/04_accounting.ipynb")  # their `#| cuda` cells need no download
RANK, ALPHA, DROPOUT = 16, 32, 0.05
# Seconds each phase is expected to take: (on the H200, on a 2-core CPU dry run). The CPU ones are the rehearsal's
# measured times (README, "On a GPU"); the GPU ones are estimates until a lent machine has run the check.
EXPECTED_SECONDS = dict(environment=(5, 1), estimates=(5, 2), training=(360, 12), paths=(150, 10), cuda_lessons=(150, 60),
                        loftq=(30, 5), sharded=(90, 40))
VERSIONS_OF = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "safetensors", "tokenizers",
               "numpy", "execnb", "fastcore")


# ---------------------------------------------------------------- the bundle

def install_bundle(wheels: Path, site: Path) -> dict:
    """Install the bundle's wheels that this Python lacks into `site`, offline and without dependencies, and put `site`
    and the checkout (lora_kit) on the import path of this process and of the processes it starts."""
    manifest = json.loads((wheels / "manifest.json").read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != here:
        sys.exit(f"gpu-check: {wheels} holds wheels for Python {manifest['python_version']}, this is Python {here}: "
                 f"make the bundle for it (python tools/gpu_bundle.py --python-version {here})")
    kept = {w["name"]: v for w in manifest["wheels"] if (v := local_version(w["name"]))}
    new = [w for w in manifest["wheels"] if w["name"] not in kept]
    if site.exists(): shutil.rmtree(site)
    if new:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--disable-pip-version-check", "--target", str(site), *[str(wheels / w["file"]) for w in new]],
                           capture_output=True, text=True, timeout=1200)
        if r.returncode: sys.exit(f"gpu-check: installing the bundle failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    paths = [str(ROOT), str(site)]
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return dict(installed=sorted(w["file"] for w in new), kept_the_machines=kept)


# ---------------------------------------------------------------- the measurements

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
    "lora_kit's path: `load_base`, adapters on every linear layer (on their default lean path) and the chunked loss."
    from lora_kit.bench import chunked_loss
    from lora_kit.finetune import load_base
    from lora_kit.inject import add_lora
    model, _ = load_base(str(folder), four_bit=four_bit, dtype=dtype)
    add_lora(model, "all-linear", r=RANK, alpha=ALPHA, dropout=DROPOUT)
    return model, chunked_loss


def full_model(folder: Path, four_bit: bool, dtype):
    "Full fine-tuning, the study's baseline: `load_base` with every weight trainable (AdamW's states in the weights' dtype)."
    from lora_kit.bench import chunked_loss
    from lora_kit.finetune import load_base
    model, _ = load_base(str(folder), dtype=dtype)
    return model.requires_grad_(True), chunked_loss


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
    from lora_kit.bench import TINY_MODEL, BenchConfig, path_summary, run_bench
    config = BenchConfig(methods=("peft", "efficient"), paths=("fp32", "autocast", "qlora"), dropouts=(0.05, 0.0),
                         repeats=5 if on_gpu else 1, batch_size=4 if on_gpu else 2, seq_len=512 if on_gpu else 32,
                         device=device, inference=False)
    result = run_bench(config, PATHS_MODEL_GPU if on_gpu else TINY_MODEL)
    return path_summary(result)


def scratch_folder(nbytes: int) -> str | None:
    "/dev/shm (memory, no disk writes) when it has room for `nbytes` and a margin, else None (the temporary folder)."
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * nbytes else None


def run_cuda_lessons(timeout: int = 300) -> dict:
    "Each lesson of `CUDA_LESSONS` alone in an empty folder with its `#| cuda` cells on, through execnb: {lesson: result}."
    results = {}
    for lesson in CUDA_LESSONS:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / Path(lesson).name
            shutil.copy(ROOT / lesson, copy)
            cmd = [sys.executable, str(ROOT / "tools" / "run_lessons.py"), "--worker", str(copy)]
            try:
                r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout,
                                   env={**os.environ, "IN_TEST": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
                results[lesson] = "passed" if r.returncode == 0 else "failed: " + (r.stderr or r.stdout).strip()[-600:]
            except subprocess.TimeoutExpired: results[lesson] = f"failed: timed out after {timeout} s"
    return results


# ---------------------------------------------------------------- the phases

class PhaseSkipped(Exception):
    "A phase this machine cannot run; the message says why."


class PhaseFailed(Exception):
    "A phase that failed with a result worth reporting all the same."
    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result


def phase_environment(ctx: dict) -> dict:
    "The machine: GPU, compute capability, memory, Python and package versions."
    env = dict(python=platform.python_version(), cpus=os.cpu_count(),
               versions={n: local_version(n) for n in VERSIONS_OF}, bundle=ctx.get("bundle"))
    import lora_kit
    env["versions"]["lora_kit"] = f"{lora_kit.__version__} (from {Path(lora_kit.__file__).parent.parent.name})"
    if ctx["on_gpu"]:
        free, total = torch.cuda.mem_get_info()
        env.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                   cuda=torch.version.cuda, free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1))
    return env


def phase_estimates(ctx: dict) -> dict:
    "`default_compute_dtype` here, and the estimate of each training row's memory (by kind) and FLOPs."
    from lora_kit.accounting import estimate
    from lora_kit.qlora import default_compute_dtype
    rows = {}
    for setup, method in ctx["setups"]:
        est = estimate(ctx["config"], method=method, rank=RANK, targets="all-linear", seq_len=ctx["seq_len"],
                       batch_size=ctx["batch_size"], precision="bf16" if ctx["on_gpu"] else "fp32", attn="sdpa")
        rows[setup] = dict(memory_gib={k: round(v / 2**30, 3) for k, v in est["memory_bytes"].items()},
                           flops_per_step=est["flops_per_step"], trainable_params=est["params_trainable"])
        ctx.setdefault("estimate_bytes", {})[setup] = est["memory_bytes"]["total"]
    return dict(default_compute_dtype=str(default_compute_dtype()).removeprefix("torch."), rows=rows)


def phase_training(ctx: dict) -> dict:
    "The random base written once (timed), then each setup for lora_kit and peft: tokens/s and peak memory."
    config, device, dtype = ctx["config"], ctx["device"], ctx["dtype"]
    from lora_kit.core import meta_llama
    nbytes = 2 * sum(p.numel() for p in meta_llama(config).parameters())  # bf16 on disk
    rows = []
    with tempfile.TemporaryDirectory(dir=scratch_folder(nbytes)) as tmp:
        start = time.perf_counter()
        folder = save_random_base(config, Path(tmp) / "base", device)
        written = dict(seconds=round(time.perf_counter() - start, 1), gib=round(nbytes / 2**30, 2),
                       where="/dev/shm (memory)" if tmp.startswith("/dev/shm") else "temporary folder (disk)")
        print(f"  random base built and written in {written['seconds']} s ({written['gib']} GiB, {written['where']})", flush=True)
        ids = torch.randint(0, config.vocab_size, (ctx["batch_size"], ctx["seq_len"]), device=device)
        for setup, method in ctx["setups"]:
            makers = (("transformers", full_model),) if method == "full" else \
                (("lora_kit", lora_kit_model), ("peft + bitsandbytes", peft_model))
            for name, make in makers:
                try: row = measure(make, folder, method == "qlora", dtype, ids, ctx["steps"])
                except torch.cuda.OutOfMemoryError as e:  # full fine-tuning may not fit: the row says so, the rest still run
                    rows.append(dict(setup=setup, implementation=name, error=f"out of memory: {str(e).splitlines()[0]}"))
                    print(f"  {setup:10} {name:20} out of memory", flush=True); gc.collect(); torch.cuda.empty_cache()
                    continue
                est = ctx.get("estimate_bytes", {}).get(setup)
                rows.append(dict(setup=setup, implementation=name, estimate_bytes=est, **row))
                print(f"  {setup:10} {name:20} {row['tokens_per_second']:9.0f} tokens/s  peak {row['peak_bytes'] / 2**30:.2f} GiB"
                      + (f"  estimate {est / 2**30:.2f} GiB" if est else ""), flush=True)
    return dict(base_written=written, rows=rows)


def phase_paths(ctx: dict) -> dict:
    "efficient/peft per path: saved-for-backward bytes, peak memory and step time as ratios."
    rows = measure_paths(ctx["on_gpu"], ctx["device"])
    for r in rows:
        print(f"  {r['path']:14} p={r['dropout']}: efficient/peft saved {r['saved_bytes']:.3f}, peak {r['peak_bytes']:.3f}, "
              f"step {r['step_s']:.3f}", flush=True)
    return dict(rows=rows)


def phase_cuda_lessons(ctx: dict) -> dict:
    "The `#| cuda` lessons (on a CPU their GPU cells say so and skip, the rest of each lesson runs)."
    results = run_cuda_lessons()
    for k, v in results.items(): print(f"  {k}: {v.splitlines()[0]}", flush=True)
    if failed := [k for k, v in results.items() if v != "passed"]: raise PhaseFailed(f"{', '.join(failed)} failed", results)
    return results


def linear_weights(model) -> dict:
    "Each `nn.Linear` weight of a plain model but the head, by name, in fp32 on the CPU."
    return {n: m.weight.detach().float().cpu() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def start_errors(original: dict, merged: dict) -> torch.Tensor:
    "Each layer's ‖W − (Q + s·BA)‖/‖W‖: the merged start against the original weight."
    return torch.tensor([float((original[n] - merged[n]).norm() / original[n].norm()) for n in original])


def phase_loftq(ctx: dict) -> dict:
    """The kit's LoftQ against peft's on the shipped base (all linear layers, 4 bits, r = 16): start errors, and the gap
    between the merged weights. peft's fits B·A without the scale s = alpha/r, so it matches the kit only at s = 1."""
    from peft import LoftQConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from lora_kit.inject import add_lora, remove_lora
    from lora_kit.tiny import base_path
    base = lambda: AutoModelForCausalLM.from_pretrained(base_path(), dtype=torch.float32)
    original, rows = linear_weights(base()), []
    for alpha, iters in ((RANK, 1), (RANK, 5), (2 * RANK, 5)):
        kit = linear_weights(remove_lora(add_lora(base(), "all-linear", r=RANK, alpha=alpha, init_lora_weights="loftq",
                                                  loftq_bits=4, loftq_iter=iters)))
        row = dict(scale=alpha / RANK, iters=iters, kit_error=round(float(start_errors(original, kit).mean()), 5))
        if ctx["on_gpu"]:
            config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules="all-linear", init_lora_weights="loftq",
                                loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iters))
            theirs = linear_weights(get_peft_model(base(), config).merge_and_unload())
            row.update(peft_error=round(float(start_errors(original, theirs).mean()), 5),
                       max_gap=float(max((kit[n] - theirs[n]).abs().max() for n in kit)))
        else: row.update(peft_error=None, max_gap=None)  # peft's loftq_init moves each weight to "cuda"
        rows.append(row)
        print(f"  s={row['scale']:g} T={iters}: mean start error kit {row['kit_error']}, peft {row['peft_error']}, "
              f"max |kit - peft| {row['max_gap']}", flush=True)
    return dict(layers=len(original), rows=rows)


def phase_sharded(ctx: dict) -> dict:
    "FSDP2 over 2 processes against one plain process, same global batch: the loss gap and the bytes each process holds."
    gpus = torch.cuda.device_count() if ctx["on_gpu"] else 0
    if ctx["on_gpu"] and gpus < 2: raise PhaseSkipped(f"needs two GPUs; this machine has {gpus}")
    worker, precision = ROOT / "tests" / "fsdp_worker.py", "bf16" if ctx["on_gpu"] else "no"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    with tempfile.TemporaryDirectory() as tmp:
        plain = [sys.executable, str(worker), f"{tmp}/plain", "--grad-accum", "2", "--precision", precision]
        sharded = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), f"{tmp}/sharded", "--fsdp",
                   "--precision", precision]
        for cmd in (plain, sharded): subprocess.run(cmd, cwd=worker.parent, env=env, check=True, timeout=300, capture_output=True)
        read = lambda run: [json.loads(p.read_text()) for p in sorted(Path(tmp, run).glob("rank*/result.json"))]
        (alone,), ranks = read("plain"), read("sharded")
    gap = max(abs(a - b) for a, b in zip(alone["losses"], ranks[0]["losses"], strict=True))
    result = dict(processes=len(ranks), backend="nccl" if ctx["on_gpu"] else "gloo (CPU)", precision=precision, max_loss_gap=gap,
                  held_share=[round(r["held_bytes"] / r["whole_bytes"], 4) for r in ranks], losses=ranks[0]["losses"])
    print(f"  2 processes ({result['backend']}): largest loss gap {gap:.2e}, each holds {result['held_share']} of the base", flush=True)
    return result


PHASES = (("environment", phase_environment), ("estimates", phase_estimates), ("loftq", phase_loftq),
          ("training", phase_training), ("paths", phase_paths), ("cuda_lessons", phase_cuda_lessons),
          ("sharded", phase_sharded))


def run_phases(ctx: dict, budget: float, write, phases=PHASES, expected_seconds=EXPECTED_SECONDS,
               clock=time.perf_counter) -> dict:
    """Run `phases` in order while the next one's expected time fits in what is left of `budget` seconds; `write(report)`
    after each. A phase that fails is reported with its error and the next one still runs."""
    report, start = ctx["report"], clock()
    for name, phase in phases:
        left = budget - (clock() - start)
        expected = expected_seconds[name][0 if ctx["on_gpu"] else 1]
        if expected > left:
            report["phases"][name] = dict(status="skipped", reason=f"expected ~{expected} s, {max(left, 0):.0f} s of the "
                                                                   f"{budget:.0f} s budget left")
            print(f"gpu-check: {name} skipped: {report['phases'][name]['reason']}", flush=True)
        else:
            print(f"gpu-check: {name} ...", flush=True)
            t0 = clock()
            try: report["phases"][name] = dict(status="done", result=phase(ctx))
            except PhaseSkipped as e:
                report["phases"][name] = dict(status="skipped", reason=str(e))
                print(f"gpu-check: {name} skipped: {e}", flush=True)
            except PhaseFailed as e:
                report["phases"][name] = dict(status="failed", error=str(e), result=e.result)
                print(f"gpu-check: {name} FAILED: {e}", flush=True)
            except Exception as e:
                report["phases"][name] = dict(status="failed", error=f"{type(e).__name__}: {e}",
                                              traceback=traceback.format_exc()[-3000:])
                print(f"gpu-check: {name} FAILED: {type(e).__name__}: {e}", flush=True)
            report["phases"][name]["seconds"] = round(clock() - t0, 1)
            print(f"gpu-check: {name} {report['phases'][name]['status']} in {report['phases'][name]['seconds']} s", flush=True)
            gc.collect()
            if ctx["on_gpu"]: torch.cuda.empty_cache()
        write(report)
    report["seconds"] = round(clock() - start, 1)
    write(report)
    return report


# ---------------------------------------------------------------- the report

def markdown(report: dict) -> str:
    "The report as Markdown, for BENCHMARKS.md: the phases and their times, then each phase's table."
    kind = ("dry run at tiny shapes: these numbers test the script, they are not a benchmark" if report["dry_run"]
            else "LLaMA-2-7B shapes, random weights")
    ph = report["phases"]
    lines = [f"Device: {report['device']} ({kind}); command: `{report['command']}`; budget {report['budget']} s", "",
             "| phase | status | seconds | note |", "|---|---|---:|---|"]
    for name, _ in PHASES:
        p = ph.get(name, dict(status="not asked (--only)"))
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', '')} | {p.get('reason') or p.get('error', '')} |")
    env = ph.get("environment", {}).get("result")
    if env:
        lines += ["", "Environment: " + "; ".join(f"{k} {v}" for k, v in env.items() if k not in ("versions", "bundle")),
                  "", "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)]
    est = ph.get("estimates", {}).get("result")
    if est: lines += ["", f"`default_compute_dtype()`: {est['default_compute_dtype']}"]
    train = ph.get("training", {}).get("result")
    if train:
        w = train["base_written"]
        lines += ["", f"Random base written once in {w['seconds']} s ({w['gib']} GiB, {w['where']}); all-linear r={RANK}, "
                  f"{report['batch_size']} × {report['seq_len']} tokens, {report['steps']} timed steps", "",
                  "| setup | implementation | tokens/s | s/step | peak GiB (max_memory_allocated) | estimate GiB | peak / estimate |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in train["rows"]:
            if "error" in r:
                lines.append(f"| {r['setup']} | {r['implementation']} | {r['error']} | | | | |"); continue
            e = r["estimate_bytes"]
            against = f"{e / 2**30:.3g} | {r['peak_bytes'] / e:.2f}" if e else " | "  # no estimate when that phase was skipped
            lines.append(f"| {r['setup']} | {r['implementation']} | {r['tokens_per_second']:.0f} | {r['seconds_per_step']:.3f} | "
                         f"{r['peak_bytes'] / 2**30:.3g} | {against} |")
    paths = ph.get("paths", {}).get("result")
    if paths:
        lines += ["", "efficient/peft per path (`lora_kit.bench.run_bench`, 4 blocks of LLaMA-2-7B's width; goal: saved <= 0.75x, "
                  "step time <= 1.0x):", "", "| path | dropout | saved for backward | peak memory | step time | goal met |",
                  "|---|---|---:|---:|---:|---|"]
        lines += [f"| {r['path']} | {r['dropout']} | {r['saved_bytes']:.3f} | {r['peak_bytes']:.3f} | {r['step_s']:.3f} | "
                  f"{'yes' if r['meets_goal'] else 'no'} |" for r in paths["rows"]]
    lessons = ph.get("cuda_lessons", {}).get("result")
    if lessons: lines += ["", "`#| cuda` lessons: " + ", ".join(f"{k}: {v.splitlines()[0]}" for k, v in lessons.items())]
    loftq = ph.get("loftq", {}).get("result")
    if loftq:
        lines += ["", f"LoftQ on the shipped base, {loftq['layers']} linear layers, 4 bits, r={RANK}: mean start error "
                  "‖W − (Q + s·BA)‖/‖W‖ (QLoRA's start is the T = 0 error) and the largest |kit − peft| of the merged weights "
                  "(peft's runs only on CUDA):", "", "| s = alpha/r | iterations | kit | peft | max gap |", "|---:|---:|---:|---:|---:|"]
        for r in loftq["rows"]:
            peft = "needs CUDA | " if r["peft_error"] is None else f"{r['peft_error']} | {r['max_gap']:.2e}"
            lines.append(f"| {r['scale']:g} | {r['iters']} | {r['kit_error']} | {peft} |")
    sharded = ph.get("sharded", {}).get("result")
    if sharded:
        lines += ["", f"FSDP2 over {sharded['processes']} processes ({sharded['backend']}, {sharded['precision']}) against one plain "
                  f"process, same global batch: largest loss gap {sharded['max_loss_gap']:.2e}; each process holds "
                  f"{', '.join(f'{x:.1%}' for x in sharded['held_share'])} of the base's parameter bytes"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check", help="folder for report.json and report.md")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 20 on a GPU, 2 on a CPU)")
    p.add_argument("--budget", type=float, default=480, help="seconds: no phase starts that is expected to run past it")
    p.add_argument("--wheels", type=Path, help="install this bundle (make gpu-bundle) first, offline")
    p.add_argument("--only", help="comma-separated phases to run, of: " + ", ".join(n for n, _ in PHASES))
    args = p.parse_args(argv)
    asked = args.only.split(",") if args.only else [n for n, _ in PHASES]
    if unknown := sorted(set(asked) - {n for n, _ in PHASES}):
        p.error(f"--only: no phase {', '.join(unknown)}; the phases are {', '.join(n for n, _ in PHASES)}")
    started = time.perf_counter()
    bundle = install_bundle(args.wheels.resolve(), ROOT / "build" / "gpu-site") if args.wheels else None
    on_gpu = torch.cuda.is_available()
    if not on_gpu: print("gpu-check: no GPU here — a dry run of the same code at tiny shapes on the CPU", flush=True)
    seq_len, batch_size = (512, 4) if on_gpu else (32, 2)
    ctx = dict(on_gpu=on_gpu, device="cuda" if on_gpu else "cpu", bundle=bundle, seq_len=seq_len, batch_size=batch_size,
               dtype=torch.bfloat16 if on_gpu else torch.float32,  # the CPU dry run trains in fp32, as lora_kit does on a CPU
               steps=args.steps or (20 if on_gpu else 2), config=base_config(on_gpu),
               setups=(("NF4 QLoRA", "qlora"), ("bf16 LoRA" if on_gpu else "fp32 LoRA", "lora"),
                       ("bf16 full" if on_gpu else "fp32 full", "full")))  # the study's three, full fine-tuning last (most memory)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    ctx["report"] = dict(device=torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
                         dry_run=not on_gpu, seq_len=seq_len, batch_size=batch_size, steps=ctx["steps"], budget=args.budget,
                         command="make gpu-check", torch=torch.__version__,
                         bundle_seconds=round(time.perf_counter() - started, 1), phases={})
    def write(report):
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "report.md").write_text(markdown(report))
    report = run_phases(ctx, args.budget, write, [(n, f) for n, f in PHASES if n in asked])
    print(markdown(report))
    return 1 if any(p["status"] == "failed" for p in report["phases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
