"""Where a demo fine-tune's time goes (issue 32): one step split into data, forward, backward and optimizer, and the
evaluations around the run, with the cheap alternatives timed in the same process.

    python tools/profile_demo.py --steps 30 --rounds 3 --ops --json build/profile_demo.json

Every phase is timed in rounds that alternate the variants (the machine is shared: compare within a round), median of
the rounds. The default run is 2000 steps plus a loss and an exact-match evaluation before and after training.
`--ops` adds torch.profiler's table of the operators that took the most time over 10 default steps.
"""
import argparse, json, statistics, time
from contextlib import nullcontext
from functools import partial

import torch
from accelerate import Accelerator

from lora_kit.finetune import DEMO_ALPHA, DEMO_RANK, DEMO_TARGETS, FinetuneConfig, prepare_task
from lora_kit.inject import add_lora
from lora_kit.qlora import load_base
from lora_kit.tiny import exact_match
from lora_kit.train import evaluate_loss, loss_sum, make_optimizer, prepare_layers, step_batches


def seconds(fn, rounds:int) -> float:
    "Median wall seconds of `fn()` over `rounds` calls."
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_phases(model, optimizer, scheduler, accelerator, rows, config, collate_fn, steps:int, autocast=nullcontext) -> dict:
    "Median seconds per step of each phase over `steps` optimizer steps (after 3 unmeasured ones), forward under `autocast()`."
    phases = {k: [] for k in ("data", "forward", "backward", "optimizer")}
    for step in range(steps + 3):
        t0 = time.perf_counter()
        batch, = step_batches(rows, step, config, collate_fn, accelerator)
        t1 = time.perf_counter()
        with autocast(): total, n = loss_sum(model, batch)
        t2 = time.perf_counter()
        accelerator.backward(total / n)
        t3 = time.perf_counter()
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        t4 = time.perf_counter()
        if step >= 3:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)): phases[k].append(dt)
    return {k: statistics.median(v) for k, v in phases.items()}


def operator_table(model, optimizer, scheduler, accelerator, task, config, steps:int=10) -> str:
    "torch.profiler's operators by self time over `steps` default steps, matmuls and multiplications by shape."
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step_phases(model, optimizer, scheduler, accelerator, task.train_rows, config, task.collate_fn, steps - 3)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    lines = ["| operator | calls | self ms | share |", "|---|---|---|---|"]
    lines += [f"| {e.key[:50]} | {e.count} | {e.self_cpu_time_total / 1e3:.0f} | {e.self_cpu_time_total / total:.0%} |"
              for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]]
    by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::mul")),
                      key=lambda e: -e.self_cpu_time_total)[:6]
    lines += ["", "| operator, input shapes | self ms | share |", "|---|---|---|"]
    lines += [f"| {e.key} {e.input_shapes[:2]} | {e.self_cpu_time_total / 1e3:.0f} | {e.self_cpu_time_total / total:.0%} |" for e in by_shape]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ops", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    c = FinetuneConfig()
    t0 = time.perf_counter()
    model, tokenizer = load_base(c.model)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    task = prepare_task(c, tokenizer)
    tokenize_s = time.perf_counter() - t0
    torch.manual_seed(0)
    add_lora(model, DEMO_TARGETS, r=DEMO_RANK, alpha=DEMO_ALPHA)
    tc = task.train_config
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    prepare_layers(model, tc)
    optimizer, scheduler = make_optimizer(model, tc)
    model.train()
    out = dict(threads=torch.get_num_threads(), load_base_s=load_s, tokenize_s=tokenize_s, step={}, eval={})
    default = f"fp32, {out['threads']} threads"
    variants = {default: (out["threads"], nullcontext), "fp32, 1 thread": (1, nullcontext),
                f"bf16 autocast, {out['threads']} threads": (out["threads"], partial(torch.autocast, "cpu", dtype=torch.bfloat16))}
    for r in range(a.rounds):
        for name, (threads, autocast) in variants.items():
            torch.set_num_threads(threads)
            phases = step_phases(model, optimizer, scheduler, accelerator, task.train_rows, tc, task.collate_fn, a.steps, autocast)
            out["step"].setdefault(name, []).append(phases)
        torch.set_num_threads(out["threads"])
        for bs in (16, 64):
            out["eval"].setdefault(f"eval loss, batch {bs}", []).append(
                seconds(lambda: evaluate_loss(model, task.eval_rows, task.collate_fn, batch_size=bs), 1))
        model.eval()
        for bs in (32, 100, 200):
            out["eval"].setdefault(f"exact match, batch {bs}", []).append(
                seconds(lambda: exact_match(model, tokenizer, task.eval_conversations, c.template, batch_size=bs), 1))
        model.train()
    summary = {"step": {k: {ph: statistics.median(r[ph] for r in runs) for ph in runs[0]} for k, runs in out["step"].items()},
               "eval": {k: statistics.median(v) for k, v in out["eval"].items()}}
    summary.update(threads=out["threads"], load_base_s=load_s, tokenize_s=tokenize_s)
    default = summary["step"][default]
    step_s = sum(default.values())
    run_s = {"load + tokenize": load_s + tokenize_s, "2000 steps": 2000 * step_s,
             "eval loss ×2": 2 * summary["eval"]["eval loss, batch 16"], "exact match ×2": 2 * summary["eval"]["exact match, batch 32"]}
    summary["default_run_s"] = run_s
    print("| phase | s per step | share of a step |\n|---|---|---|")
    for ph, s in default.items(): print(f"| {ph} | {s:.4f} | {s / step_s:.0%} |")
    for k, phases in summary["step"].items(): print(f"{k}: {sum(phases.values()):.4f} s per step")
    for k, s in summary["eval"].items(): print(f"{k}: {s:.2f} s")
    print("| part of the default run | s | share |\n|---|---|---|")
    for k, s in run_s.items(): print(f"| {k} | {s:.1f} | {s / sum(run_s.values()):.0%} |")
    if a.ops: print(operator_table(model, optimizer, scheduler, accelerator, task, tc))
    if a.json: open(a.json, "w").write(json.dumps(summary, indent=1))


if __name__ == "__main__": main()
