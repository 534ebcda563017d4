"""Many adapters on one base, checked against peft both ways: switching, several active, mixed batches (forward and
generate), weighted combinations, peft's folder layout, hot swap under torch.compile, and training one named adapter."""
import pytest, torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora_kit.core import ConfigError, LoraKitError, byte_tokenizer, tiny_llama
from lora_kit.inject import (BASE_ROW, AdapterError, adapter_folders, adapter_layers, adapter_names, adapter_per_row,
                             add_lora, add_weighted_adapter, active_adapters, delete_adapter, hotswap_adapter,
                             load_adapter, merge_lora, save_adapter, set_adapter, unmerge_lora)

from conftest import IDS, logits, randomize_B

ADAPTERS = {  # name: (peft LoraConfig arguments)
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "id-en": dict(r=2, lora_alpha=8, target_modules=["v_proj", "o_proj", "down_proj"], use_rslora=True),
    "third": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    "peft's model with three trained-looking adapters, saved by peft in one folder, and lora_kit's model loaded from it."
    folder = tmp_path_factory.mktemp("peft_adapters")
    theirs = None
    for name, kwargs in ADAPTERS.items():
        config = LoraConfig(**kwargs, init_lora_weights=False, task_type="CAUSAL_LM")
        if theirs is None: theirs = get_peft_model(tiny_llama(), config)
        else: theirs.add_adapter(name, config)
    randomize_B(theirs, seed=5)
    theirs.save_pretrained(folder)
    ours = tiny_llama()
    for name, path in adapter_folders(folder).items(): load_adapter(ours, path, adapter_name=name)
    return theirs.eval(), ours.eval(), folder


def set_both(theirs, ours, active):
    theirs.base_model.set_adapter(active)
    set_adapter(ours, active)


def test_peft_folder_layout_lists_each_adapter(peft_pair):
    _, ours, folder = peft_pair
    assert {n: p.relative_to(folder).as_posix() for n, p in adapter_folders(folder).items()} == {
        "default": ".", "id-en": "id-en", "third": "third"}
    assert adapter_names(ours) == list(ADAPTERS) and active_adapters(ours) == ["default"]


@pytest.mark.parametrize("active", ["default", "id-en", "third", ["default", "id-en"], ["default", "id-en", "third"]])
def test_each_active_set_gives_peft_logits(peft_pair, active):
    theirs, ours, _ = peft_pair
    set_both(theirs, ours, active)
    assert (logits(ours) - logits(tiny_llama())).abs().max() > 1e-3
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5


@pytest.mark.parametrize("rows", [["default", "id-en", BASE_ROW, "third"], ["id-en", "id-en", "default", BASE_ROW]])
def test_mixed_batch_forward_and_generate_equal_peft(peft_pair, rows):
    theirs, ours, _ = peft_pair
    set_both(theirs, ours, "third")  # the active set does not matter to a mixed batch
    batch = byte_tokenizer()(["Apa kabar?", "Selamat pagi, dunia!", "Terima kasih", "Sampai jumpa"],
                             return_tensors="pt", padding=True)
    with torch.no_grad(), adapter_per_row(ours, rows):
        ours_logits = ours(**batch).logits
        ours_out = ours.generate(**batch, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        theirs_logits = theirs(**batch, adapter_names=rows).logits
        theirs_out = theirs.generate(**batch, max_new_tokens=8, do_sample=False, adapter_names=rows)
    assert (ours_logits - theirs_logits).abs().max() < 1e-5
    assert torch.equal(ours_out, theirs_out)
    assert all(layer.row_adapters is None for layer in adapter_layers(ours).values())  # the context cleans up


def test_mixed_batch_errors_name_the_problem(peft_pair):
    _, ours, _ = peft_pair
    with pytest.raises(ConfigError, match="No adapter named 'nope'"):
        with adapter_per_row(ours, ["default", "nope"]): pass
    with adapter_per_row(ours, ["default", "id-en"]):
        with pytest.raises(ConfigError, match="names 2 adapters but the batch has 1 rows"), torch.no_grad():
            ours(IDS["input_ids"][:1])
    set_adapter(ours, "default"); merge_lora(ours)
    try:
        with pytest.raises(LoraKitError, match="merged into the base"):
            with adapter_per_row(ours, ["default", "id-en"]): pass
    finally: unmerge_lora(ours)


@pytest.mark.parametrize("name", ["train", "half", "cuda", "eval", "a.b", ""])
def test_names_nn_moduledict_cannot_hold_are_refused_before_any_layer_changes(name):
    "An adapter named like one of nn.ModuleDict's own attributes (`train`, `half`) would raise a bare KeyError deep in torch."
    model = tiny_llama()
    with pytest.raises(ConfigError, match=f"adapter name {name!r}: (nn.ModuleDict|use a non-empty)"):
        add_lora(model, ["q_proj"], r=2, adapter_name=name)
    assert adapter_layers(model) == {}
    add_lora(model, ["q_proj"], r=2, adapter_name=f"{name.replace('.', '')}-lora")  # a prefix or suffix is enough
    assert adapter_names(model) == [f"{name.replace('.', '')}-lora"]


def test_dora_rows_equal_each_adapter_alone():
    "peft refuses DoRA in a mixed batch; lora_kit's per-row forward runs each row's variant: checked row by row."
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, use_dora=True, init_lora_weights=False)
    add_lora(model, ["v_proj"], r=2, adapter_name="plain", init_lora_weights=False)
    model.eval()
    rows = ["plain", "default"]
    with torch.no_grad(), adapter_per_row(model, rows): mixed = model(**IDS).logits
    for i, name in enumerate(rows):
        set_adapter(model, name)
        with torch.no_grad(): alone = model(**{k: v[i:i + 1] for k, v in IDS.items()}).logits
        assert (mixed[i:i + 1] - alone).abs().max() < 1e-5


COMBINATIONS = [("linear", ["default", "third"], {}), ("cat", ["default", "id-en"], {}), ("svd", ["default", "id-en"], {}),
                ("svd", ["default", "id-en", "third"], dict(svd_rank=3)), ("cat", ["id-en"], {})]


@pytest.mark.parametrize("combination_type, adapters, extra", COMBINATIONS, ids=lambda v: str(v))
def test_weighted_combinations_equal_peft(peft_pair, combination_type, adapters, extra):
    theirs, ours, _ = peft_pair
    name = f"{combination_type}-{'+'.join(adapters)}-{extra.get('svd_rank', '')}"
    weights = [0.6, -0.5, 1.3][:len(adapters)]
    theirs.add_weighted_adapter(adapters, weights, name, combination_type=combination_type, **extra)
    add_weighted_adapter(ours, adapters, weights, name, combination_type=combination_type, **extra)
    assert name not in active_adapters(ours)  # joins inactive, as in peft
    set_both(theirs, ours, name)
    assert (logits(ours) - logits(tiny_llama())).abs().max() > 1e-3
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5
    assert ours.lora_configs[name]["r"] == theirs.peft_config[name].r
    delete_adapter(ours, name); theirs.delete_adapter(name)
    set_both(theirs, ours, "default")


def test_cat_is_the_weighted_sum_of_the_updates(peft_pair):
    "Closed form: cat's update is exactly Σ w·ΔW_i on a layer holding both adapters."
    _, ours, _ = peft_pair
    add_weighted_adapter(ours, ["default", "id-en"], [0.6, -0.5], "sum", combination_type="cat")
    v = ours.model.layers[1].self_attn.v_proj
    want = 0.6 * v.delta_weight("default") - 0.5 * v.delta_weight("id-en")
    assert (v.delta_weight("sum") - want).abs().max() < 1e-6
    delete_adapter(ours, "sum")


def test_weighted_adapter_errors_leave_the_model_as_it_was(peft_pair):
    _, ours, _ = peft_pair
    before = adapter_names(ours)
    with pytest.raises(ConfigError, match="one rank"):
        add_weighted_adapter(ours, ["default", "id-en"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ConfigError, match="No adapter named 'nope'"): add_weighted_adapter(ours, ["nope"], [1], "x")
    with pytest.raises(ConfigError, match="already"): add_weighted_adapter(ours, ["default"], [1], "third")
    with pytest.raises(ConfigError, match="use one of"): add_weighted_adapter(ours, ["default"], [1], "x", combination_type="ties")
    dora = add_lora(tiny_llama(), ["q_proj"], use_dora=True)
    add_lora(dora, ["q_proj"], adapter_name="b")
    with pytest.raises(LoraKitError, match="DoRA"): add_weighted_adapter(dora, ["default", "b"], [1, 1], "x", "cat")
    assert adapter_names(dora) == ["default", "b"] and all(l.adapter_names == ["default", "b"] for l in adapter_layers(dora).values())
    assert adapter_names(ours) == before


def test_lora_kit_multi_adapter_folder_loads_in_peft(peft_pair, tmp_path):
    _, ours, _ = peft_pair
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for name, path in adapter_folders(tmp_path).items():
        if name != "default": theirs.load_adapter(path, adapter_name=name)
    for name in ADAPTERS:
        set_both(theirs, ours, name)
        assert (logits(theirs) - logits(ours)).abs().max() < 1e-5
    set_adapter(ours, "default")


def test_merge_and_unmerge_by_name(peft_pair):
    theirs, ours, _ = peft_pair
    set_both(theirs, ours, ["default", "id-en"])
    want = logits(theirs)
    merge_lora(ours, ["id-en"])
    assert all(l.merged_adapters == (["id-en"] if "id-en" in l.adapter_names else []) for l in adapter_layers(ours).values())
    assert (logits(ours) - want).abs().max() < 1e-5
    merge_lora(ours); unmerge_lora(ours, ["default"])
    assert {n for l in adapter_layers(ours).values() for n in l.merged_adapters} == {"id-en"}
    assert (logits(ours) - want).abs().max() < 1e-5
    unmerge_lora(ours)
    set_both(theirs, ours, "default")


def saved(tmp_path, name, targets, r, alpha, seed, **kwargs):
    model = add_lora(tiny_llama(), targets, r=r, alpha=alpha, **kwargs)
    randomize_B(model, seed)
    return save_adapter(model, tmp_path / name)


def test_hot_swap_keeps_the_compiled_graph(tmp_path):
    first = saved(tmp_path, "first", ["q_proj", "v_proj", "o_proj"], 4, 8, 1)
    smaller = saved(tmp_path, "smaller", ["q_proj", "v_proj"], 2, 16, 2, use_rslora=True)  # fewer targets, lower rank
    with torch.no_grad(): want = logits(load_adapter(tiny_llama(), smaller))
    model = load_adapter(tiny_llama(), first).eval()
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        before = compiled(**IDS).logits
        hotswap_adapter(model, smaller)
        with torch.compiler.set_stance("fail_on_recompile"): after = compiled(**IDS).logits
    assert (before - after).abs().max() > 1e-3
    assert (after - want).abs().max() < 1e-5
    assert all((l.lora_B["default"].weight == 0).all() for n, l in adapter_layers(model).items() if "o_proj" in n)
    # the check can fail: a changed scale is a new constant, and the graph must be recompiled
    model.model.layers[0].self_attn.q_proj.scaling["default"] *= 2
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"), pytest.raises(Exception, match="ecompil"):
        compiled(**IDS)


def test_hot_swap_refuses_what_does_not_fit_and_changes_nothing(tmp_path):
    model = load_adapter(tiny_llama(), saved(tmp_path, "base", ["q_proj", "v_proj"], 2, 4, 1))
    want = logits(model)
    for name, targets, r, kwargs, message in [
            ("more", ["q_proj", "v_proj", "k_proj"], 2, {}, "has base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight, for a layer"),
            ("wider", ["q_proj", "v_proj"], 4, {}, "takes rank <= 2"),
            ("dora", ["q_proj", "v_proj"], 2, dict(use_dora=True), "not a plain LoRA adapter")]:
        with pytest.raises(AdapterError, match=message): hotswap_adapter(model, saved(tmp_path, name, targets, r, 4, 2, **kwargs))
        assert torch.equal(logits(model), want)
    with pytest.raises(ConfigError, match="No adapter named 'other'"):
        hotswap_adapter(model, tmp_path / "base", adapter_name="other")


def test_train_one_named_adapter_leaves_the_others_unchanged(tmp_path):
    from lora_kit.train import TrainConfig, train
    from train_worker import examples
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4)
    add_lora(model, ["v_proj", "o_proj"], r=2, adapter_name="reverse")
    randomize_B(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".default." in k}
    trained = {k: v.clone() for k, v in model.state_dict().items() if ".reverse." in k}
    train(model, examples(), config=TrainConfig(max_steps=2, batch_size=2, save_every=2), output_dir=tmp_path,
          adapter_name="reverse")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in trained.items())
    assert active_adapters(model) == ["reverse"]
    folders = adapter_folders(next((tmp_path / "checkpoints").iterdir()))  # the checkpoint holds both, in peft's layout
    assert sorted(folders) == ["default", "reverse"]
