"""Trains the tiny LLaMA's adapters on fixed data; run directly or under `torchrun` by the training tests.

Each process writes `rank{N}/adapter.safetensors` and `rank{N}/result.json`: the losses, the world size, and the largest
activation training made: the biggest tensor autograd saved for backward (`SavedTensorLog`, parameters left out) and the
biggest output of the output head (a forward hook), so a test can tell whether the full logits were ever built."""
import argparse, json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_kit.core import byte_tokenizer, tiny_llama
from lora_kit.efficient import SavedTensorLog
from lora_kit.inject import adapter_state_dict, add_lora
from lora_kit.train import TrainConfig, train

WORDS = ("apel", "buku", "kucing", "rumah", "sepeda", "pisang", "meja", "kursi", "jendela", "pintu", "air")


def examples():
    tok = byte_tokenizer()
    out = []
    for w in WORDS:
        p, r = tok(f"Ulangi: {w} =>")["input_ids"], tok(f" {w}", add_special_tokens=False)["input_ids"] + [2]
        out.append(dict(input_ids=p + r, labels=[-100] * len(p) + r))
    return out


def packed(max_length: int) -> list[dict]:
    "`examples()` packed whole into rows of `max_length` tokens, with positions restarting at each example."
    from datasets import Dataset
    from lora_kit.data import pack
    return pack(Dataset.from_list(examples()), max_length).to_list()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the byte tokenizer's")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--loraplus-ratio", type=float, default=1.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--pack", type=int, default=0, help="pack the examples whole into rows of this many tokens (lora_kit.data.pack)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    vocab = {} if args.vocab_size is None else dict(vocab_size=args.vocab_size)
    model = add_lora(tiny_llama(hidden_size=args.hidden, intermediate_size=3 * args.hidden, **vocab), "all-linear",
                     r=4, alpha=8, dropout=args.dropout)
    head_numels = [0]
    model.lm_head.register_forward_hook(lambda module, inputs, out: head_numels.append(out.numel()))
    cfg = TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=5e-3,
                      loraplus_lr_ratio=args.loraplus_ratio, warmup_steps=1, save_every=args.save_every)
    with SavedTensorLog(model) as saved:
        result = train(model, packed(args.pack) if args.pack else examples(), config=cfg, output_dir=args.out, resume_from=args.out if args.resume else None)
    # parameters as they are now: under data parallel their storage moves after `SavedTensorLog` looked them up
    params = {(t.device, t.untyped_storage().data_ptr()) for t in (*model.parameters(), *model.buffers())}
    activations = [r for r in saved.unique(include_params=True) if r.storage not in params]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = Path(args.out) / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model.module if hasattr(model, "module") else model), out / "adapter.safetensors")
    (out / "result.json").write_text(json.dumps({"losses": [h["loss"] for h in result["history"]],
                                                 "world_size": result["world_size"],
                                                 "largest_saved_bytes": max((r.nbytes for r in activations), default=0),
                                                 "largest_head_output": max(head_numels)}))


if __name__ == "__main__":
    main()
