"""One adapter layer for every combination (issue 29, item 1).

`LoRALinear` keeps the init (a function), the variant (a strategy object per adapter), the backward (lean or plain)
and the base type (`dense_weight`) apart. Every combination of {gaussian, pissa} x {LoRA, DoRA} x {lean, plain} is
checked here against peft's layer on the same weights (outputs and gradients), on `nn.Linear` and, where peft
supports it, on bitsandbytes' 4-bit layer; no feature needs an import beyond `lora_kit.inject`; and `add_lora`'s
default layer keeps at most 0.75x peft's bytes for backward.
"""
import itertools, json, subprocess, sys
import pytest, torch
from torch import nn
from peft import LoraConfig, get_peft_model
from lora_kit.core import ConfigError, tiny_llama
from lora_kit.efficient import SavedTensorLog, causal_lm_loss
from lora_kit.inject import add_lora, plain_path_reasons
from lora_kit.layers import LoRALinear, dense_weight

INITS, VARIANTS, BACKWARDS = ("gaussian", "pissa"), ("lora", "dora"), ("lean", "plain")


def peft_twin(ours: LoRALinear, use_dora: bool, quantized_base: nn.Module | None = None) -> nn.Module:
    "peft's layer for `ours`'s settings around a copy of its base (the residual, for PiSSA), with `ours`'s adapter weights."
    base = quantized_base if quantized_base is not None else nn.Linear(ours.in_features, ours.out_features)
    if quantized_base is None: base.load_state_dict(ours.base.state_dict())
    holder = nn.Sequential()
    holder.add_module("proj", base)
    s = ours.settings["default"]
    theirs = get_peft_model(holder, LoraConfig(r=s["r"], lora_alpha=s["lora_alpha"], target_modules=["proj"],
                                               use_dora=use_dora, init_lora_weights=False)).base_model.model.proj
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
        if use_dora: theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector["default"])
    return theirs


def output_and_grads(layer, x, params):
    "The output, and the gradients of the input and of `params`, for a loss that weighs every output differently."
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.float().sin().sum().backward()
    return [out.detach().float(), x.grad.float(), *(p.grad.float() for p in params)]


def adapter_params(layer, peft_layer=False):
    names = ("lora_A", "lora_B") + (("lora_magnitude_vector",) if "lora_magnitude_vector" in dict(layer.named_children())
                                    and len(getattr(layer, "lora_magnitude_vector")) else ())
    if peft_layer: return [getattr(layer, n)["default"].weight for n in names]
    return [getattr(layer, n)["default"].weight if n != "lora_magnitude_vector" else layer.lora_magnitude_vector["default"]
            for n in names]


@pytest.mark.parametrize("init,variant,backward", list(itertools.product(INITS, VARIANTS, BACKWARDS)))
def test_every_combination_matches_peft_on_a_linear_base(init, variant, backward):
    torch.manual_seed(0)
    ours = LoRALinear(nn.Linear(48, 32), r=4, alpha=8, init_lora_weights=init, use_dora=variant == "dora",
                      backward=backward)
    with torch.no_grad():  # as after training: B moved, and the magnitude
        ours.lora_B["default"].weight.add_(torch.randn_like(ours.lora_B["default"].weight) * 0.1)
        if variant == "dora": ours.lora_magnitude_vector["default"].mul_(1.05)
    theirs = peft_twin(ours, variant == "dora")
    x = torch.randn(2, 5, 48)
    got = output_and_grads(ours, x, adapter_params(ours))
    want = output_and_grads(theirs, x, adapter_params(theirs, peft_layer=True))
    for a, b in zip(got, want): assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    lean = backward == "lean" and variant == "lora"
    assert (ours.plain_reason("default") is None) == lean  # PiSSA trains lean; DoRA says why it cannot
    if variant == "dora" and backward == "lean": assert "DoRA" in ours.plain_reason("default")


def test_pissa_starts_as_the_base_and_dora_on_pissa_keeps_w0s_norm():
    torch.manual_seed(1)
    base = nn.Linear(48, 32)
    W0 = base.weight.detach().clone()
    both = LoRALinear(base, r=4, alpha=8, init_lora_weights="pissa", use_dora=True)
    x = torch.randn(3, 48)
    assert torch.allclose(both(x), x @ W0.T + base.bias, atol=1e-5)
    assert torch.allclose(both.lora_magnitude_vector["default"], torch.linalg.norm(W0, dim=1), atol=1e-5)


def four_bit_linear(seed=0, in_features=64, out_features=32):
    "A bitsandbytes 4-bit layer (NF4, fp32 compute) quantized from a seeded `nn.Linear`."
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features)
    q = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")


@pytest.mark.parametrize("variant,backward", list(itertools.product(VARIANTS, BACKWARDS)))
def test_gaussian_lora_and_dora_match_peft_on_a_4bit_base(variant, backward):
    import copy
    base = four_bit_linear()
    twin_base = copy.deepcopy(base)
    torch.manual_seed(2)
    ours = LoRALinear(base, r=4, alpha=8, init_lora_weights="gaussian", use_dora=variant == "dora", backward=backward)
    with torch.no_grad(): ours.lora_B["default"].weight.normal_(std=0.1)
    theirs = peft_twin(ours, variant == "dora", quantized_base=twin_base)
    x = torch.randn(2, 5, 64)
    got = output_and_grads(ours, x, adapter_params(ours))
    want = output_and_grads(theirs, x, adapter_params(theirs, peft_layer=True))
    for a, b in zip(got, want): assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    assert (ours.plain_reason("default") is None) == (backward == "lean" and variant == "lora")


def test_dense_weight_of_a_4bit_layer_is_bitsandbytes_dequantization():
    from bitsandbytes.functional import dequantize_4bit
    base = four_bit_linear()
    assert torch.equal(dense_weight(base), dequantize_4bit(base.weight.data, base.weight.quant_state))
    plain = nn.Linear(8, 4)
    assert dense_weight(plain) is plain.weight


def test_pissa_on_a_4bit_base_is_refused_as_in_peft():
    with pytest.raises(ConfigError, match="16 or 32 bits"):
        LoRALinear(four_bit_linear(), r=4, alpha=8, init_lora_weights="pissa")


FRESH = """
import sys, json, torch
from lora_kit.inject import add_lora, load_adapter
before = sorted(m for m in ("lora_kit.variants", "lora_kit.efficient", "lora_kit.qlora") if m in sys.modules)
from lora_kit.core import tiny_llama
from lora_kit.inject import adapter_layers, plain_path_reasons
ids = torch.arange(5, 13)[None]
dora = add_lora(tiny_llama(), use_dora=True)
pissa = add_lora(tiny_llama(), init_lora_weights="pissa")
peft_dora = load_adapter(tiny_llama(), sys.argv[1])
with torch.no_grad(): peft_logits = peft_dora(ids).logits
from transformers import BitsAndBytesConfig, LlamaForCausalLM
quantized = LlamaForCausalLM.from_pretrained(sys.argv[2], quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32, device_map="cpu")
add_lora(quantized, "all-linear", r=4, alpha=8)
for layer in adapter_layers(quantized).values(): torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
quantized.train()(input_ids=ids, labels=ids).loss.backward()
grads = [l.lora_A["default"].weight.grad.abs().sum().item() for l in adapter_layers(quantized).values()]
print(json.dumps(dict(before=before, dora=type(adapter_layers(dora)["model.layers.0.self_attn.q_proj"].variants["default"]).__name__,
                      pissa=sorted(adapter_layers(pissa)["model.layers.0.self_attn.q_proj"].lora_start),
                      peft_logits=peft_logits[0, -1, :4].tolist(), four_bit_reasons=plain_path_reasons(quantized),
                      four_bit_grads_nonzero=all(g > 0 for g in grads))))
"""


@pytest.mark.slow
def test_no_feature_depends_on_an_import_side_effect(tmp_path):
    "In a fresh interpreter, right after `from lora_kit.inject import add_lora`: DoRA, PiSSA, a peft DoRA file, 4-bit lean."
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name: p.normal_(std=0.1)
    peft_model.save_pretrained(tmp_path / "peft_dora")
    tiny_llama().save_pretrained(tmp_path / "tiny")
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "peft_dora"), str(tmp_path / "tiny")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["before"] == []  # nothing was imported for the features before they were used
    assert found["dora"] == "DoRA" and found["pissa"] == ["default"]
    ids = torch.arange(5, 13)[None]
    with torch.no_grad(): want = peft_model(ids).logits[0, -1, :4]
    assert torch.allclose(torch.tensor(found["peft_logits"]), want, atol=1e-5)
    assert found["four_bit_reasons"] == {} and found["four_bit_grads_nonzero"]  # every 4-bit layer on the lean path


PATHS = {"fp32": (torch.float32, None), "autocast bf16": (torch.bfloat16, torch.bfloat16), "4-bit, bf16": ("nf4", torch.bfloat16)}


def saved_bytes(model, loss_fn, ids, amp):
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None), SavedTensorLog(model.train()) as log:
        loss_fn(model, ids)
    return log.activation_bytes()


def base_for(path, folder, **config):
    "A LLaMA with `config` for `path`: fp32, bf16 weights, or NF4 linear layers (bf16 compute) through `load_4bit`."
    from lora_kit.bench import bench_llama
    weights, _ = PATHS[path]
    if weights != "nf4": return bench_llama(**config).to(weights)
    from lora_kit.qlora import load_4bit
    if not folder.exists(): bench_llama(**config).save_pretrained(folder)
    return load_4bit(str(folder), compute_dtype=torch.bfloat16)


def hf_loss(model, ids): return model(input_ids=ids, labels=ids).loss
def chunked_loss(model, ids): return causal_lm_loss(model, ids, ids)


def ratio_to_peft(path, folder, dropout, loss, backward="lean", seq_len=64, **config):
    "Bytes `add_lora`'s layers (with `loss`) keep for backward over those peft's (with Hugging Face's loss) keep."
    torch.manual_seed(0)
    ids = torch.randint(0, config.get("vocab_size", 32000), (2, seq_len))
    amp = PATHS[path][1]
    ours = add_lora(base_for(path, folder, **config), "all-linear", r=8, alpha=16, dropout=dropout, backward=backward)
    theirs = get_peft_model(base_for(path, folder, **config), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                         lora_dropout=dropout))
    return saved_bytes(ours, loss, ids, amp) / saved_bytes(theirs, hf_loss, ids, amp), plain_path_reasons(ours)


SMALL = dict(vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=2)


@pytest.mark.parametrize("path", list(PATHS))
def test_add_lora_default_layer_alone_keeps_at_most_three_quarters_of_pefts_bytes(path, tmp_path):
    "The layers alone (the same loss for both), with dropout: the lean default, not the loss, makes the saving."
    lean, reasons = ratio_to_peft(path, tmp_path / "small", 0.05, hf_loss, seq_len=128, **SMALL)
    assert reasons == {} and lean <= 0.75, lean
    plain, _ = ratio_to_peft(path, tmp_path / "small", 0.05, hf_loss, backward="plain", seq_len=128, **SMALL)
    assert plain > 0.75, plain  # the plain path is peft's computation: the check can fail


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_add_lora_default_with_the_chunked_loss_keeps_at_most_three_quarters_as_benchmarked(path, dropout, tmp_path):
    "BENCHMARKS' claim on its model (`BENCH_MODEL`, LLaMA-2's vocabulary): `add_lora`'s default layer and the chunked loss."
    ratio, reasons = ratio_to_peft(path, tmp_path / "bench", dropout, chunked_loss)
    assert reasons == {} and ratio <= 0.75, ratio
