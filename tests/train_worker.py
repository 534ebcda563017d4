"Trains the tiny LLaMA's adapters on fixed data; run directly or under `torchrun` by tests/test_train.py."
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_kit.core import byte_tokenizer, tiny_llama
from lora_kit.inject import adapter_state_dict, add_lora
from lora_kit.train import TrainConfig, train


def examples():
    tok = byte_tokenizer()
    out = []
    for w in ("apel", "buku", "kucing", "rumah", "sepeda", "pisang", "meja", "kursi", "jendela", "pintu", "air"):
        p, r = tok(f"Ulangi: {w} =>")["input_ids"], tok(f" {w}", add_special_tokens=False)["input_ids"] + [2]
        out.append(dict(input_ids=p + r, labels=[-100] * len(p) + r))
    return out


def main(out_dir, batch_size, grad_accum):
    torch.manual_seed(0)
    model = add_lora(tiny_llama(), "all-linear", r=4, alpha=8)
    cfg = TrainConfig(max_steps=6, batch_size=batch_size, grad_accum=grad_accum, lr=5e-3, warmup_steps=1)
    result = train(model, examples(), config=cfg)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = Path(out_dir) / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model.module if hasattr(model, "module") else model), out / "adapter.safetensors")
    (out / "result.json").write_text(json.dumps({"losses": [h["loss"] for h in result["history"]],
                                                 "world_size": result["world_size"]}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
