"""What several test files share: a small batch, the logits of a model on it, adapter weights that look trained, peft's
dropout drawing lora_kit's mask, the worst relative error of a set of gradients, the environment of subprocesses, and a
free TCP port.

pytest puts this folder on `sys.path` (it has no `__init__.py`), so a test file imports these with
`from conftest import ...`, `train_worker` (the script subprocess tests run) the same way, and the tools in
`tools/` by their names."""
import os, socket, sys
from pathlib import Path

import torch
from torch import nn

from lora_kit.core import byte_tokenizer
from lora_kit.efficient import dropout_keep_mask, dropout_keep_scale

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "tools"))  # the tests of the tools import them by name (`import readme`)

IDS = byte_tokenizer()(["Selamat pagi, dunia!", "Apa kabar?"], return_tensors="pt", padding=True)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses on 2 cores: one thread each


def logits(model, batch=IDS) -> torch.Tensor:
    "`model`'s logits on `batch` (a tokenizer's output, or a tensor of token ids), without a graph."
    with torch.no_grad(): return (model(input_ids=batch) if torch.is_tensor(batch) else model(**batch)).logits


def randomize_B(model, seed:int=0, std:float=0.05):
    "Fill every `lora_B` with N(0, std²) (B starts at zero, so an untrained adapter changes nothing): a trained-looking adapter."
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.normal_(std=std)


class SameMaskDropout(nn.Module):
    "Dropout drawing its mask exactly as the lean path does, so peft sees the same masks from the same seed."
    def __init__(self, p): super().__init__(); self.p = p
    def forward(self, x): return x * dropout_keep_mask(x.shape, self.p, x.device) * dropout_keep_scale(self.p)


def worst_error(grads:dict, exact:dict) -> float:
    "The largest relative error ‖g - exact‖ / ‖exact‖ over the tensors of `exact`."
    return max(((grads[n] - exact[n]).norm() / exact[n].norm()).item() for n in exact)


def free_port() -> int:
    "A TCP port nobody listens on now (a fixed one collides with a second test run on the same machine)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
