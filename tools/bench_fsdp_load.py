"""Peak memory of each process while the main job loads and trains a base: data parallel vs sharded (`--fsdp`).

Builds a random LLaMA with the tiny base's tokenizer in `--work` (hidden 512, 24 layers, vocabulary 4096: 80M parameters,
320 MB in fp32, the blocks 95% of them as in LLaMA-2-7B), then runs `lora-kit finetune` on it under torchrun with 2 processes, twice: data parallel
(every process loads the whole base) and `--fsdp` (the first process loads it, the others build it on the meta device and
receive their shards). Each process records its peak resident memory (`ru_maxrss`) after the job; the table goes to stdout.
Each layout runs with glibc's default allocator and with `MALLOC_MMAP_THRESHOLD_=131072`: by default glibc raises its
mmap threshold after the first large free, so the layers FSDP gathers and frees again come from the heap and stay in the
process's resident memory; with the threshold fixed they are returned.

    python3 tools/bench_fsdp_load.py --work build/bench_fsdp_load
"""
import argparse, json, os, resource, shutil, socket, subprocess, sys
from pathlib import Path

PROCESSES = 2


def build_base(folder: Path):
    "A random LLaMA of 80M parameters, saved with the tiny base's tokenizer."
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from lora_kit.tiny import base_path
    if (folder / "config.json").exists(): return
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=24, num_attention_heads=8,
                         num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(base_path())).save_pretrained(folder)


def worker(base: str, output: str, fsdp: bool, record: str):
    "One process of the job: fine-tune 2 steps, then write this process's peak resident memory."
    from lora_kit.finetune import finetune
    from lora_kit.train import TrainConfig
    finetune(model=base, output=output, eval_examples=2, max_length=64, overwrite=True,
             train=TrainConfig(max_steps=2, batch_size=2, fsdp=fsdp, warmup_steps=0))
    rank = int(os.environ.get("RANK", "0"))
    Path(record, f"rank{rank}.json").write_text(json.dumps(dict(peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run(work: Path, fsdp: bool, allocator: dict) -> list[int]:
    "Each process's peak resident memory for one layout, with the allocator settings `allocator` (environment variables)."
    record = work / (("fsdp" if fsdp else "ddp") + ("-mmap" if allocator else ""))
    shutil.rmtree(record, ignore_errors=True)
    record.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES), "--master_port", str(free_port()),
           __file__, "--worker", "--work", str(work), "--record", str(record), *(["--fsdp"] if fsdp else [])]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **allocator})
    return [json.loads((record / f"rank{r}.json").read_text())["peak_rss_bytes"] for r in range(PROCESSES)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="build/bench_fsdp_load")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.worker: return worker(str(work / "base"), str(work / f"out-{PROCESSES}-{args.fsdp}"), args.fsdp, args.record)
    build_base(work / "base")
    weights = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    print(f"base: {weights / 2**20:,.0f} MiB of weights; {PROCESSES} processes")
    print("| layout | allocator | peak RSS, process 0 | peak RSS, process 1 |\n|---|---|---|---|")
    for allocator in ({}, FIXED_MMAP):
        for fsdp in (False, True):
            peaks = run(work, fsdp, allocator)
            print(f"| {'sharded (--fsdp)' if fsdp else 'data parallel'} | {'MALLOC_MMAP_THRESHOLD_=131072' if allocator else 'glibc default'} | "
                  + " | ".join(f"{b / 2**20:,.0f} MiB" for b in peaks) + " |", flush=True)


if __name__ == "__main__":
    main()
