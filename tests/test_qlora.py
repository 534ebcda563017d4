"The whole QLoRA path on CPU: 4-bit load, lora_kit adapters, training, save, reload, peft interop."
import subprocess, sys

import pytest, torch

pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra")
from peft import PeftModel

from lora_kit.core import byte_tokenizer, count_params, tiny_llama
from lora_kit.inject import add_lora, load_adapter, merge_lora, save_adapter
from lora_kit.qlora import load_4bit, nf4_levels, prepare_for_kbit_training
from conftest import SameMaskDropout, logits, worst_error

BATCH = byte_tokenizer()(["Saya suka membaca buku.", "Ibu memasak nasi goreng di dapur."], return_tensors="pt", padding=True)
LABELS = BATCH["input_ids"].masked_fill(BATCH["attention_mask"] == 0, -100)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    tiny_llama(num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    return str(path)


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
    assert (logits(reloaded, BATCH) - logits(model, BATCH)).abs().max() < 1e-5
    # peft reads the same folder onto its own 4-bit base and computes the same logits
    theirs = PeftModel.from_pretrained(load_4bit(checkpoint), tmp_path)
    assert (logits(theirs, BATCH) - logits(model, BATCH)).abs().max() < 1e-4


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


@pytest.mark.slow
def test_missing_bitsandbytes_is_the_kits_error_and_says_how_to_install():
    r = subprocess.run([sys.executable, "-c", MISSING], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("True ") and "pip install 'lora_kit[qlora]'" in r.stdout, r.stdout


# --- lesson 06's lean layer on the 4-bit base -----------------------------------------------------------------------

from lora_kit.efficient import SavedTensorLog
from lora_kit.inject import adapter_layers, plain_path_reasons
from lora_kit.layers import dense_weight
from lora_kit.qlora import require_bitsandbytes

IDS = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(0))


def adapted(checkpoint, backward, compute_dtype=torch.bfloat16, dropout=0.0):
    base = load_4bit(checkpoint, compute_dtype=compute_dtype)
    torch.manual_seed(0)
    model = add_lora(base, "all-linear", r=8, alpha=16, dropout=dropout, backward=backward)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.05)
            if dropout and backward == "plain": layer.lora_dropout["default"] = SameMaskDropout(dropout)
    return model


def dense_fp64(model, dropout):
    "The same model in fp64 with plain-path layers on the dequantized 4-bit weights (independent of the custom backward)."
    dense = add_lora(tiny_llama(num_attention_heads=4, num_key_value_heads=2).to(model.dtype), "all-linear", r=8, alpha=16,
                     dropout=dropout, backward="plain").double()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, layer in adapter_layers(model).items():
            dense.get_submodule(name).base.weight.copy_(dense_weight(layer.base))
            if dropout: dense.get_submodule(name).lora_dropout["default"] = SameMaskDropout(dropout)
        for name, p in dense.named_parameters():
            if p.requires_grad: p.copy_(params[name])
    return dense


def grads(model, amp_dtype, loss_scale=2**12):
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = model(input_ids=IDS, labels=IDS).loss
    (loss * loss_scale).backward()
    return {n: p.grad.double() / loss_scale for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("compute_dtype,amp_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                     (torch.bfloat16, None)])
def test_lean_layer_on_4bit_as_close_to_exact_gradients_as_the_plain_path(checkpoint, compute_dtype, amp_dtype, dropout):
    plain = adapted(checkpoint, "plain", compute_dtype, dropout)
    exact = grads(dense_fp64(plain, dropout), None)
    plain_error = worst_error(grads(plain, amp_dtype), exact)
    lean_error = worst_error(grads(adapted(checkpoint, "lean", compute_dtype, dropout), amp_dtype), exact)
    assert plain_error < 0.05, plain_error
    assert lean_error <= 1.25 * plain_error, (lean_error, plain_error)


def test_lean_layer_on_4bit_keeps_no_dequantized_weight_and_less_than_peft(checkpoint):
    from peft import LoraConfig, get_peft_model
    def saved(model):
        with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorLog(model.train()) as log: model(input_ids=IDS, labels=IDS)
        return log
    lean = adapted(checkpoint, "lean", dropout=0.05)
    assert all(type(layer.base).__name__ == "Linear4bit" and layer.plain_reason("default") is None
               for layer in adapter_layers(lean).values())
    assert plain_path_reasons(lean) == {}
    lean_log = saved(lean)
    shapes = {(layer.out_features, layer.in_features) for layer in adapter_layers(lean).values()}
    assert not [r for r in lean_log.unique(include_params=False) if r.shape in shapes]
    theirs = get_peft_model(load_4bit(checkpoint, compute_dtype=torch.bfloat16),
                            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    assert lean_log.activation_bytes() < 0.8 * saved(theirs).activation_bytes()


def test_lean_layer_on_4bit_with_checkpointing_gives_the_same_gradients(checkpoint):
    ref = grads(adapted(checkpoint, "lean", dropout=0.1), torch.bfloat16)
    model = prepare_for_kbit_training(adapted(checkpoint, "lean", dropout=0.1), gradient_checkpointing=True)
    got = grads(model, torch.bfloat16)
    for name in ref: assert torch.allclose(got[name], ref[name], rtol=1e-3, atol=1e-9), name


DENSE_WEIGHT_WITHOUT_QLORA = """import sys, torch
import bitsandbytes as bnb
from bitsandbytes.functional import dequantize_4bit
from lora_kit.layers import LoRALinear, dense_weight
torch.manual_seed(0)
base = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.bfloat16, quant_type="nf4")
base.load_state_dict(torch.nn.Linear(64, 48).state_dict())
base = base.to("cpu")  # quantizes
assert type(base.weight).__name__ == "Params4bit" and base.weight.quant_state is not None
assert torch.equal(dense_weight(base), dequantize_4bit(base.weight.data, base.weight.quant_state))
layer = LoRALinear(base, 4, 8)
x = torch.randn(3, 64, requires_grad=True)
out = layer(x.to(torch.bfloat16))
print(layer.plain_reason("default"), type(out.grad_fn).__name__, "lora_kit.qlora" in sys.modules)
"""


@pytest.mark.slow
def test_dense_weight_of_a_4bit_layer_is_bitsandbytes_dequantization_and_its_adapter_trains_lean(checkpoint):
    bnb = require_bitsandbytes()  # still there: import bitsandbytes or say how to install it
    from bitsandbytes.functional import dequantize_4bit
    model = add_lora(load_4bit(checkpoint, compute_dtype=torch.bfloat16), "all-linear", r=8, alpha=16)  # default settings
    layers = adapter_layers(model)
    assert len(layers) == 2 * 7 and all(isinstance(layer.base, bnb.nn.Linear4bit) for layer in layers.values())
    for name, layer in layers.items():
        weight = layer.base.weight
        assert torch.equal(dense_weight(layer.base), dequantize_4bit(weight.data, weight.quant_state)), name
        assert dense_weight(layer.base).shape == (layer.out_features, layer.in_features), name
        assert layer.plain_reason("default") is None, name  # the lean path
    assert plain_path_reasons(model) == {}
    # the same without lora_kit.qlora ever imported: a Linear4bit made by bitsandbytes itself, in a fresh interpreter
    r = subprocess.run([sys.executable, "-c", DENSE_WEIGHT_WITHOUT_QLORA], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["None", "LoRAFunctionBackward", "False"], r.stdout


# --- bitsandbytes' CPU inference repacking: evaluate, then train ----------------------------------------------------

def eval_pass(model):
    with torch.no_grad(): model.eval()(input_ids=IDS[:1])
    return model.train()


def repacked_layers(model):
    return [n for n, m in model.named_modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                                                            "packing_format_for_cpu", False)]


def plainly_loaded(checkpoint):
    "The checkpoint in 4 bits as plain transformers loads it, its layers repacking as on a CPU with AVX512-BF16."
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from lora_kit.qlora import nf4_config
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=nf4_config(torch.bfloat16),
                                                 dtype=torch.bfloat16, device_map="cpu")
    for layer in model.modules():  # bitsandbytes sets it from the CPU; set here, every CPU takes the repacking path
        if isinstance(layer, bnb.nn.Linear4bit): layer.support_avx512bf16_for_cpu = True
    return model


@pytest.fixture(scope="module")
def repacks(checkpoint):
    "bitsandbytes repacks 4-bit layers in eval mode where it may (its AVX512-BF16 inference kernel)."
    model = eval_pass(plainly_loaded(checkpoint))
    assert repacked_layers(model)
    return model


@pytest.mark.parametrize("backward", ["plain", "lean"])
def test_an_evaluation_before_training_changes_no_gradient(checkpoint, repacks, backward):
    ref = grads(adapted(checkpoint, backward, dropout=0.1), torch.bfloat16)
    model = eval_pass(adapted(checkpoint, backward, dropout=0.1))  # load_4bit keeps the standard layout
    assert not repacked_layers(model)
    got = grads(model, torch.bfloat16)
    for name in ref: assert torch.equal(got[name], ref[name]), name


def test_prepare_for_kbit_training_undoes_the_repacking_and_gradients_flow(checkpoint, repacks):
    reference = plainly_loaded(checkpoint)
    weights = {n: dense_weight(m) for n, m in reference.named_modules() if type(m).__name__ == "Linear4bit"}
    model = eval_pass(plainly_loaded(checkpoint))
    packed = repacked_layers(model)
    for name in packed:  # dense_weight reads a repacked layer as its standard form (to bf16 rounding of scales)
        got, want = dense_weight(model.get_submodule(name)).float(), weights[name].float()
        assert (got - want).norm() / want.norm() < 1e-2, name
    prepare_for_kbit_training(model)
    assert packed and not repacked_layers(eval_pass(model))
    x = torch.randn(2, 5, 64, requires_grad=True)
    model.model.layers[0].self_attn.q_proj(x.to(torch.bfloat16)).float().sum().backward()
    want = torch.ones(2, 5, weights["model.layers.0.self_attn.q_proj"].shape[0]) @ weights["model.layers.0.self_attn.q_proj"].float()
    assert x.grad is not None and (x.grad - want).norm() / want.norm() < 2e-2


@pytest.mark.parametrize("backward", ["plain", "lean"])
@pytest.mark.parametrize("evaluate_first", [True, False], ids=["evaluate-then-add_lora", "add_lora-then-evaluate"])
def test_a_plainly_loaded_4bit_model_trains_after_an_evaluation(checkpoint, repacks, backward, evaluate_first):
    "peft's documented path: transformers loads the 4-bit model and the kit only adds adapters; no evaluation cuts a gradient."
    reference = plainly_loaded(checkpoint)  # never evaluated: the standard layout
    model = plainly_loaded(checkpoint)
    if evaluate_first: assert repacked_layers(eval_pass(model))
    torch.manual_seed(0)
    add_lora(model, "all-linear", r=8, alpha=16, backward=backward)
    if not evaluate_first: eval_pass(model)
    assert not repacked_layers(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.plain_reason("default") == (None if backward == "lean" else "backward='plain' was asked for")
    with torch.no_grad(): layer.lora_B["default"].weight.normal_(std=0.05)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    layer.train()(x.to(torch.bfloat16)).float().sum().backward()
    dense = dense_weight(reference.model.layers[0].self_attn.q_proj).double() + layer.delta_weight().double()
    want = torch.ones(2, 5, dense.shape[0], dtype=torch.float64) @ dense  # the dense twin's input gradient
    assert x.grad is not None and (x.grad.double() - want).norm() / want.norm() < 2e-2
