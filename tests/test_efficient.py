"""LoRALinear's lean path (its default backward) and the chunked loss against plain autograd (backward="plain"), peft
and torch's cross-entropy."""
import math
import pytest, torch
import torch.nn.functional as F
from torch import nn
from peft import LoraConfig, get_peft_model

from lora_kit.core import tiny_llama
from lora_kit.efficient import (SavedTensorLog, causal_lm_loss, chunked_cross_entropy, dropout_keep_mask,
                                dropout_keep_scale)
from lora_kit.inject import adapter_layers, add_lora, merge_lora, plain_path_reasons, remove_lora, set_backward
from lora_kit.layers import LoRALinear
from conftest import SameMaskDropout, randomize_B, worst_error

IDS = torch.randint(0, 260, (2, 48), generator=torch.Generator().manual_seed(0))


def adapter_grads(model, loss_fn, seed=1):
    "Loss and {name without peft's prefixes: grad} after one backward; the RNG is seeded so masks can match."
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model)
    loss.backward()
    return loss.item(), {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                         for n, p in model.named_parameters() if p.requires_grad}


def hf_loss(model): return model(input_ids=IDS, labels=IDS).loss


def kit_model(backward, dropout=0.0, targets="all-linear", **cfg):
    model = add_lora(tiny_llama(**cfg), targets, r=8, alpha=16, dropout=dropout, backward=backward)
    randomize_B(model)
    return model


def peft_model_like(ours, dropout=0.0, base_dtype=torch.float32):
    "peft's all-linear LoRA on the same base in `base_dtype` with our adapter weights (and our mask draw for dropout)."
    theirs = get_peft_model(tiny_llama().to(base_dtype), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout))
    weights = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad: p.copy_(weights[name.removeprefix("base_model.model.")])  # both: lora_A.default.weight
    if dropout:
        for m in theirs.modules():
            if hasattr(m, "lora_dropout"): m.lora_dropout["default"] = SameMaskDropout(dropout)
    return theirs


def assert_same(a, b, eps=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert math.isclose(loss_a, loss_b, rel_tol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=eps, rtol=1e-4), name


PLAIN_ASKED = "backward='plain' was asked for"


def test_add_lora_trains_on_the_lean_path_and_set_backward_plain_switches_in_place_with_the_same_results():
    model = kit_model("lean")  # add_lora's defaults otherwise: the lean path needs no option
    layers = adapter_layers(model)
    assert len(layers) == 2 * 7 and {type(m) for m in layers.values()} == {LoRALinear}
    assert plain_path_reasons(model) == {} and all(m.plain_reason("default") is None for m in layers.values())
    x = torch.randn(2, 5, 64, requires_grad=True)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q(x).grad_fn).__name__ == "LoRAFunctionBackward"  # the lean autograd function computed it
    params = [id(p) for p in model.parameters()]
    lean = adapter_grads(model, hf_loss)
    set_backward(model, "plain")
    assert [id(p) for p in model.parameters()] == params  # switched in place: the same layers and parameters
    assert plain_path_reasons(model) == {PLAIN_ASKED: 2 * 7}
    assert all(m.plain_reason("default") == PLAIN_ASKED for m in layers.values())
    assert type(q(x).grad_fn).__name__ != "LoRAFunctionBackward"
    plain = adapter_grads(model, hf_loss)  # the reference: plain autograd through forward
    assert_same(lean, plain)
    with torch.no_grad():
        plain_logits = model(input_ids=IDS).logits
        set_backward(model, "lean")
        assert torch.equal(model(input_ids=IDS).logits, plain_logits)  # no grad: both run the same forward
    lean_logits = model(input_ids=IDS).logits  # with grad: the lean function's forward
    assert torch.allclose(lean_logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert plain_path_reasons(model) == {}


def test_gradients_equal_plain_autograd_without_dropout():
    plain, fast = kit_model("plain"), kit_model("lean")
    assert_same(adapter_grads(plain, hf_loss), adapter_grads(fast, hf_loss))


@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.5])
def test_gradients_equal_peft(dropout):
    fast = kit_model("lean", dropout)
    theirs = peft_model_like(fast, dropout)
    ours, ref = adapter_grads(fast, hf_loss), adapter_grads(theirs, hf_loss)
    assert_same(ours, ref)
    assert ref[1]["model.layers.1.mlp.down_proj.lora_A.weight"].abs().sum() > 0  # gradients do flow


def test_dropout_changes_the_gradients():  # so the peft comparison above does compare masks
    fast = kit_model("lean", 0.5)
    _, with_mask = adapter_grads(fast, hf_loss)
    _, without = adapter_grads(fast.eval(), lambda m: hf_loss(m.eval()))
    assert not torch.allclose(with_mask["model.layers.1.self_attn.q_proj.lora_A.weight"],
                              without["model.layers.1.self_attn.q_proj.lora_A.weight"])


def test_dropout_mask_statistics():
    torch.manual_seed(0)
    mask = dropout_keep_mask((1000, 2000), 0.1)
    assert mask.dtype == torch.bool and mask.shape == (1000, 2000)
    assert abs((~mask).float().mean().item() - 0.1) < 2e-3
    assert abs(mask[:, :1000].float().mean() - mask[:, 1000:].float().mean()) < 3e-3  # both 16-bit halves are used
    x = torch.randn(1000, 2000)
    assert abs((x * mask * dropout_keep_scale(0.1)).mean() - x.mean()) < 3e-3  # unbiased in expectation


def test_merged_forward_equals_unmerged_and_base_after_remove():
    fast = kit_model("lean", 0.1).eval()
    with torch.no_grad():
        unmerged = fast(input_ids=IDS).logits
        merge_lora(fast)
        assert torch.allclose(fast(input_ids=IDS).logits, unmerged, atol=1e-5)
        plain = remove_lora(fast)
        assert torch.allclose(plain(input_ids=IDS).logits, unmerged, atol=1e-5)


def test_gradient_checkpointing_recomputes_the_same_masks():
    fast = kit_model("lean", 0.2)
    ref = adapter_grads(fast, hf_loss)
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast.enable_input_require_grads()
    assert_same(adapter_grads(fast, hf_loss), ref)


def test_fallback_when_base_trains_and_in_bf16():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    fast, plain = LoRALinear(base, 4, 8), LoRALinear(nn.Linear(32, 16), 4, 8, backward="plain")
    plain.load_state_dict(fast.state_dict())
    fast.base.weight.requires_grad_(True); plain.base.weight.requires_grad_(True)
    assert fast.plain_reason("default") == "the base weight is trainable"
    x = torch.randn(5, 32)
    fast(x).square().sum().backward(); plain(x).square().sum().backward()
    assert torch.allclose(fast.base.weight.grad, plain.base.weight.grad, atol=1e-5)
    bf = LoRALinear(nn.Linear(32, 16).to(torch.bfloat16), 4, 8)
    assert bf(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_frozen_adapters_pass_the_input_gradient_only():
    torch.manual_seed(0)
    fast, plain = LoRALinear(nn.Linear(32, 16), 4, 8), LoRALinear(nn.Linear(32, 16), 4, 8, backward="plain")
    with torch.no_grad(): fast.lora_B["default"].weight.normal_()
    plain.load_state_dict(fast.state_dict())
    fast.requires_grad_(False); plain.requires_grad_(False)
    x = torch.randn(5, 32, requires_grad=True)
    (grad_fast,) = torch.autograd.grad(fast(x).sin().sum(), x)
    (grad_plain,) = torch.autograd.grad(plain(x).sin().sum(), x)
    assert torch.allclose(grad_fast, grad_plain, atol=1e-6)
    assert fast.plain_reason("default") is None  # the lean path computed it
    assert fast.lora_A["default"].weight.grad is None and fast.lora_B["default"].weight.grad is None


def saved_bytes(model, loss_fn):
    with SavedTensorLog(model.train()) as log: loss_fn(model)
    return log.activation_bytes()


def test_saved_bytes_reduction_against_the_plain_path():
    # dropout: the plain path keeps a dropped fp32 copy and fp32 noise per adapter; at least 25% must go
    plain, fast = saved_bytes(kit_model("plain", 0.05), hf_loss), saved_bytes(kit_model("lean", 0.05), hf_loss)
    assert fast < 0.75 * plain, (fast, plain)
    # no dropout: the layers save the same; the chunked loss drops the (tokens x vocab) fp32 log-softmax and keeps
    # the (tokens x hidden) gradient of the hidden states instead
    cfg = dict(vocab_size=8000)
    plain = saved_bytes(kit_model("plain", **cfg), lambda m: m(input_ids=IDS, labels=IDS).loss)
    fast = saved_bytes(kit_model("lean", **cfg), lambda m: causal_lm_loss(m, IDS, IDS))
    assert plain - fast >= IDS.numel() * (8000 - 64) * 4, (plain, fast)


def test_saved_tensor_log_counts_shared_storage_once():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorLog(lin) as log:
        x * x  # saves x twice (both operands)
    assert len([r for r in log.records if not r.is_param]) == 2
    assert log.activation_bytes() == x.untyped_storage().nbytes()


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_cross_entropy_matches_torch(chunk_size):
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 50, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (2, 50)); targets[0, :9] = -100; targets[1, -1] = -100
    ours = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    g_ours = torch.autograd.grad(ours * 3, (hidden, weight))  # a non-unit incoming gradient
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
    g_ref = torch.autograd.grad(ref * 3, (hidden, weight))
    assert torch.allclose(ours, ref, atol=1e-6)
    for a, b in zip(g_ours, g_ref): assert torch.allclose(a, b, atol=1e-6)
    summed = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, reduction="sum")
    assert torch.allclose(summed, F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="sum"), rtol=1e-5)


def test_chunked_cross_entropy_all_ignored_is_nan_like_torch():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(5, 8), torch.full((4,), -100)
    assert torch.isnan(chunked_cross_entropy(hidden, weight, targets))
    assert torch.isnan(F.cross_entropy(hidden @ weight.T, targets))


def test_chunked_cross_entropy_bad_input():
    h, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="one target per row"): chunked_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"): chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), reduction="max")


def test_causal_lm_loss_matches_the_model_loss_and_gradients():
    labels = IDS.clone(); labels[:, :5] = -100
    fast = kit_model("lean")
    ours = adapter_grads(fast, lambda m: causal_lm_loss(m, IDS, labels, chunk_size=17))
    ref = adapter_grads(fast, lambda m: m(input_ids=IDS, labels=labels).loss)
    assert_same(ours, ref)


def test_causal_lm_loss_of_a_peft_model():
    theirs = peft_model_like(kit_model("lean"))
    assert_same(adapter_grads(theirs, lambda m: causal_lm_loss(m, IDS, IDS)), adapter_grads(theirs, hf_loss))


def test_causal_lm_loss_refuses_an_adapted_head():
    model = add_lora(tiny_llama(), ["lm_head", "q_proj"])
    with pytest.raises(ValueError, match="plain bias-free nn.Linear"): causal_lm_loss(model, IDS, IDS)


# --- under autocast: bf16/fp16 bases with fp32 adapters, as trained on a GPU ---------------------------------------

AUTOCAST_CASES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                  (torch.float32, torch.float16)]


def model_in(base_dtype, backward, dropout=0.0):
    "Tiny LLaMA in `base_dtype`, fp32 adapters; plain-path layers draw their dropout masks as the lean path does."
    torch.manual_seed(0)
    model = add_lora(tiny_llama().to(base_dtype), "all-linear", r=8, alpha=16, dropout=dropout, backward=backward)
    randomize_B(model)
    if dropout and backward == "plain":
        for m in model.modules():
            if isinstance(m, LoRALinear): m.lora_dropout["default"] = SameMaskDropout(dropout)
    return model


def scaled_grads(model, amp_dtype, loss_scale=2**12, checkpointing=False, backward_in_autocast=False):
    "Loss and adapter gradients (fp64) with the forward under autocast; the loss scaled as a GradScaler does for fp16."
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = hf_loss(model)
        if backward_in_autocast: (loss * loss_scale).backward()
    if not backward_in_autocast: (loss * loss_scale).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    if amp_dtype is not None: assert {g.dtype for g in grads.values()} == {torch.float32}  # fp32 adapters, fp32 gradients
    return loss.item(), {n: g.double() / loss_scale for n, g in grads.items()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("base_dtype,amp_dtype", AUTOCAST_CASES)
def test_under_autocast_as_close_to_the_exact_gradients_as_the_plain_path(base_dtype, amp_dtype, dropout):
    exact_loss, exact = scaled_grads(model_in(base_dtype, "plain", dropout).double(), None)
    plain_loss, plain = scaled_grads(model_in(base_dtype, "plain", dropout), amp_dtype)
    lean_loss, lean = scaled_grads(model_in(base_dtype, "lean", dropout), amp_dtype)
    plain_error, lean_error = worst_error(plain, exact), worst_error(lean, exact)
    assert plain_error < 0.05, plain_error  # the reference is the same computation (same weights, same masks)
    assert lean_error <= 1.25 * plain_error, (lean_error, plain_error)
    assert abs(lean_loss - exact_loss) <= 1.25 * abs(plain_loss - exact_loss) + 2e-3, (lean_loss, plain_loss, exact_loss)


def test_under_autocast_the_lean_path_runs_and_computes_in_16_bits():
    layer = LoRALinear(nn.Linear(32, 16).to(torch.bfloat16), 4, 8, dropout=0.1).train()
    x = torch.randn(3, 32, requires_grad=True)  # an fp32 input, as a norm layer hands it to q/k/v
    with SavedTensorLog(layer) as log, torch.autocast("cpu", dtype=torch.bfloat16): out = layer(x)
    assert out.dtype == torch.bfloat16
    saved = [(r.dtype, r.shape) for r in log.records if not r.is_param]
    assert (torch.float32, (3, 32)) in saved and (torch.bool, (3, 32)) in saved  # x itself (no copy) and the mask
    assert (torch.bfloat16, (3, 4)) in saved and len(saved) == 3  # u, r wide; nothing full-size in 16 bits
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A["default"].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("base_dtype,amp_dtype", AUTOCAST_CASES[:2])
def test_under_autocast_checkpointing_and_backward_inside_autocast_change_nothing(base_dtype, amp_dtype):
    ref = scaled_grads(model_in(base_dtype, "lean", 0.1), amp_dtype)
    for kwargs in (dict(checkpointing=True), dict(backward_in_autocast=True)):
        loss, grads = scaled_grads(model_in(base_dtype, "lean", 0.1), amp_dtype, **kwargs)
        assert loss == ref[0]
        for name in grads: assert torch.allclose(grads[name], ref[1][name], rtol=1e-3, atol=1e-9), (kwargs, name)


def test_lean_layers_under_autocast_keep_no_full_size_copy_but_x():
    # per adapter: at most the shared input x and a 1-byte mask are full size; peft keeps a 16-bit dropped copy too
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorLog(model_in(torch.bfloat16, "lean", 0.05)) as log:
        hf_loss(log.model)
    full = [r for r in log.unique() if ".layers." in r.module and r.module.endswith("_proj") and r.shape[-1] in (64, 176)]
    assert {r.dtype for r in full} <= {torch.bfloat16, torch.bool}
    # 16-bit and full size: only the inputs that no other op saves already (the norms' outputs), each once per block
    first_saved_by = sorted(r.module.split(".", 3)[-1] for r in full if r.dtype == torch.bfloat16)
    assert first_saved_by == ["mlp.gate_proj", "mlp.gate_proj", "self_attn.q_proj", "self_attn.q_proj"], first_saved_by


class Int8Linear(nn.Module):
    "A base layer whose weight is int8 codes with a scale per output: no `dense_weight` for it, so no lean backward."
    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        self.register_buffer("weight", (linear.weight.detach() / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)
    def forward(self, x): return F.linear(x, self.weight.to(x.dtype) * self.scale)


def test_a_linear_subclass_trains_on_the_lean_path_and_an_unreadable_base_falls_back_with_a_reason():
    class OwnLinear(nn.Linear): pass
    torch.manual_seed(0)
    model = nn.Sequential(OwnLinear(16, 8))
    add_lora(model, ["0"], r=2, alpha=4)
    with torch.no_grad(): model[0].lora_B["default"].weight.normal_()
    assert plain_path_reasons(model) == {} and model[0].plain_reason("default") is None  # dense_weight reads its weight
    x = torch.randn(2, 16, requires_grad=True)
    out = model(x)
    assert type(out.grad_fn).__name__ == "LoRAFunctionBackward"
    lean = [out, *torch.autograd.grad(out.sin().sum(), [x, *model[0].adapter_parameters("default")])]
    set_backward(model, "plain")
    out = model(x)
    plain = [out, *torch.autograd.grad(out.sin().sum(), [x, *model[0].adapter_parameters("default")])]
    for a, b in zip(lean, plain): assert torch.allclose(a, b, atol=1e-6), (a, b)
    # a base whose weight dense_weight cannot turn into a dense matrix trains on the plain path, and says why
    layer = LoRALinear(Int8Linear(nn.Linear(16, 8)), 2, 4)
    with torch.no_grad(): layer.lora_B["default"].weight.normal_()
    reason = "dense_weight cannot dequantize a Int8Linear for backward"
    assert layer.backward == "lean" and layer.plain_reason("default") == reason
    assert plain_path_reasons(nn.Sequential(layer)) == {reason: 1}
    out = layer(x)
    assert type(out.grad_fn).__name__ != "LoRAFunctionBackward"
    gx, gA, gB = torch.autograd.grad(out.sin().sum(), [x, *layer.adapter_parameters("default")])
    # closed form: h = x W^T + s x A^T B^T with s = alpha/r = 2, and g = dL/dh = cos(h)
    W, A, B, s = layer.base.weight.float() * layer.base.scale, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0
    h = x @ W.T + s * x @ A.T @ B.T
    assert torch.allclose(out, h, atol=1e-5)
    g = h.cos()
    assert torch.allclose(gx, g @ W + s * g @ B @ A, atol=1e-5)
    assert torch.allclose(gA, s * B.T @ g.T @ x, atol=1e-5) and torch.allclose(gB, s * g.T @ x @ A.T, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("base_dtype,amp_dtype", AUTOCAST_CASES[:2])
def test_under_autocast_as_close_to_the_exact_gradients_as_peft(base_dtype, amp_dtype, dropout):
    lean_model = model_in(base_dtype, "lean", dropout)
    _, exact = scaled_grads(model_in(base_dtype, "plain", dropout).double(), None)
    _, theirs = scaled_grads(peft_model_like(lean_model, dropout, base_dtype), amp_dtype)
    theirs = {n.removeprefix("base_model.model."): g for n, g in theirs.items()}  # both: lora_A.default.weight
    peft_error, lean_error = worst_error(theirs, exact), worst_error(scaled_grads(lean_model, amp_dtype)[1], exact)
    assert peft_error < 0.05, peft_error
    assert lean_error <= 1.25 * peft_error, (lean_error, peft_error)
