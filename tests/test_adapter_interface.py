"""The adapter-layer interface is the one seam for LoRA variants.

Only the adapter layer's modules may know the names of an adapter's weights: `lora_kit.layers` (the layer, `PlainLoRA`,
the inits), the modules its strategy tables (`VARIANTS`, `INITS`, `LEAN_FORWARD`) name, and any module defining a
`LoRALinear` subclass; everything else (inject, train, app, ...) goes through the interface. And a variant really is
one strategy class and one table entry: a toy variant (peft's `lora_bias`, a bias on B) written here, registered in
`VARIANTS`, then saved, loaded and checked against peft's own implementation of the same variant, without touching
the library.
"""
import ast, importlib, inspect
from pathlib import Path
import pytest, torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from lora_kit.core import ConfigError, tiny_llama
from lora_kit import layers as layers_module
from lora_kit.layers import LoRALinear, PlainLoRA, variant_for
from lora_kit.inject import (UNSUPPORTED, AdapterError, adapter_layers, add_lora, load_adapter, lora_disabled,
                             save_adapter, unsupported)

PKG = Path(__file__).resolve().parent.parent / "lora_kit"
WEIGHT_NAMES = {"lora_A", "lora_B", "lora_magnitude_vector"}


def names_used(source: str) -> set[str]:
    "Identifiers, attributes and string constants of `source` that are adapter-weight names."
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute): found.add(node.attr)
        elif isinstance(node, ast.Name): found.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str): found |= {w for w in WEIGHT_NAMES if w in node.value}
    return found & WEIGHT_NAMES


def defines_adapter_layer(module_name: str) -> bool:
    module = importlib.import_module(f"lora_kit.{module_name}")
    return any(inspect.isclass(c) and issubclass(c, LoRALinear) and c.__module__ == module.__name__ for c in vars(module).values())


def table_module(entry) -> str:
    "The module a strategy-table entry lives in: the part before ':' of a \"module:name\" string, else its `__module__`."
    return entry.partition(":")[0] if isinstance(entry, str) else entry.__module__


def adapter_layer_modules() -> set[str]:
    "Stems of the package's modules that make up the adapter layer: those its strategy tables name, and LoRALinear's own."
    entries = [*layers_module.VARIANTS.values(), *layers_module.INITS.values(), layers_module.LEAN_FORWARD]
    named = {table_module(e) for e in entries}
    stems = [py.stem for py in sorted(PKG.glob("*.py")) if py.stem not in ("__init__", "_modidx")]
    return {stem for stem in stems if f"lora_kit.{stem}" in named or defines_adapter_layer(stem)}


def test_only_adapter_layer_modules_name_the_adapter_weights():
    allowed = adapter_layer_modules()
    assert {"layers", "variants", "efficient"} <= allowed  # the tables were read: DoRA, pissa_init, lean_forward
    offenders = {}
    for py in sorted(PKG.glob("*.py")):
        if py.stem in ("__init__", "_modidx") or py.stem in allowed: continue
        if used := names_used(py.read_text()): offenders[py.name] = sorted(used)
    assert offenders == {}


def test_the_checker_finds_each_kind_of_mention():
    assert names_used('x.lora_B.weight\nlora_A = 1\nk = "base_model.lora_magnitude_vector"') == WEIGHT_NAMES


def test_the_checker_reads_both_kinds_of_table_entry():
    assert table_module("lora_kit.variants:DoRA") == "lora_kit.variants"
    assert table_module(PlainLoRA) == "lora_kit.layers" and table_module(layers_module.INITS[True]) == "lora_kit.layers"


class BiasedLoRA(PlainLoRA):
    "A toy variant: peft's `lora_bias`, a trainable bias on B (zero at the start), scaled with the update."

    def setup(self, layer, name):
        w = layer.lora_B[name].weight
        layer.lora_B[name].bias = nn.Parameter(torch.zeros(layer.out_features, dtype=w.dtype, device=w.device))

    def loraplus_parameters(self, layer, name):  # peft's LoRA+ puts B's bias with B
        return super().loraplus_parameters(layer, name) + [layer.lora_B[name].bias]

    def state_dict(self, layer, name):
        return super().state_dict(layer, name) | {"lora_B.bias": layer.lora_B[name].bias}

    def load_state(self, layer, name, tensors):
        super().load_state(layer, name, tensors)
        layer.lora_B[name].bias.copy_(tensors["lora_B.bias"])


@pytest.fixture
def registered():
    assert "lora_bias" in UNSUPPORTED and unsupported(dict(lora_bias=True)) == ["lora_bias"]
    layers_module.VARIANTS["lora_bias"] = BiasedLoRA
    yield BiasedLoRA
    del layers_module.VARIANTS["lora_bias"]


def trained(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.loraplus_parameters(): p.normal_(std=0.05)
    return model


def test_registering_a_variant_makes_its_field_supported(registered):
    assert unsupported(dict(lora_bias=True)) == []


def test_variant_for_picks_the_variant_a_config_field_selects(registered):
    from lora_kit.variants import DoRA
    assert type(variant_for({})) is PlainLoRA
    assert type(variant_for({"use_dora": True})) is DoRA
    assert type(variant_for({"lora_bias": True})) is BiasedLoRA
    with pytest.raises(ConfigError, match="together"): variant_for({"use_dora": True, "lora_bias": True})


def test_a_variant_is_one_class_and_one_registration(registered, tmp_path):
    ids = torch.randint(0, 260, (2, 12))
    ours = trained(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, lora_bias=True))
    assert {type(l.variants["default"]) for l in adapter_layers(ours).values()} == {BiasedLoRA}
    save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(ids).logits
        reloaded = load_adapter(tiny_llama(), tmp_path / "ours")  # VARIANTS picks BiasedLoRA from the config
        assert {type(l) for l in adapter_layers(reloaded).values()} == {LoRALinear}
        assert {type(l.variants["default"]) for l in adapter_layers(reloaded).values()} == {BiasedLoRA}
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-6)
        theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")  # peft's own lora_bias implementation
        assert torch.allclose(theirs(ids).logits, expected, atol=1e-5)
        with lora_disabled(reloaded): assert torch.allclose(reloaded(ids).logits, tiny_llama()(ids).logits, atol=1e-6)


def test_peft_variant_adapter_loads_through_the_registry(registered, tmp_path):
    ids = torch.randint(0, 260, (2, 12))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], lora_bias=True,
                                                         init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("lora_B.default.bias"): p.normal_(std=0.05)
        peft_model.save_pretrained(tmp_path)
        ours = load_adapter(tiny_llama(), tmp_path)
        assert {type(l.variants["default"]) for l in adapter_layers(ours).values()} == {BiasedLoRA}
        assert torch.allclose(ours(ids).logits, peft_model(ids).logits, atol=1e-5)


def test_without_the_registration_the_variant_is_refused_with_the_reason(tmp_path):
    assert "lora_bias" not in layers_module.VARIANTS
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], lora_bias=True))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="lora_bias"): load_adapter(tiny_llama(), tmp_path)
