"""LoRA-FA (lesson 07): the frozen A, the lean backward that keeps no layer input, the corrected optimizer against peft's
`create_lorafa_optimizer`, the closed-form estimate against autograd and `FlopCounterMode`, files, and the job's flags.

References are independent of the code under test: peft, autograd through the plain path, `torch.linalg.lstsq`,
`FlopCounterMode` and the tensors autograd actually saves."""
import json, subprocess, sys, warnings

import pytest, torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_lorafa_optimizer

from lora_kit.core import ConfigError, meta_llama, tiny_llama
from lora_kit.layers import LoRALinear
from lora_kit.inject import adapter_layers, add_lora, load_adapter, save_adapter
from lora_kit.efficient import SavedTensorLog
from lora_kit.accounting import Setup, counted_step_flops, estimate, saved_bytes
from lora_kit.variants import LoRAFAAdamW, lorafa_gradient, lorafa_optimizer
from lora_kit.train import TrainConfig, make_optimizer
from lora_kit.finetune import FinetuneConfig
from conftest import IDS, logits


def saved_shapes(layer, x):
    with SavedTensorLog(layer.train()) as log: layer(x)
    return [r.shape for r in log.unique()]


def test_lorafa_trains_B_alone_and_keeps_no_input():
    torch.manual_seed(0)
    x = torch.randn(16, 48, requires_grad=True)
    fa, lora = (LoRALinear(nn.Linear(48, 32), r=4, alpha=8, lorafa=f) for f in (True, False))
    assert [n for n, p in fa.named_parameters() if p.requires_grad] == ["lora_B.default.weight"]
    assert (16, 48) in saved_shapes(lora, x)
    assert saved_shapes(fa, x) == [(16, 4)]  # u = x·Aᵀ only


def test_lean_lorafa_gradients_equal_plain_autograd():
    torch.manual_seed(1)
    lean = LoRALinear(nn.Linear(48, 32), r=4, alpha=8, lorafa=True)
    with torch.no_grad(): lean.lora_B["default"].weight.normal_(std=0.1)
    plain = LoRALinear(nn.Linear(48, 32), r=4, alpha=8, lorafa=True, backward="plain")
    plain.load_state_dict(lean.state_dict())
    x = torch.randn(2, 8, 48)
    results = []
    for layer in (lean, plain):
        xi = x.clone().requires_grad_()
        out = layer.train()(xi)
        out.pow(2).sum().backward()
        results.append((out, xi.grad, layer.lora_B["default"].weight.grad, layer.lora_A["default"].weight.grad))
    for ours, ref in zip(results[0][:3], results[1][:3]): torch.testing.assert_close(ours, ref)
    assert results[0][3] is None and results[1][3] is None


def test_corrected_gradient_is_the_least_squares_step():
    torch.manual_seed(0)
    A, G, s = torch.randn(6, 40) / 40**0.5, torch.randn(24, 40), 1.5
    step = -lorafa_gradient(s * G @ A.T, A, s)
    best = torch.linalg.lstsq((s * A).T, -G.T).solution.T
    torch.testing.assert_close(step, best, rtol=1e-4, atol=1e-5)


def _train_B(model, optimizer, batches):
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    return next(p for n, p in model.named_parameters() if "layers.1.self_attn.v_proj.lora_B" in n).detach()


def test_optimizer_matches_peft_create_lorafa_optimizer():
    torch.manual_seed(0)
    batches = torch.randint(0, 260, (10, 4, 16))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ours, uncorrected = (add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, lorafa=True) for _ in range(2))
    peft_A = {n.removeprefix("base_model.model.").split(".lora_A")[0]: p for n, p in theirs.named_parameters() if "lora_A" in n}
    with torch.no_grad():
        for model in (ours, uncorrected):
            for name, layer in adapter_layers(model).items(): layer.lora_A["default"].weight.copy_(peft_A[name])
    B_peft = _train_B(theirs, create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01), batches)
    B_ours = _train_B(ours, lorafa_optimizer(ours, lr=1e-2, weight_decay=0.01), batches)
    B_plain = _train_B(uncorrected, LoRAFAAdamW([p for p in uncorrected.parameters() if p.requires_grad], lr=1e-2,
                                                weight_decay=0.01), batches)
    size = B_peft.abs().max()
    ours_off, plain_off = ((B - B_peft).abs().max() / size for B in (B_ours, B_plain))
    assert ours_off < 0.01  # peft corrects under bf16 autocast on this CPU, we in fp32
    assert plain_off > 10 * ours_off


def test_training_job_optimizer_is_lorafa_only_for_lorafa_models():
    fa = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, lorafa=True)
    plain = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8)
    assert type(make_optimizer(fa, TrainConfig())[0]) is LoRAFAAdamW
    assert type(make_optimizer(plain, TrainConfig())[0]) is torch.optim.AdamW


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj"), ("o_proj", "down_proj")])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_estimate_counts_lorafa_saved_bytes_as_autograd(dtype, targets, attn):
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model = add_lora(tiny_llama(**small).to(dtype), targets, r=4, alpha=8, lorafa=True)
    model.config._attn_implementation = attn
    ids = torch.randint(0, 260, (2, 32))
    with SavedTensorLog(model.train()) as log: model(input_ids=ids, labels=ids).loss
    setup = Setup("lora", 4, targets, "fp32" if dtype == torch.float32 else "bf16", seq_len=32, batch_size=2, attn=attn,
                  lorafa=True)
    assert saved_bytes(model.config, setup) == log.activation_bytes()


def test_estimate_counts_lorafa_flops_and_trainable_parameters_on_7b_shapes():
    model = add_lora(meta_llama("llama-2-7b"), "all-linear", r=8, alpha=16, lorafa=True)
    est = estimate("llama-2-7b", method="lora", rank=8, targets="all-linear", seq_len=64, lorafa=True)
    assert counted_step_flops(model, 1, 64) == est["flops_per_step"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == est["params_trainable"]
    lora = estimate("llama-2-7b", method="lora", rank=8, targets="all-linear", seq_len=64)
    assert est["memory_bytes"]["activations"] < lora["memory_bytes"]["activations"]


def test_saved_lorafa_adapter_loads_in_peft_as_plain_lora_and_back_as_lorafa(tmp_path):
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, lorafa=True)
    with torch.no_grad():
        for layer in adapter_layers(model).values(): layer.lora_B["default"].weight.normal_(std=0.1)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lorafa"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Unexpected keyword arguments ['lorafa'] ... ignored"
        torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path)), logits(model))
    reloaded = load_adapter(tiny_llama(), tmp_path)
    assert {n.split(".")[-3] for n, p in reloaded.named_parameters() if p.requires_grad} == {"lora_B"}


def test_bad_combinations_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="DoRA") as e: FinetuneConfig(lorafa=True, use_dora=True)
    assert e.value.field == "lorafa"
    with pytest.raises(ConfigError, match="method 'lora' or 'qlora'") as e: Setup("full", lorafa=True)
    assert e.value.field == "lorafa"
    with pytest.raises(ConfigError, match="No variant implements"):
        add_lora(tiny_llama(), ["q_proj"], r=4, alpha=8, lorafa=True, use_dora=True)
    with pytest.raises(ConfigError, match="init_lora_weights='loftq'"):
        add_lora(tiny_llama(), ["q_proj"], r=4, alpha=8, loftq_bits=2)


def test_cli_estimate_and_finetune_take_lorafa():
    run = lambda *a: subprocess.run([sys.executable, "-m", "lora_kit.cli", *a], capture_output=True, text=True, timeout=300)
    est = run("estimate", "--model", "llama-2-7b", "--targets", "all-linear", "--lorafa", "--json")
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["lorafa"] is True
    bad = run("finetune", "--lorafa", "--dora", "--max-steps", "1")
    assert bad.returncode == 2 and "lorafa" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_the_jobs_flops_per_step_count_lorafa_without_dA():
    from lora_kit.finetune import flops_per_step
    from lora_kit.accounting import load_config, block_linears
    from lora_kit.qlora import resolve_model
    rows, config = [{"input_ids": [1] * 20}] * 4, TrainConfig(batch_size=2)
    lora, fa = (flops_per_step("tiny", "lora", 8, ("v_proj", "o_proj"), rows, config, lorafa=f)["lora"] for f in (False, True))
    shape = load_config(f"{resolve_model('tiny')}/config.json")
    lin, tokens = block_linears(shape), 2 * 20
    dA = shape.num_hidden_layers * sum(2 * tokens * 8 * lin[t][0] for t in ("v_proj", "o_proj"))  # 2·N·r·in per adapter
    assert lora - fa == dA
