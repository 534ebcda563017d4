"Adapters cross between lora_kit and peft in both directions with identical logits."
import pytest, torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora_kit.core import tiny_llama
from lora_kit.inject import add_lora, load_adapter, remove_lora, save_adapter
from conftest import IDS, logits, randomize_B

CASES = {  # name: (config overrides of the tiny LLaMA, target_modules, r, alpha, use_rslora)
    "q,v": ({}, ["q_proj", "v_proj"], 8, 16, False),
    "all-linear": ({}, "all-linear", 4, 8, False),
    "rslora": ({}, ["q_proj", "k_proj", "v_proj", "o_proj"], 16, 8, True),
    "gqa 8 heads / 2 kv": (dict(num_attention_heads=8, num_key_value_heads=2), ["k_proj", "v_proj", "down_proj"], 4, 4, False),
    "r != alpha, regex": ({}, r"model\.layers\.1\.mlp\.(up|down)_proj", 6, 5, False),
}


@pytest.mark.parametrize("case", CASES)
def test_lora_kit_adapter_loads_in_peft(case, tmp_path):
    cfg, targets, r, alpha, rslora = CASES[case]
    ours = add_lora(tiny_llama(**cfg), targets, r=r, alpha=alpha, use_rslora=rslora)
    randomize_B(ours)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(**cfg), tmp_path)
    assert (logits(ours) - logits(tiny_llama(**cfg))).abs().max() > 1e-3  # the adapter does change the output
    assert (logits(theirs) - logits(ours)).abs().max() < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lora_kit(case, tmp_path):
    cfg, targets, r, alpha, rslora = CASES[case]
    theirs = get_peft_model(tiny_llama(**cfg), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                          use_rslora=rslora, task_type="CAUSAL_LM"))
    randomize_B(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(**cfg), tmp_path)
    assert (logits(theirs) - logits(tiny_llama(**cfg))).abs().max() > 1e-3
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5


def test_remove_lora_gives_base_keys_and_adapted_logits():
    model = add_lora(tiny_llama(), "all-linear", r=4, alpha=8)
    randomize_B(model)
    adapted = logits(model)
    plain = remove_lora(model, merge=True)
    assert list(plain.state_dict()) == list(tiny_llama().state_dict())
    assert (logits(plain) - adapted).abs().max() < 1e-5
    # and its weights are what peft's merge_and_unload produces from the same adapter
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_B(theirs)
    for (k, a), b in zip(plain.state_dict().items(), theirs.merge_and_unload().state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_a_16_bit_base_adapters_are_fp32_as_in_peft(dtype, tmp_path):
    "The default keeps adapters (so their gradients and AdamW moments) in fp32; peft does the same; logits agree."
    ours = add_lora(tiny_llama().to(dtype), "all-linear", r=4, alpha=8)
    randomize_B(ours)
    assert {p.dtype for n, p in ours.named_parameters() if p.requires_grad} == {torch.float32}
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    assert torch.equal(logits(ours), logits(theirs))
    kept = add_lora(tiny_llama().to(dtype), "all-linear", r=4, alpha=8, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if p.requires_grad} == {dtype}
    assert {p.dtype for p in load_adapter(tiny_llama().to(dtype), tmp_path, autocast_adapter_dtype=False).parameters()} == {dtype}


def test_fp32_adapters_train_under_bf16_autocast():
    "The GPU recipe (16-bit base, fp32 adapters, autocast) on the CPU: fp32 gradients, a finite loss, B moves."
    model = add_lora(tiny_llama().to(torch.bfloat16), ["q_proj", "v_proj"], r=4, alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16): loss = model(**IDS, labels=IDS["input_ids"]).loss
    loss.backward(); opt.step()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and {g.dtype for g in grads} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
