"""DoRA and PiSSA (lesson 07) against peft: files both ways, merge/unmerge/remove/disable, checkpoints, the training job.

Every logits comparison is against peft's own implementation or against the unadapted base model, never against
lora_kit's own output alone.
"""
import json, subprocess, sys, warnings

import pytest, torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lora_kit.core import ConfigError, tiny_llama
from lora_kit.layers import LoRALinear
from lora_kit.inject import (adapter_layers, add_lora, load_adapter, load_adapter_weights, lora_disabled, merge_lora,
                             plain_path_reasons, remove_lora, save_adapter, set_backward, unmerge_lora)
from lora_kit.variants import DoRA, pissa_factors
from conftest import IDS, logits


CASES = {  # name: (tiny LLaMA overrides, target_modules, r, alpha, use_rslora)
    "q,v gqa": ({}, ["q_proj", "v_proj"], 8, 16, False),
    "all-linear": ({}, "all-linear", 4, 8, False),
    "rslora": ({}, ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 8, True),
    "8 heads / 2 kv, mlp": (dict(num_attention_heads=8, num_key_value_heads=2), ["k_proj", "v_proj", "down_proj"], 4, 4, False),
}


def trained(model, seed=0, std=0.05):
    "Move every trainable weight a little, relative to its size, as training would."
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad: p.add_(torch.randn_like(p) * std * p.abs().mean().clamp(min=1))
    return model


def close(a, b, tol=1e-5): return (a - b).abs().max().item() < tol


# ------------------------------------------------------------------ DoRA

@pytest.mark.parametrize("case", CASES)
def test_dora_adapter_loads_in_peft(case, tmp_path):
    cfg, targets, r, alpha, rslora = CASES[case]
    ours = trained(add_lora(tiny_llama(**cfg), targets, r=r, alpha=alpha, use_rslora=rslora, use_dora=True))
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(tmp_path / "adapter_model.safetensors"))
    theirs = PeftModel.from_pretrained(tiny_llama(**cfg), tmp_path)
    assert not close(logits(ours), logits(tiny_llama(**cfg)), 1e-3)  # the adapter changes the output
    assert close(logits(theirs), logits(ours))


@pytest.mark.parametrize("case", CASES)
def test_peft_dora_adapter_loads_here(case, tmp_path):
    cfg, targets, r, alpha, rslora = CASES[case]
    theirs = trained(get_peft_model(tiny_llama(**cfg), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                  use_rslora=rslora, use_dora=True)))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(**cfg), tmp_path)
    assert {type(l) for l in adapter_layers(ours).values()} == {LoRALinear}
    assert {type(l.variants["default"]) for l in adapter_layers(ours).values()} == {DoRA}
    assert not close(logits(theirs), logits(tiny_llama(**cfg)), 1e-3)
    assert close(logits(ours), logits(theirs))


def test_dora_magnitude_starts_as_peft_computes_it():
    torch.manual_seed(0)
    ours = add_lora(tiny_llama(), "all-linear", r=4, alpha=8, use_dora=True, init_lora_weights="gaussian")
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    peft_layers = dict(theirs.base_model.model.named_modules())
    for name, layer in adapter_layers(ours).items():
        assert torch.allclose(layer.lora_magnitude_vector["default"], peft_layers[name].lora_magnitude_vector["default"].weight, atol=1e-6)
    assert close(logits(ours), logits(tiny_llama()))


def test_dora_on_a_bf16_base_matches_peft(tmp_path):
    base = lambda: tiny_llama().to(torch.bfloat16)
    theirs = trained(get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base(), tmp_path)
    assert adapter_layers(ours)["model.layers.0.self_attn.q_proj"].lora_magnitude_vector["default"].dtype == torch.float32
    assert close(logits(ours).float(), logits(theirs).float(), 2e-2)


def test_dora_merge_unmerge_remove_disable_keep_logits():
    model = trained(add_lora(tiny_llama(), "all-linear", r=4, alpha=8, use_dora=True))
    adapted, base = logits(model), logits(tiny_llama())
    assert close(logits(merge_lora(model)), adapted)
    merge_lora(model)  # idempotent
    with lora_disabled(model): assert close(logits(model), base)
    assert close(logits(unmerge_lora(model)), adapted)
    assert close(logits(remove_lora(model, merge=True)), adapted)
    plain = remove_lora(trained(add_lora(tiny_llama(), "all-linear", r=4, alpha=8, use_dora=True)), merge=False)
    assert close(logits(plain), base)


def peft_name(name):
    "peft's name of a lora_kit adapter parameter: both carry the adapter name; peft's magnitude is a module's weight."
    return f"base_model.model.{name}" + (".weight" if name.endswith("lora_magnitude_vector.default") else "")


def test_dora_gradients_equal_peft():
    ours = trained(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, use_dora=True))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    peft_params, ours_params = dict(theirs.named_parameters()), {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(ours_params) == 3 * 4 and {peft_name(n) for n in ours_params} <= set(peft_params)
    with torch.no_grad():
        for name, p in ours_params.items(): peft_params[peft_name(name)].copy_(p)
    labels = IDS["input_ids"]
    ours.train()(**IDS, labels=labels).loss.backward()
    theirs.train()(**IDS, labels=labels).loss.backward()
    for name, p in ours_params.items():
        assert torch.allclose(p.grad, peft_params[peft_name(name)].grad, atol=1e-5, rtol=1e-4), name


def test_dora_with_dropout_in_training_equals_peft(tmp_path):
    theirs = trained(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             use_dora=True, lora_dropout=0.3)))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    torch.manual_seed(9); a = ours.train()(**IDS).logits
    torch.manual_seed(9); b = theirs.train()(**IDS).logits
    assert close(a, b) and not close(a, logits(ours.eval()), 1e-3)  # the same masks, and they do change the output


def test_dora_keeps_its_own_forward_in_the_training_job_with_a_reason():
    model = add_lora(tiny_llama(), ["q_proj"], r=4, alpha=8, use_dora=True, backward="plain")
    set_backward(model, "lean")  # what the training job does (TrainConfig.efficient_layers=True)
    layers = adapter_layers(model)
    assert [type(l) for l in layers.values()] == [LoRALinear] * 2
    assert [type(l.variants["default"]) for l in layers.values()] == [DoRA] * 2
    assert {l.backward for l in layers.values()} == {"lean"}
    assert plain_path_reasons(model) == {DoRA.plain_reason: 2} and "DoRA" in DoRA.plain_reason  # the note: why not lean
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert type(model.model.layers[0].self_attn.q_proj(x).grad_fn).__name__ != "LoRAFunctionBackward"  # DoRA's own forward


def test_pissa_refuses_a_quantized_base_and_dora_uses_its_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    layer = bnb.nn.Linear4bit(64, 64, bias=False).to("cpu")  # quantized when moved to a device
    assert layer.weight.dtype == torch.uint8
    with pytest.raises(ConfigError, match="16 or 32 bits"): LoRALinear(layer, r=4, alpha=8, init_lora_weights="pissa")
    layer = bnb.nn.Linear4bit(64, 64, bias=False).to("cpu")
    dora = LoRALinear(layer, r=4, alpha=8, use_dora=True)  # DoRA's norm reads the weight through dense_weight
    w0 = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # bitsandbytes' own dequantization
    assert torch.allclose(dora.lora_magnitude_vector["default"], torch.linalg.norm(w0, dim=1), atol=1e-6)
    x = torch.randn(3, 64)
    with torch.no_grad(): assert torch.allclose(dora(x), x @ w0.T, atol=1e-5)  # the base layer at step 0


# ------------------------------------------------------------------ PiSSA

def test_pissa_init_equals_peft():
    ours = add_lora(tiny_llama(), "all-linear", r=4, alpha=8, init_lora_weights="pissa")
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa"))
    peft_layers = dict(theirs.base_model.model.named_modules())
    for name, layer in adapter_layers(ours).items():
        other = peft_layers[name]
        assert torch.allclose(layer.lora_A["default"].weight, other.lora_A["default"].weight, atol=1e-5)
        assert torch.allclose(layer.lora_B["default"].weight, other.lora_B["default"].weight, atol=1e-5)
        assert torch.allclose(layer.base.weight, other.base_layer.weight, atol=1e-6)  # the residual
    assert close(logits(ours), logits(tiny_llama()))  # the model is unchanged at step 0


def test_randomized_pissa_equals_peft_from_the_same_random_state():
    holder = nn.Sequential(); holder.add_module("proj", nn.Linear(96, 64, bias=False))
    weight = holder.proj.weight.detach().clone()
    theirs = get_peft_model(holder, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])).base_model.model.proj
    torch.manual_seed(7); theirs.pissa_init("default", "pissa_niter_2")
    torch.manual_seed(7); A, B = pissa_factors(weight, 8, 2.0, niter=2)
    assert torch.allclose(A, theirs.lora_A["default"].weight, atol=1e-5)
    assert torch.allclose(B, theirs.lora_B["default"].weight, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
@pytest.mark.parametrize("case", CASES)
def test_pissa_saves_a_rank_2r_lora_that_peft_applies_to_the_original_base(case, init, tmp_path):
    cfg, targets, r, alpha, rslora = CASES[case]
    torch.manual_seed(0)
    ours = trained(add_lora(tiny_llama(**cfg), targets, r=r, alpha=alpha, use_rslora=rslora, init_lora_weights=init))
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (2 * r, True)
    theirs = PeftModel.from_pretrained(tiny_llama(**cfg), tmp_path)  # the original base, not the residual
    assert not close(logits(ours), logits(tiny_llama(**cfg)), 1e-3)
    assert close(logits(theirs), logits(ours))
    assert close(logits(load_adapter(tiny_llama(**cfg), tmp_path)), logits(theirs))


def test_pissa_file_equals_peft_conversion(tmp_path):
    ours = trained(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, init_lora_weights="pissa"))
    save_adapter(ours, tmp_path / "ours")
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "initial")
    modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            modules[name].lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            modules[name].lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert sorted(a) == sorted(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (our_config["r"], our_config["lora_alpha"]) == (peft_config["r"], peft_config["lora_alpha"])


def test_peft_pissa_adapters_load_here_converted_and_not(tmp_path):
    theirs = trained(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa")))
    theirs.save_pretrained(tmp_path / "unconverted")  # peft's default: rank r, meaningful on the residual only
    assert close(logits(load_adapter(tiny_llama(), tmp_path / "unconverted")), logits(theirs))
    fresh = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa"))
    fresh.peft_config["default"].init_lora_weights = True
    fresh.save_pretrained(tmp_path / "initial")
    trained(fresh)
    fresh.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert close(logits(load_adapter(tiny_llama(), tmp_path / "converted")), logits(fresh))


def test_pissa_merge_unmerge_disable_and_remove_give_the_original_back():
    model = trained(add_lora(tiny_llama(), "all-linear", r=4, alpha=8, init_lora_weights="pissa"))
    adapted, base = logits(model), logits(tiny_llama())
    assert close(logits(merge_lora(model)), adapted)
    with lora_disabled(model): assert close(logits(model), base)
    assert close(logits(unmerge_lora(model)), adapted)
    plain = remove_lora(model, merge=False)
    for (name, a), b in zip(plain.state_dict().items(), tiny_llama().state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    merged = remove_lora(trained(add_lora(tiny_llama(), "all-linear", r=4, alpha=8, init_lora_weights="pissa")), merge=True)
    assert close(logits(merged), adapted)


def test_pissa_checkpoint_resumes_into_a_fresh_pissa_model(tmp_path):
    torch.manual_seed(0)
    model = trained(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, init_lora_weights="pissa_niter_2"))
    save_adapter(model, tmp_path)
    torch.manual_seed(1)  # another random start: the residual is rebuilt from the file's initial A0, B0
    resumed = load_adapter_weights(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, init_lora_weights="pissa_niter_2"), tmp_path)
    assert close(logits(resumed), logits(model))


def test_pissa_trains_on_the_lean_path_like_plain_pissa():
    plain = trained(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, init_lora_weights="pissa", backward="plain"))
    lean = trained(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, init_lora_weights="pissa"))  # lean: the default
    assert {type(l) for l in adapter_layers(lean).values()} == {LoRALinear}
    assert plain_path_reasons(lean) == {} and all(l.lora_start.keys() == {"default"} for l in adapter_layers(lean).values())
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert type(lean.model.layers[0].self_attn.q_proj(x).grad_fn).__name__ == "LoRAFunctionBackward"
    labels = IDS["input_ids"]
    plain.train()(**IDS, labels=labels).loss.backward(); lean.train()(**IDS, labels=labels).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), lean.parameters()):
        if a.requires_grad: assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_pissa_refuses_a_rank_whose_saved_form_cannot_load():
    with pytest.raises(ConfigError, match="2r = 34"): LoRALinear(nn.Linear(48, 32), r=17, alpha=8, init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="pissa_niter_K"): add_lora(tiny_llama(), init_lora_weights="pissa_fast")


# ------------------------------------------------------------------ DoRA with PiSSA's start

def test_dora_with_pissa_start_saves_a_rank_2r_dora_for_the_original_base(tmp_path):
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, use_dora=True, init_lora_weights="pissa")
    for layer in adapter_layers(model).values():  # the two compose in the one layer class: DoRA's variant on PiSSA's start
        assert type(layer) is LoRALinear and type(layer.variants["default"]) is DoRA and set(layer.lora_start) == {"default"}
    assert close(logits(model), logits(tiny_llama()))
    trained(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["use_dora"], config["init_lora_weights"]) == (8, True, True)
    assert close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path)), logits(model))


# ------------------------------------------------------------------ no registration needed, and the jobs that use it

def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_without_importing_lora_kit_variants_dora_works(tmp_path):
    ids = torch.arange(5, 13)[None]
    save_adapter(trained(add_lora(tiny_llama(), ["q_proj"], r=4, alpha=8, use_dora=True)), tmp_path)
    with torch.no_grad(): want = PeftModel.from_pretrained(tiny_llama(), tmp_path)(ids).logits[0, -1, :4]
    r = run_python("import json, sys, torch; from lora_kit.core import tiny_llama\n"
                   "from lora_kit.inject import adapter_layers, add_lora, load_adapter\n"
                   "before = 'lora_kit.variants' in sys.modules\n"
                   "made = add_lora(tiny_llama(), use_dora=True)\n"
                   f"loaded = load_adapter(tiny_llama(), {str(tmp_path)!r})\n"
                   "with torch.no_grad(): got = loaded(torch.arange(5, 13)[None]).logits[0, -1, :4].tolist()\n"
                   "kinds = lambda m: sorted({type(l.variants['default']).__name__ for l in adapter_layers(m).values()})\n"
                   "print(json.dumps(dict(before=before, made=kinds(made), loaded=kinds(loaded), logits=got)))")
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["before"] is False and found["made"] == found["loaded"] == ["DoRA"]  # imported when used, by the table
    assert torch.allclose(torch.tensor(found["logits"]), want, atol=1e-5)  # peft's logits for the same file


@pytest.mark.slow
def test_the_finetune_module_loads_dora_adapters(tmp_path):
    save_adapter(trained(add_lora(tiny_llama(), ["q_proj"], r=4, alpha=8, use_dora=True)), tmp_path)
    r = run_python("import lora_kit.finetune; from lora_kit.core import tiny_llama; from lora_kit.inject import load_adapter, adapter_layers\n"
                   f"print(sorted({{(type(l).__name__, type(l.variants['default']).__name__) for l in adapter_layers(load_adapter(tiny_llama(), {str(tmp_path)!r})).values()}}))")
    assert r.stdout.strip() == "[('LoRALinear', 'DoRA')]", r.stderr


@pytest.mark.parametrize("flags", [["--dora"], ["--init", "pissa"]])
@pytest.mark.slow
def test_finetune_cli_trains_a_variant_whose_adapter_peft_loads(flags, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "finetune", *flags, "--max-steps", "2", "--eval-examples", "2",
                        "--output", str(out)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((out / "adapter_config.json").read_text())
    from lora_kit.qlora import load_base, open_adapter
    ours, _, _ = open_adapter(out)
    base, _ = load_base("tiny")
    theirs = PeftModel.from_pretrained(base, out)
    # identical weights compared in float64: fp32 kernels may round two equal models apart by 1e-5 on the rebuilt base
    with torch.no_grad(): assert close(ours.double()(IDS["input_ids"]).logits, theirs.double()(IDS["input_ids"]).logits, tol=1e-9)
    if flags == ["--dora"]: assert config["use_dora"] is True and config["r"] == 16
    else: assert config["r"] == 32 and config["init_lora_weights"] is True and config["lora_alpha"] == 64


@pytest.mark.parametrize("args, message", [(["finetune", "--init", "olora"], "argument --init: must be kaiming"),
                                           (["finetune", "--dora", "--4bit"], "16 or 32 bits"),
                                           (["estimate", "--dora", "--method", "qlora"], "DoRA")])
@pytest.mark.slow
def test_cli_refuses_variants_it_cannot_run_in_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_estimate_cli_counts_dora():
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "estimate", "--dora", "--json"], capture_output=True, text=True, timeout=300)
    plain = subprocess.run([sys.executable, "-m", "lora_kit.cli", "estimate", "--json"], capture_output=True, text=True, timeout=300)
    dora, lora = json.loads(r.stdout), json.loads(plain.stdout)
    assert dora["use_dora"] is True
    assert dora["params_trainable"] - lora["params_trainable"] == 32 * (4096 + 4096)  # a magnitude per output of q and v
    assert dora["flops_per_step"] - lora["flops_per_step"] == 32 * 2 * (2 * 8 * 4096 * 4096)  # B·A per layer and target


@pytest.mark.slow
def test_dora_trains_like_peft_dora_in_the_training_job():
    "The same start, data and optimizer: lora_kit's training loop gives the same losses with either DoRA implementation."
    from functools import partial
    from dataclasses import replace
    from lora_kit.data import collate, demo_path, load_instructions, tokenize_dataset
    from lora_kit.finetune import DEMO_CONFIG, DEMO_TARGETS, load_base
    from lora_kit.train import train
    ours, tokenizer = load_base("tiny")
    theirs, _ = load_base("tiny")
    rows = tokenize_dataset(load_instructions(demo_path("train")).select(range(64)), tokenizer).to_list()
    add_lora(ours, DEMO_TARGETS, r=16, alpha=32, use_dora=True)
    theirs = get_peft_model(theirs, LoraConfig(r=16, lora_alpha=32, target_modules=list(DEMO_TARGETS), use_dora=True))
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad: peft_params[peft_name(name)].copy_(p)
    config, collate_fn = replace(DEMO_CONFIG, loraplus_lr_ratio=1, max_steps=20), partial(collate, pad_token_id=tokenizer.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = (train(m, rows, None, config, collate_fn=collate_fn)["history"] for m in (ours, theirs))
    assert a[-1]["loss"] < a[0]["loss"] - 1
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-3
