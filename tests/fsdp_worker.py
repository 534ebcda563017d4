"""Trains adapters on fixed data, sharded with FSDP2 (`TrainConfig(fsdp=True)`) under `torchrun`, or as one plain process.

Each process writes `rank{N}/result.json`: the losses, the world size, the parameter bytes it holds after sharding
(`local_parameter_bytes`) against the whole base's, the trained parameters' dtypes, the adapter layers that fell back to
the plain path, and the largest output the head made (0: the chunked loss never built logits), and rank 0 writes the trained adapter in peft's format to `adapter/`
(gathered whole from the shards). The base is the tiny random LLaMA (fp32 or bf16 precision), or with `--four-bit` the
shipped tiny base in NF4 with its packed codes stored in the dtype FSDP gathers in."""
import argparse, json
from pathlib import Path

import torch

from lora_kit.core import tiny_llama
from lora_kit.inject import add_lora, plain_path_reasons, save_adapter
from lora_kit.train import TrainConfig, fsdp_dtype, gathered, local_parameter_bytes, train
from train_worker import examples


def base(four_bit: bool, precision: str, storage: str | None):
    "The model to adapt: the tiny random LLaMA, or the shipped tiny base in 4 bits (codes stored as `storage`)."
    if not four_bit: return tiny_llama(hidden_size=64, intermediate_size=192, vocab_size=4096)
    from lora_kit.qlora import load_4bit
    from lora_kit.tiny import base_path
    dtype = fsdp_dtype(precision)
    return load_4bit(str(base_path()), compute_dtype=dtype, quant_storage=getattr(torch, storage) if storage else dtype)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--precision", default="no")
    p.add_argument("--four-bit", action="store_true")
    p.add_argument("--quant-storage", default=None, help="the 4-bit codes' dtype (default: the one FSDP gathers in)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dora", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args(argv)
    model = base(args.four_bit, args.precision, args.quant_storage)
    whole = sum(p.nbytes for p in model.parameters())
    torch.manual_seed(0)
    add_lora(model, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8, use_dora=args.dora)
    cfg = TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=5e-3, warmup_steps=1,
                      precision=args.precision, fsdp=args.fsdp, save_every=args.save_every,
                      grad_checkpointing=args.grad_checkpointing)
    head_outputs = [0]
    model.lm_head.register_forward_hook(lambda module, inputs, out: head_outputs.append(out.numel()))
    result = train(model, examples(), config=cfg, output_dir=args.out, resume_from=args.out if args.resume else None)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = Path(args.out) / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    held = local_parameter_bytes(model)
    with gathered(model):  # every process gathers; the first one writes
        if rank == 0: save_adapter(model, Path(args.out) / "adapter")
    (out / "result.json").write_text(json.dumps({"losses": [h["loss"] for h in result["history"]], "world_size": result["world_size"],
                                                 "held_bytes": held, "whole_bytes": whole, "plain_path": plain_path_reasons(model),
                                                 "trained_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
                                                 "largest_head_output": max(head_outputs)}))


if __name__ == "__main__":
    main()
