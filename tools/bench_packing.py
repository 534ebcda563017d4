"""Padded vs packed `lora-kit finetune` (issue 32): a variable-length instruction set built from the demo data, and the demo.

    python tools/bench_packing.py --out build/bench_packing            # both tasks, 3 seeds each
    python tools/bench_packing.py --out build/bench_packing --task variable --seeds 0

Each run is one `lora-kit finetune` process, one after another, so peak RSS is per run. A padded and a packed run of
one task see the same examples for the same number of epochs, so the same real tokens; their eval loss is on the same
held-out examples, padded either way. The table goes to stdout as markdown and every run's metrics to `runs.json`.
"""
import argparse, json, os, random, statistics, subprocess, sys
from pathlib import Path

from lora_kit.data import demo_path

PAIRS_PER_EXAMPLE = {1: 0.30, 2: 0.20, 3: 0.12, 4: 0.10, 6: 0.10, 8: 0.08, 10: 0.05, 12: 0.05}  # a long tail, as Alpaca's lengths have


def variable_length_set(source:Path, dest:Path, seed:int=0):
    "Demo pairs joined k at a time (k drawn from `PAIRS_PER_EXAMPLE`): one instruction, k sentences in, k out."
    pairs, rng, rows = [json.loads(l) for l in source.read_text().splitlines()], random.Random(seed), []
    ks, weights = zip(*PAIRS_PER_EXAMPLE.items())
    while pairs:
        k = rng.choices(ks, weights)[0]
        chunk, pairs = pairs[:k], pairs[k:]
        rows.append(dict(instruction=chunk[0]["instruction"], input=" ".join(p["input"] for p in chunk),
                         output=" ".join(p["output"] for p in chunk)))
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def finetune(out:Path, args:list[str]) -> dict:
    "One `lora-kit finetune` run in its own process; its metrics.json."
    env = dict(os.environ, TQDM_DISABLE="1")
    subprocess.run(["lora-kit", "finetune", "--output", str(out), "--overwrite", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def row(name:str, runs:list[dict]) -> str:
    "A table row: each measure's mean over seeds (min–max where it varies)."
    def stat(key, fmt, scale=1.0):
        values = [r[key] * scale for r in runs]
        return fmt.format(statistics.mean(values)) + (f" ({fmt.format(min(values))}–{fmt.format(max(values))})" if len(values) > 1 else "")
    step = [r["train_seconds"] / r["steps"] for r in runs]
    return " | ".join([name, str(runs[0]["steps"]), stat("padding_share", "{:.1%}"), stat("tokens_per_second", "{:,.0f}"),
                       f"{statistics.mean(step):.3f}", stat("peak_memory_bytes", "{:,.0f}", 2**-20), stat("eval_loss_after", "{:.4f}"),
                       stat("eval_accuracy_after", "{:.3f}")])


TASKS = {  # name: (padded args, packed args); the packed rows carry about the padded batch's real tokens per step
    "variable": (["--batch-size", "16"], ["--packing", "--tokens-per-batch", "1536"]),
    "demo": (["--batch-size", "16"], ["--packing", "--tokens-per-batch", "768"]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("build/bench_packing"))
    p.add_argument("--task", choices=[*TASKS, "all"], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    data = {"variable": ["--data", str(a.out / "train.jsonl"), "--eval-data", str(a.out / "eval.jsonl"), "--eval-examples", "50", "--epochs", "3"],
            "demo": ["--epochs", "4", "--eval-examples", "100"]}
    n_train = variable_length_set(Path(demo_path("train")), a.out / "train.jsonl")
    n_eval = variable_length_set(Path(demo_path("eval")), a.out / "eval.jsonl", seed=1)
    print(f"variable-length set: {n_train} train, {n_eval} eval examples", file=sys.stderr)
    runs_path = a.out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    for task in TASKS if a.task == "all" else [a.task]:
        for layout, extra in zip(("padded", "packed"), TASKS[task]):
            for seed in a.seeds:
                key = f"{task}/{layout}/{seed}"
                m = finetune(a.out / key.replace("/", "_"), [*data[task], *extra, "--seed", str(seed)])
                runs[key] = {k: v for k, v in m.items() if k not in ("history", "samples")}
                runs_path.write_text(json.dumps(runs, indent=1))
                print(key, f"{m['train_seconds']:.0f} s", f"loss {m['eval_loss_after']:.4f}", file=sys.stderr)
    print("| task, layout | steps | padding share | real tokens/s | step s | peak RSS MiB | eval loss after | exact match after |")
    print("|---|---|---|---|---|---|---|---|")
    for task in TASKS:
        for layout in ("padded", "packed"):
            done = [r for k, r in runs.items() if k.startswith(f"{task}/{layout}/")]
            if done: print("| " + row(f"{task}, {layout}", done) + " |")


if __name__ == "__main__": main()
