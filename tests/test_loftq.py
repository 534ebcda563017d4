"""LoftQ (lesson 11): the alternation against loops written out here, its error on the shipped base, the init in
`add_lora`, saving with its base and loading again, the one-step version for a model already in 4 bits, and the
settings it refuses."""
import numpy as np
import pytest, torch
from torch import nn

pytest.importorskip("bitsandbytes", reason="LoftQ's 4-bit paths need the qlora extra")
import bitsandbytes.functional as bnbF
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_kit.core import ConfigError, MissingFileError, byte_tokenizer, tiny_llama
from lora_kit.inject import adapter_layers, add_lora, merge_lora, read_adapter_config
from lora_kit.layers import LoRALinear, dense_weight
from lora_kit.qlora import (keep_trainable_layout, load_4bit, loftq_factors, loftq_steps, nf4_config, nf4_levels,
                            nf_levels, nf_roundtrip, open_adapter, relative_error, replace_lora_weights_loftq,
                            save_loftq)
from lora_kit.tiny import base_path
from conftest import logits

FOUR_BIT_TOLERANCE = 1e-2  # max |Δlogit| of a 4-bit (double-quantized) reload of a LoftQ base: measured 1.8e-3 (logits up to 0.63)


@pytest.fixture(scope="module")
def shipped():
    return AutoModelForCausalLM.from_pretrained(base_path())


@pytest.fixture(scope="module")
def block0(shipped):
    "The shipped base's first block: its 7 linear weights by name."
    return {n: m.weight.detach() for n, m in shipped.model.layers[0].named_modules() if isinstance(m, nn.Linear)}


def written_out(W, r, scale, bits, T):
    "LoftQ as the paper writes it: T alternations from L = s·BA = 0, L kept as one matrix (the full SVD, no split)."
    L = torch.zeros_like(W)
    for _ in range(T):
        Q = nf_roundtrip(W - L, bits)
        U, S, Vh = torch.linalg.svd(W - Q)
        L = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    return Q, L


# (a) the kit's alternation against independent loops
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_loftq_factors_match_the_written_out_loop(block0, bits):
    W, r, s = block0["self_attn.q_proj"], 16, 2.0
    Q, A, B = loftq_factors(W, r, s, bits=bits, iters=1)
    Q_ref, L_ref = written_out(W, r, s, bits, 1)
    assert torch.equal(Q, Q_ref)
    assert relative_error(L_ref, s * B @ A) < 1e-5
    assert A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r)
    Q, A, B = loftq_factors(W, r, s, bits=bits, iters=3)
    Q_ref, L_ref = written_out(W, r, s, bits, 3)  # scales differ in the last bit, and a tie may round the other way
    assert torch.isclose(Q, Q_ref, rtol=1e-5, atol=1e-8).float().mean() > 0.999
    assert relative_error(Q_ref + L_ref, Q + s * B @ A) < 1e-4


def test_iters_0_is_qloras_start_and_steps_agree_with_factors(block0):
    W = block0["mlp.down_proj"]
    Q, A, B = loftq_factors(W, 8, 2.0, iters=0)
    assert torch.equal(Q, nf_roundtrip(W)) and not A.any() and not B.any()
    for t, (Q_t, A_t, B_t) in zip(range(4), loftq_steps(W, 8, 2.0)):
        for got, want in zip((Q_t, A_t, B_t), loftq_factors(W, 8, 2.0, iters=t)): assert torch.equal(got, want)


def test_4bit_loftq_is_pefts_algorithm_with_bitsandbytes_quantizer(block0):
    "peft's loftq_init runs on CUDA only; here its loop on bitsandbytes' CPU NF4 and peft's own SVD split, at s = 1 (peft ignores s)."
    try: from peft.utils.loftq_utils import _low_rank_decomposition
    except ImportError: pytest.skip("peft's private LoftQ helper moved")
    W, r, T = block0["self_attn.o_proj"], 16, 2
    res = W.clone()
    for i in range(T):
        Q = bnbF.dequantize_4bit(*bnbF.quantize_4bit(res, blocksize=64, quant_type="nf4", compress_statistics=False))
        parts = _low_rank_decomposition(W - Q, reduced_rank=r)
        res = W - parts["L"] @ parts["R"]
    ours_Q, A, B = loftq_factors(W, r, 1.0, bits=4, iters=T)
    assert torch.isclose(ours_Q, Q, atol=1e-7).float().mean() > 0.999
    assert relative_error(parts["L"] @ parts["R"], B @ A) < 1e-3


# (b) the error on the shipped base
@pytest.mark.parametrize("bits", [2, 4])
def test_error_falls_with_iterations_and_beats_qlora(block0, bits):
    for name, W in block0.items():
        errors = [relative_error(W, Q + 2.0 * B @ A) for _, (Q, A, B) in zip(range(5), loftq_steps(W, 16, 2.0, bits))]
        assert errors[1] < 0.97 * errors[0], (name, errors)  # t = 0 is QLoRA's ‖W − Q(W)‖
        assert all(b <= 1.02 * a for a, b in zip(errors, errors[1:])), (name, errors)  # 2 bits: k_proj rises 0.6% at t=4


# (c) the levels
def test_4bit_levels_are_bitsandbytes_nf4():
    assert torch.allclose(nf_levels(4), bnbF.get_4bit_type("nf4", device="cpu"), atol=1e-4)
    assert torch.equal(nf4_levels(), nf_levels(4))
    torch.manual_seed(0)
    W = torch.randn(128, 256) * 0.02
    theirs = bnbF.dequantize_4bit(*bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False))
    assert torch.isclose(nf_roundtrip(W, 4), theirs, atol=1e-7).float().mean() > 0.999


@pytest.mark.parametrize("bits", [2, 3])
def test_2_and_3_bit_levels_are_loftqs_normal_float(bits):
    "LoftQ's NFQuantizer construction (asymmetric, exact zero, NF4's offset), written with scipy here."
    norm = pytest.importorskip("scipy.stats").norm
    half, offset = 2 ** (bits - 1), 0.9677083
    values = np.sort(np.concatenate([norm.ppf(np.linspace(offset, 0.5, half + 1)[:-1]), [0.0],
                                     -norm.ppf(np.linspace(offset, 0.5, half)[:-1])]))
    assert np.allclose(nf_levels(bits).numpy(), values / values.max(), atol=1e-6)
    assert len(nf_levels(bits)) == 2 ** bits and (nf_levels(bits) == 0).sum() == 1


def test_a_block_of_zeros_stays_zeros():
    W = torch.zeros(2, 64)
    W[1] = torch.linspace(-1, 1, 64)
    out = nf_roundtrip(W, 2)
    assert torch.isfinite(out).all() and not out[0].any()


# (d) the init in add_lora
@pytest.mark.parametrize("bits", [2, 4])
def test_add_lora_loftq_puts_q_t_in_the_base(bits):
    original = tiny_llama()
    model = add_lora(tiny_llama(), "all-linear", r=8, alpha=16, init_lora_weights="loftq", loftq_bits=bits, loftq_iter=2)
    for name, layer in adapter_layers(model).items():
        W = original.get_submodule(name).weight.detach()
        Q, A, B = loftq_factors(W, 8, layer.scaling["default"], bits=bits, iters=2)
        assert torch.equal(layer.base.weight, Q)
        assert torch.equal(layer.lora_A["default"].weight.detach(), A) and torch.equal(layer.lora_B["default"].weight.detach(), B)
        assert relative_error(W, layer.base.weight + layer.delta_weight()) < relative_error(W, nf_roundtrip(W, bits))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.settings["default"]["loftq_config"] == {"loftq_bits": bits, "loftq_iter": 2}
    assert layer.peft_config()["init_lora_weights"] is True and "loftq_config" not in layer.peft_config()


def test_loftq_on_a_bf16_base_keeps_its_dtype_and_fp32_adapters():
    model = add_lora(tiny_llama().to(torch.bfloat16), ["q_proj"], r=4, alpha=8, init_lora_weights="loftq")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    W = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach()
    assert relative_error(W, layer.base.weight.float() + layer.delta_weight()) < relative_error(W, nf_roundtrip(W))


# (e) saving with the base, loading again
@pytest.fixture(scope="module")
def saved_loftq(tmp_path_factory):
    model = add_lora(tiny_llama(), "all-linear", r=8, alpha=16, init_lora_weights="loftq", loftq_iter=2).eval()
    folder = save_loftq(model, tmp_path_factory.mktemp("loftq") / "adapter", tokenizer=byte_tokenizer())
    return model, folder


def test_save_loftq_writes_the_base_and_an_adapter_naming_it(saved_loftq):
    model, folder = saved_loftq
    config = read_adapter_config(folder)
    assert config["base_model_name_or_path"] == str(folder / "base")
    assert config["init_lora_weights"] is True and "loftq_config" not in config
    base = AutoModelForCausalLM.from_pretrained(folder / "base")  # a plain checkpoint: every key loads, none is LoRA's
    assert not any("lora" in k or ".base." in k for k in base.state_dict())
    for name, layer in adapter_layers(model).items(): assert torch.equal(base.get_submodule(name).weight, layer.base.weight)
    assert not list(folder.parent.glob(".*partial"))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # transformers, inside peft
def test_fp32_reload_gives_the_same_logits_and_peft_agrees(saved_loftq):
    model, folder = saved_loftq
    reloaded, _, _ = open_adapter(folder)
    assert torch.equal(logits(reloaded), logits(model))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"), folder)
    assert (logits(theirs) - logits(model)).abs().max() < 1e-5


def test_4bit_reload_is_close_and_exact_without_double_quant(saved_loftq):
    model, folder = saved_loftq
    reloaded, _, _ = open_adapter(folder, four_bit=True)
    assert (logits(reloaded) - logits(model)).abs().max() < FOUR_BIT_TOLERANCE
    plain = keep_trainable_layout(AutoModelForCausalLM.from_pretrained(
        folder / "base", quantization_config=nf4_config(torch.float32, double_quant=False), dtype=torch.float32, device_map="cpu"))
    for name, layer in adapter_layers(model).items():  # Q_T is NF4 already: bitsandbytes finds the same codes and scales
        assert torch.isclose(dense_weight(plain.get_submodule(name)), layer.base.weight, atol=1e-7).float().mean() > 0.999


def test_save_loftq_refuses_merged_and_4bit(saved_loftq, tmp_path):
    model = add_lora(tiny_llama(), ["q_proj"], r=4, init_lora_weights="loftq")
    merge_lora(model)
    with pytest.raises(ConfigError, match="unmerge_lora"): save_loftq(model, tmp_path / "m")
    with pytest.raises(ConfigError, match="save the adapter alone"):
        save_loftq(add_lora(load_4bit(str(saved_loftq[1] / "base")), ["q_proj"], r=4), tmp_path / "q")
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()


# (f) one LoftQ step on a model already in 4 bits
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    tiny_llama().save_pretrained(path)
    return path


def test_replace_lora_weights_loftq_lowers_the_start_error(checkpoint):
    W = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach()
    model = add_lora(load_4bit(str(checkpoint)), "all-linear", r=8, alpha=16)
    layer = model.model.layers[0].self_attn.q_proj
    start = lambda: relative_error(W, dense_weight(layer.base).float() + layer.delta_weight())
    before = start()
    assert before == pytest.approx(relative_error(W, dense_weight(layer.base).float()))  # B = 0: QLoRA's start
    assert replace_lora_weights_loftq(model, checkpoint) is model
    assert start() < 0.95 * before
    U, S, Vh = torch.linalg.svd(W - dense_weight(layer.base).float())
    assert relative_error(U[:, :8] @ torch.diag(S[:8]) @ Vh[:8], layer.delta_weight()) < 1e-4  # s divided out
    replace_lora_weights_loftq(model, checkpoint / "model.safetensors")  # the file itself works too
    assert start() < 0.95 * before


# (g) what is refused
@pytest.mark.parametrize("kwargs, match", [
    (dict(loftq_bits=5), "loftq_bits must be one of 2, 3, 4, got 5"),
    (dict(loftq_bits=8), "loftq_bits must be one of 2, 3, 4, got 8"),
    (dict(loftq_iter=-1), "loftq_iter must be an integer >= 0, got -1"),
    (dict(loftq_iter=1.5), "loftq_iter must be an integer >= 0"),
])
def test_bad_loftq_settings_are_refused_and_change_nothing(kwargs, match):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=match) as e: add_lora(model, init_lora_weights="loftq", **kwargs)
    assert e.value.field in ("loftq_bits", "loftq_iter")
    assert not adapter_layers(model) and torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                                                     tiny_llama().model.layers[0].self_attn.q_proj.weight)


def test_a_4bit_base_with_init_loftq_points_at_replace_lora_weights_loftq(checkpoint):
    with pytest.raises(ConfigError, match="replace_lora_weights_loftq") as e:
        add_lora(load_4bit(str(checkpoint)), init_lora_weights="loftq")
    assert e.value.field == "init_lora_weights"


def test_a_layer_that_is_not_whole_blocks_is_refused():
    with pytest.raises(ConfigError, match="blocks of 64"): LoRALinear(nn.Linear(10, 10), r=2, alpha=2, init_lora_weights="loftq")


def test_replace_lora_weights_loftq_refuses_what_it_cannot_use(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="on a 4-bit base"): replace_lora_weights_loftq(add_lora(tiny_llama(), r=4), checkpoint)
    model = add_lora(load_4bit(str(checkpoint)), r=4)
    with pytest.raises(MissingFileError, match="No safetensors checkpoint"): replace_lora_weights_loftq(model, tmp_path)
    other = tmp_path / "other"
    tiny_llama(hidden_size=128).save_pretrained(other)
    with pytest.raises(ConfigError, match="pass the checkpoint this model was loaded from"): replace_lora_weights_loftq(model, other)


def test_loftq_iter_0_is_qloras_start_at_any_bits():
    "t = 0: the base becomes Q(W) (2-bit NormalFloat here), A starts as LoRA's (kaiming, non-zero), B = 0: step 0 is Q(W)."
    W = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = add_lora(tiny_llama(), ["q_proj"], r=4, alpha=8, init_lora_weights="loftq", loftq_bits=2, loftq_iter=0)
    layer = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer.base.weight, nf_roundtrip(W, 2))
    assert layer.lora_A["default"].weight.abs().sum() > 0 and layer.lora_B["default"].weight.abs().sum() == 0


def test_finetune_init_loftq_saves_the_base_it_trained_on(tmp_path):
    "`lora-kit finetune --init loftq --loftq-bits 2`: OUTPUT/base holds Q_T (2-bit levels), the adapter names it and opens."
    import subprocess, sys, json
    from lora_kit.qlora import open_adapter
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "finetune", "--init", "loftq", "--loftq-bits", "2",
                        "--max-steps", "2", "--eval-examples", "2", "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve()) and config["init_lora_weights"] is True
    model = open_adapter(out)[0]
    layer = adapter_layers(model)["model.layers.0.self_attn.v_proj"]
    blocks = layer.base.weight.detach().reshape(-1, 64)
    assert max(len(torch.unique(b)) for b in blocks) <= 4  # two bits: four NormalFloat levels per block of 64


def test_finetune_refuses_loftq_settings_that_cannot_apply():
    from lora_kit.finetune import FinetuneConfig
    with pytest.raises(ConfigError, match="init_lora_weights='loftq'") as e: FinetuneConfig(loftq_bits=2)
    assert e.value.field == "loftq_bits"
    with pytest.raises(ConfigError, match="LoftQ") as e: FinetuneConfig(init_lora_weights="loftq", four_bit=True)
    assert e.value.field == "four_bit"
    with pytest.raises(ConfigError) as e: FinetuneConfig(init_lora_weights="loftq", loftq_bits=5)
    assert e.value.field == "loftq_bits"
