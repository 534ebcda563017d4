"load_adapter refuses every mismatch with an error naming it (peft only warns), and leaves the model untouched."
import json

import pytest, torch
from safetensors.torch import load_file, save_file

from lora_kit.core import tiny_llama
from lora_kit.inject import CONFIG_NAME, WEIGHTS_NAME, add_lora, load_adapter, save_adapter
from lora_kit.layers import LoRALinear


@pytest.fixture
def adapter(tmp_path):
    return save_adapter(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8), tmp_path / "adapter")


def edit_config(folder, **changes):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not ...}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def edit_weights(folder, edit):
    weights = load_file(folder / WEIGHTS_NAME)
    edit(weights)
    save_file(weights, folder / WEIGHTS_NAME)


def assert_refused(folder, exc, *fragments):
    model = tiny_llama()
    with pytest.raises(exc) as e: load_adapter(model, folder)
    for f in fragments: assert f in str(e.value)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()), "a failed load left adapters behind"


def test_missing_config(adapter):
    (adapter / CONFIG_NAME).unlink()
    assert_refused(adapter, FileNotFoundError, "No adapter_config.json")


def test_missing_weights_and_pickle_hint(adapter):
    (adapter / WEIGHTS_NAME).rename(adapter / "adapter_model.bin")
    assert_refused(adapter, FileNotFoundError, "adapter_model.safetensors", "pickle")


def test_config_not_json(adapter):
    (adapter / CONFIG_NAME).write_text("{r: 4,")
    assert_refused(adapter, ValueError, "not valid JSON")


def test_not_lora(adapter):
    edit_config(adapter, peft_type="PREFIX_TUNING")
    assert_refused(adapter, ValueError, "peft_type='PREFIX_TUNING'")


def test_missing_r(adapter):
    edit_config(adapter, r=...)
    assert_refused(adapter, ValueError, "lacks r")


def test_dora_config_without_its_magnitudes_is_incomplete(adapter):
    edit_config(adapter, use_dora=True)
    assert_refused(adapter, ValueError, "lora_magnitude_vector", "incomplete")


def test_unsupported_peft_feature(adapter):
    edit_config(adapter, layer_replication=[[0, 1], [0, 1]])
    assert_refused(adapter, ValueError, "layer_replication")


def test_key_the_model_lacks(adapter):
    edit_weights(adapter, lambda w: w.update({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}))
    assert_refused(adapter, ValueError, "layers.9.self_attn.q_proj.lora_A.weight")


def test_key_the_file_lacks(adapter):
    edit_weights(adapter, lambda w: w.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    assert_refused(adapter, ValueError, "layers.1.self_attn.v_proj.lora_B.weight", "incomplete")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    other = save_adapter(add_lora(tiny_llama(hidden_size=96, intermediate_size=256), ["v_proj"], r=4), tmp_path)
    assert_refused(other, ValueError, "v_proj.lora_A.weight", "(4, 96)", "(4, 64)")


def test_truncated_safetensors(adapter):
    data = (adapter / WEIGHTS_NAME).read_bytes()
    (adapter / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    assert_refused(adapter, ValueError, "not a readable safetensors file")


def test_targets_matching_nothing(adapter):
    edit_config(adapter, target_modules=["query_key_value"])
    assert_refused(adapter, ValueError, "matched no module", "q_proj")
