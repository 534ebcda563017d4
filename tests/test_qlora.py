"The whole QLoRA path on CPU: 4-bit load, lora_kit adapters, training, save, reload, peft interop."
import subprocess, sys

import pytest, torch

pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra")
from peft import PeftModel

from lora_kit.core import byte_tokenizer, count_params, tiny_llama
from lora_kit.inject import add_lora, load_adapter, merge_lora, save_adapter
from lora_kit.qlora import load_4bit, nf4_levels, prepare_for_kbit_training

BATCH = byte_tokenizer()(["Saya suka membaca buku.", "Ibu memasak nasi goreng di dapur."], return_tensors="pt", padding=True)
LABELS = BATCH["input_ids"].masked_fill(BATCH["attention_mask"] == 0, -100)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    tiny_llama(num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    return str(path)


def logits(model):
    with torch.no_grad(): return model(**BATCH).logits


def test_train_save_reload_same_logits(checkpoint, tmp_path):
    model = prepare_for_kbit_training(load_4bit(checkpoint), gradient_checkpointing=True)
    add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=8, alpha=16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**BATCH, labels=LABELS).loss
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    save_adapter(model, tmp_path)
    reloaded = load_adapter(load_4bit(checkpoint), tmp_path)
    assert (logits(reloaded) - logits(model)).abs().max() < 1e-5
    # peft reads the same folder onto its own 4-bit base and computes the same logits
    theirs = PeftModel.from_pretrained(load_4bit(checkpoint), tmp_path)
    assert (logits(theirs) - logits(model)).abs().max() < 1e-4


def test_4bit_model_counts_and_quantizes_every_linear_but_the_head(checkpoint):
    import bitsandbytes as bnb
    model = load_4bit(checkpoint)
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") is torch.nn.Linear
    assert set(linears.values()) == {bnb.nn.Linear4bit}
    assert count_params(model) == count_params(tiny_llama())


def test_merge_into_4bit_is_refused(checkpoint):
    model = add_lora(load_4bit(checkpoint), ["q_proj"], r=4)
    with pytest.raises(ValueError, match="Load the base in 16 or 32 bits"): merge_lora(model)


def test_nf4_levels_match_bitsandbytes():
    import bitsandbytes.functional as F
    assert torch.allclose(nf4_levels(), F.get_4bit_type("nf4", device="cpu"), atol=1e-4)


MISSING = """import sys; sys.modules['bitsandbytes'] = None
from lora_kit.core import MissingExtraError
from lora_kit.qlora import load_4bit
try: load_4bit('x')
except MissingExtraError as e: print(isinstance(e, ImportError), e)
"""


def test_missing_bitsandbytes_is_the_kits_error_and_says_how_to_install():
    r = subprocess.run([sys.executable, "-c", MISSING], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("True ") and "pip install 'lora_kit[qlora]'" in r.stdout, r.stdout
