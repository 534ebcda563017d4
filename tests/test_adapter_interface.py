"""The adapter-layer interface is the one seam for LoRA variants.

Only modules that define adapter-layer classes (subclasses of `LoRALinear`) may know the names of an adapter's
weights; everything else (inject, train, app, ...) goes through the interface. And a variant really is one class
and one registration: a toy variant (peft's `lora_bias`, a bias on B) written here, registered, then saved, loaded
and checked against peft's own implementation of the same variant, without touching the library.
"""
import ast, importlib, inspect
from pathlib import Path
import pytest, torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from lora_kit.core import tiny_llama
from lora_kit.layers import ADAPTER_LAYERS, LoRALinear, adapter_layer_for, register_adapter_layer
from lora_kit.inject import AdapterError, adapter_layers, add_lora, load_adapter, lora_disabled, save_adapter

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


def test_only_adapter_layer_modules_name_the_adapter_weights():
    offenders = {}
    for py in sorted(PKG.glob("*.py")):
        if py.stem in ("__init__", "_modidx") or defines_adapter_layer(py.stem): continue
        if used := names_used(py.read_text()): offenders[py.name] = sorted(used)
    assert offenders == {}


def test_the_checker_finds_each_kind_of_mention():
    assert names_used('x.lora_B.weight\nlora_A = 1\nk = "base_model.lora_magnitude_vector"') == WEIGHT_NAMES


class BiasedLoRA(LoRALinear):
    "A toy variant: peft's `lora_bias`, a trainable bias on B (zero at the start), scaled with the update."
    variant = {"lora_bias": True}

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False, **options):
        super().__init__(base, r, alpha, dropout, use_rslora, **options)
        self.lora_B.bias = nn.Parameter(torch.zeros(base.out_features, dtype=self.lora_B.weight.dtype))


@pytest.fixture
def registered():
    register_adapter_layer(BiasedLoRA)
    yield BiasedLoRA
    ADAPTER_LAYERS.remove(BiasedLoRA)


def trained(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.loraplus_parameters(): p.normal_(std=0.05)
    return model


def test_registry_picks_the_most_specific_class(registered):
    assert adapter_layer_for(dict(r=4, lora_alpha=8)) is LoRALinear
    assert adapter_layer_for(dict(r=4, lora_alpha=8, lora_bias=True)) is BiasedLoRA


def test_a_variant_is_one_class_and_one_registration(registered, tmp_path):
    ids = torch.randint(0, 260, (2, 12))
    ours = trained(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, layer_cls=BiasedLoRA))
    save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(ids).logits
        reloaded = load_adapter(tiny_llama(), tmp_path / "ours")  # the registry picks BiasedLoRA from the config
        assert {type(l) for l in adapter_layers(reloaded).values()} == {BiasedLoRA}
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
        assert torch.allclose(load_adapter(tiny_llama(), tmp_path)(ids).logits, peft_model(ids).logits, atol=1e-5)


def test_without_the_registration_the_variant_is_refused_with_the_reason(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], lora_bias=True))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="lora_bias"): load_adapter(tiny_llama(), tmp_path)
