"""The closed-form accounting against independent references: parameter counts of meta-device models (transformers
and peft), FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` in a real forward + backward on the meta
device, and the tensors autograd saves in a real CPU forward pass."""
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lora_kit import accounting as acc
from lora_kit.core import ConfigError, asset_path, llama2_config

ALL = list(acc.LLAMA_LINEARS)
CONFIGS = {
    # grouped-query attention (4 query heads per key/value head), untied embeddings
    "gqa-untied": LlamaConfig(vocab_size=5000, hidden_size=512, intermediate_size=1376, num_hidden_layers=3,
                              num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False),
    # multi-head attention, tied embeddings, a head width that is not hidden/heads
    "mha-tied": LlamaConfig(vocab_size=3000, hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=6, head_dim=48, tie_word_embeddings=True),
    # multi-query attention (one key/value head)
    "mqa": LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=False),
}


def meta_model(config, method="full", rank=8, targets=("q_proj", "v_proj")):
    "The reference: transformers' own model (of a `LlamaConfig`, or a LLaMA-2 size by name) on the meta device."
    if isinstance(config, str): config = llama2_config(config)
    with torch.device("meta"): model = LlamaForCausalLM(config)
    if method == "full": return model
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))


def counted_flops(model, batch_size, seq_len, train=True):
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        if train: model(input_ids=ids, labels=ids).loss.backward()
        else:
            with torch.no_grad(): model(input_ids=ids)
    return counter.get_total_flops()


def n_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method, rank, targets", [
    ("full", 8, ("q_proj", "v_proj")), ("lora", 8, ("q_proj", "v_proj")), ("lora", 16, ALL),
    ("lora", 4, ("down_proj",)), ("lora", 2, ("k_proj", "o_proj"))])
def test_params_and_train_flops_match_meta_models(name, method, rank, targets):
    config = CONFIGS[name]
    model = meta_model(config, method, rank, targets)
    counts = acc.param_counts(config, acc.Setup(method, rank, targets))
    assert (counts["total"], counts["trainable"]) == (n_params(model), n_params(model, trainable_only=True))
    flops = acc.train_flops(config, acc.Setup(method, rank, targets, batch_size=2, seq_len=96))
    assert flops["total"] == pytest.approx(counted_flops(model, 2, 96), rel=0.01)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("name", ["llama-2-13b", "llama-2-70b"])
def test_llama2_flops_match_the_counter(name, method):
    config = acc.load_config(name)
    model = meta_model(name, method, 8, ("q_proj", "v_proj"))
    assert acc.param_counts(config, acc.Setup(method))["total"] == n_params(model)
    assert acc.train_flops(config, acc.Setup(method, seq_len=512))["total"] == pytest.approx(counted_flops(model, 1, 512), rel=0.01)


def test_llama2_7b_lora_costs_two_thirds_of_full():
    config = acc.load_config("llama-2-7b")
    full = counted_flops(meta_model("llama-2-7b"), 1, 512)
    lora = counted_flops(meta_model("llama-2-7b", "lora"), 1, 512)
    assert acc.train_flops(config, acc.Setup("full", seq_len=512))["total"] == pytest.approx(full, rel=0.01)
    assert lora / full == pytest.approx(0.67, abs=0.01)


def test_qlora_multiplies_like_lora_and_states_dequantization_apart():
    config = CONFIGS["gqa-untied"]
    lora, qlora = (acc.train_flops(config, acc.Setup(m, seq_len=64)) for m in ("lora", "qlora"))
    assert qlora["total"] == lora["total"] == pytest.approx(counted_flops(meta_model(config, "lora"), 1, 64), rel=0.01)
    block_linear_weights = 3 * sum(i * o for i, o in acc.block_linears(config).values())
    # every 4-bit weight is dequantized once forward and at most once more backward
    assert lora["dequant"] == 0 and block_linear_weights < qlora["dequant"] < 2.1 * block_linear_weights


@pytest.mark.parametrize("merged", [True, False])
def test_inference_flops_merged_and_unmerged(merged):
    config = CONFIGS["gqa-untied"]
    model = meta_model(config) if merged else meta_model(config, "lora", 16, ALL)
    assert acc.inference_flops(config, acc.Setup(rank=16, targets=ALL, batch_size=2, seq_len=80), merged) == pytest.approx(
        counted_flops(model, 2, 80, train=False), rel=0.01)


def autograd_saved_bytes(model, batch_size, seq_len, attn):
    "Distinct non-parameter storages autograd saves in one CPU forward pass."
    model.config._attn_implementation = attn
    params, storages = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}
    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): model.train()(input_ids=ids, labels=ids)
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("method, targets, attn, precision", [
    ("full", (), "eager", "fp32"), ("full", (), "sdpa", "bf16"), ("lora", ("q_proj", "v_proj"), "eager", "bf16"),
    ("lora", ALL, "sdpa", "fp32"), ("lora", ("k_proj", "up_proj"), "eager", "fp32")])
def test_activations_match_what_autograd_saves(method, targets, attn, precision):
    config = LlamaConfig(vocab_size=700, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32 if precision == "fp32" else torch.bfloat16)
    if method == "lora": model = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets)))
    measured = autograd_saved_bytes(model, 2, 96, attn)
    predicted = acc.saved_bytes(config, acc.Setup(method, 4, targets or ("q_proj",), precision, 96, 2, attn))
    assert predicted == pytest.approx(measured, rel=0.10)


def test_weights_gradients_optimizer_of_a_real_step():
    config = CONFIGS["mha-tied"]
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["gate_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, config.vocab_size, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    targets = ("gate_proj", "o_proj")
    mem = acc.memory_bytes(config, acc.Setup("lora", 4, targets, "fp32", seq_len=16))
    assert mem["weights"] == sum(p.nbytes for p in model.parameters())
    assert mem["gradients"] == sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    assert mem["optimizer"] == sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))


def test_bad_targets_and_methods_name_the_fix():
    with pytest.raises(ConfigError, match="q_proj,k_proj,v_proj"): acc.resolve_targets("query")
    with pytest.raises(ConfigError, match="'full', 'lora', 'qlora'"): acc.Setup("dora")
    with pytest.raises(ConfigError, match="neither a preset"): acc.estimate("llama-3")


def test_tiny_is_the_shipped_base_that_finetune_trains():
    model = AutoModelForCausalLM.from_pretrained(asset_path("tiny_base"))
    assert acc.estimate("tiny", method="full")["params_total"] == sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert acc.estimate("tiny", method="lora", rank=8)["params_trainable"] == sum(
        p.numel() for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_adamw8bit_state_of_a_real_step(method):
    import bitsandbytes as bnb
    config = CONFIGS["mha-tied"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if method == "lora": model = get_peft_model(model, LoraConfig(r=16, target_modules=["up_proj", "q_proj"]))
    opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, config.vocab_size, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    storages = {t.untyped_storage().data_ptr(): t.nbytes for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0}
    assert acc.optimizer_bytes(config, acc.Setup(method, 16, ("up_proj", "q_proj"), optimizer="adamw8bit")) == sum(storages.values())


def quantize_block_linears(model):
    "Replace every block linear of `model` by a bitsandbytes NF4 `Linear4bit` (double quantization), on the CPU."
    import bitsandbytes as bnb
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(module, name, q.to("cpu"))  # quantizes
    return model


def quant_state_bytes(model):
    import bitsandbytes as bnb
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return sum(t.nbytes for s in states for t in (s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qlora_weights_and_activations_with_real_4bit_layers(attn):
    config = LlamaConfig(vocab_size=700, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = quantize_block_linears(LlamaForCausalLM(config).to(torch.bfloat16))
    targets = ("q_proj", "v_proj", "down_proj")
    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(targets)))
    weights = sum(p.nbytes for p in model.parameters()) + quant_state_bytes(model)
    qlora = acc.Setup("qlora", 8, targets, "bf16", 64, 2, attn, quant="nf4", double_quant=True)
    assert acc.weight_bytes(config, qlora) == weights
    measured = autograd_saved_bytes(model, 2, 64, attn)
    assert acc.saved_bytes(config, qlora) == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("field, value, message", [
    ("method", "dora", "method must be one of 'full', 'lora', 'qlora', got 'dora'"),
    ("rank", 0, "rank must be an integer >= 1, got 0"), ("rank", True, "rank must be an integer >= 1, got True"),
    ("seq_len", 2.5, "seq_len must be an integer >= 1"), ("batch_size", -1, "batch_size must be an integer >= 1"),
    ("precision", "fp8", "precision must be one of 'fp32', 'bf16'"), ("attn", "flash", "attn must be 'eager' or 'sdpa', got 'flash'"),
    ("optimizer", "sgd", "optimizer must be 'adamw' or 'adamw8bit', got 'sgd'"), ("quant", "fp4", "quant must be 'nf4' or 'int8', got 'fp4'"),
    ("targets", "query", "LoRA targets query unknown"), ("targets", (), "no LoRA targets given"),
])
def test_a_setup_refuses_a_bad_setting_when_it_is_made_naming_it(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as refused: acc.Setup(**{field: value})
    assert refused.value.field == field


def test_a_setup_resolves_its_targets_once_and_refuses_dora_on_other_methods():
    setup = acc.Setup(targets="v_proj, q_proj,v_proj")
    assert setup.targets == ("v_proj", "q_proj") and setup.tokens == 512 and not setup.full
    assert acc.Setup(targets="all-linear").targets == acc.LLAMA_LINEARS
    with pytest.raises(ConfigError, match="DoRA adapts 16/32-bit bases: use method 'lora', not 'qlora'"):
        acc.Setup("qlora", use_dora=True)
    with pytest.raises(Exception): setup.rank = 4  # frozen: a setup read by one count is the setup of the next


def test_estimate_takes_a_setup_or_its_fields_and_every_method_is_one_call():
    setup = acc.Setup("qlora", 16, "all-linear", seq_len=256)
    assert acc.estimate("llama-2-7b", setup) == acc.estimate("llama-2-7b", method="qlora", rank=16, targets="all-linear", seq_len=256)
    assert acc.estimate("llama-2-7b", setup, rank=4)["rank"] == 4  # fields given with a setup replace its own
    each = acc.estimate_methods("llama-2-7b", acc.Setup(rank=16, use_dora=True))
    assert list(each) == list(acc.METHODS)
    assert each["lora"]["use_dora"] and not each["full"]["use_dora"] and not each["qlora"]["use_dora"]
    config = acc.load_config("llama-2-7b")  # DoRA's extras, independently: one magnitude per output of q and v in 32 blocks
    assert each["lora"]["params_trainable"] - acc.param_counts(config, acc.Setup(rank=16))["trainable"] == 32 * 2 * 4096
