"""The GPU path, exercised on the CPU: lesson 13's QLoRA code at LLaMA-2-7B layer shapes, and a LLaMA-2-style tokenizer.

LLaMA-2-7B's real config with two decoder layers instead of 32 (random weights, ~0.7B parameters): every weight
shape and dtype of the 7B path — 4096-wide attention, the 11008-wide MLP, the 32000-token vocabulary, NF4 blocks —
runs here through `load_base(four_bit=True)`, `add_lora("all-linear", r=16)`, `train`, `save_adapter` and
`open_adapter`, so nothing on that path runs for the first time in Colab.
"""
import json, math
from functools import partial

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra: pip install 'lora_kit[qlora]'")
from lora_kit.core import llama2_config
from lora_kit.data import collate, demo_path, llama2_style_tokenizer, load_instructions, tokenize_dataset
from lora_kit.qlora import load_base, open_adapter
from lora_kit.inject import add_lora, adapter_layers, save_adapter
from lora_kit.qlora import prepare_for_kbit_training
from lora_kit.train import TrainConfig, train


@pytest.fixture(scope="module")
def base_7b_shapes(tmp_path_factory):
    "A saved LLaMA-2-7B-shaped checkpoint with 2 layers (bf16, random weights) and a LLaMA-2-style tokenizer."
    folder = tmp_path_factory.mktemp("llama2-7b-2-layers")
    config = llama2_config("llama-2-7b")
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    rows = load_instructions(demo_path("train"))
    texts = [m["content"] for messages in rows["messages"][:300] for m in messages] + ["[INST] [/INST]"]
    llama2_style_tokenizer(texts, vocab_size=400).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_load_base_gives_a_llama2_style_tokenizer_a_pad_token(base_7b_shapes):
    saved = json.loads((base_7b_shapes / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") is None  # as LLaMA-2's own tokenizer
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_7b_shapes)
    assert tokenizer.pad_token_id is None
    _, tokenizer = load_base(str(base_7b_shapes), four_bit=True)
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("<unk>", "right")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.slow
def test_qlora_at_7b_layer_shapes_trains_saves_and_reloads(base_7b_shapes, tmp_path):
    import bitsandbytes as bnb
    model, tokenizer = load_base(str(base_7b_shapes), four_bit=True)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(m.weight.quant_type == "nf4" for m in quantized)
    assert {tuple(m.weight.quant_state.shape) for m in quantized} == {(4096, 4096), (11008, 4096), (4096, 11008)}
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    add_lora(model, "all-linear", r=16, alpha=32, dropout=0.05)
    layers = adapter_layers(model)
    assert len(layers) == 14 and all(l.lora_A["default"].weight.dtype == torch.float32 for l in layers.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r·(in+out) per linear, closed form

    rows = tokenize_dataset(load_instructions(demo_path("train")).select(range(8)), tokenizer, max_length=64).to_list()
    config = TrainConfig(max_steps=3, batch_size=2, lr=1e-3, warmup_steps=0, grad_checkpointing=True)
    before = {n: l.lora_B["default"].weight.detach().clone() for n, l in layers.items()}
    result = train(model.train(), rows, config=config, collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
    assert result["steps"] == 3 and all(math.isfinite(h["loss"]) for h in result["history"] if "loss" in h)
    assert all(not torch.equal(before[n], l.lora_B["default"].weight) for n, l in adapter_layers(model).items())

    folder = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_7b_shapes))
    ids = collate(rows[:2], tokenizer.pad_token_id)
    with torch.no_grad(): expected = model.eval()(**{k: ids[k] for k in ("input_ids", "attention_mask")}).logits
    reloaded, _, _ = open_adapter(folder, four_bit=True)
    with torch.no_grad(): got = reloaded(**{k: ids[k] for k in ("input_ids", "attention_mask")}).logits
    torch.testing.assert_close(got, expected)
