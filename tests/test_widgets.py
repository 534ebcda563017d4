"The dashboard driven headlessly: set widget values as a learner would, check the data it shows."
import pytest
import torch
from transformers import LlamaForCausalLM

from lora_kit.core import ConfigError
from lora_kit.widgets import Dashboard, custom_config


def test_dashboard_follows_its_widgets():
    dash = Dashboard()
    dash.model.value, dash.rank.value, dash.targets.value = "llama-2-13b", 32, ("q_proj", "k_proj", "down_proj")
    # r·(in+out) per adapted linear, 40 blocks of width 5120 and MLP width 13824
    assert dash.data["params_trainable"] == 40 * 32 * (2 * (5120 + 5120) + (13824 + 5120))
    dash.method.value, dash.gpu.value = "full", "H100 80GB"
    assert dash.data["fits_gpu"] is False  # 13B × (2 + 2 + 8) bytes is over 80 GB before any activation
    dash.model.value = "custom"
    for name, value in dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                            intermediate_size=512, vocab_size=900).items(): dash.custom[name].value = value
    with torch.device("meta"): reference = LlamaForCausalLM(dash.config())
    assert dash.data["params_total"] == sum(p.numel() for p in reference.parameters())
    batch_1 = dash.data["memory_gib"]["full"]["activations"]
    dash.batch_size.value = 4
    # activations grow with the batch (all but RoPE's cos/sin tables, shared by the batch)
    assert dash.data["memory_gib"]["full"]["activations"] / batch_1 == pytest.approx(4, rel=0.01)


def test_bad_settings_show_a_reason_not_numbers():
    dash = Dashboard()
    dash.model.value = "custom"
    dash.custom["num_key_value_heads"].value = 5  # 32 query heads cannot share 5 key/value heads
    assert dash.data is None and "key/value groups" in dash.summary.value
    with pytest.raises(ConfigError, match="key/value groups"): custom_config(num_key_value_heads=5)


def test_lorafa_box_gives_lorafa_estimates_and_is_off_for_full():
    from lora_kit.accounting import estimate
    dash = Dashboard()
    dash.targets.value, dash.lorafa.value = ("q_proj", "v_proj", "down_proj"), True
    expected = estimate("llama-2-7b", method="lora", targets=("q_proj", "v_proj", "down_proj"), lorafa=True)
    assert dash.data["params_trainable"] == expected["params_trainable"] == 32 * 8 * (4096 + 4096 + 4096)  # B: out×r
    assert dash.data["total_gib"] * 2**30 == pytest.approx(expected["memory_bytes"]["total"])
    dash.method.value = "full"
    assert dash.lorafa.disabled and dash.data is not None
