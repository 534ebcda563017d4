"""`lora-kit export --adapter-only` (issue 33): an adapter alone as a llama.cpp LoRA GGUF, and the base it applies to.
References: the gguf library's own reader and tensor-name map, peft's `merge_and_unload` of the same adapter (peft
applies `use_rslora` itself), closed-form fp16 rounding, and llama.cpp through llama-cpp-python where that is installed.
"""
import json, math, shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = pytest.importorskip("gguf", reason="GGUF export needs the export extra: pip install 'lora_kit[export]'")

from lora_kit.cli import main
from lora_kit.core import ConfigError, tiny_llama
from lora_kit.data import demo_path, load_instructions, prompt_and_reference
from lora_kit.export import export_adapter_gguf, export_gguf, rope_interleave
from lora_kit.finetune import DEMO_ADAPTER
from lora_kit.tiny import base_path, generate

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def field(path, key):
    return gguf.GGUFReader(path).fields[key].contents()


def gguf_tensors(path):
    "A GGUF file's tensors in torch's shape (the reader lists ggml's ne, torch's shape reversed), as float32."
    return {t.name: torch.from_numpy(t.data.astype("float32")).reshape(tuple(int(n) for n in reversed(t.shape)))
            for t in gguf.GGUFReader(path).tensors}


def applied(base_file, adapter_file):
    "What llama.cpp computes from the two files: W0 + (adapter.lora.alpha / r)·B·A for each tensor with a lora_a."
    weights, lora, alpha = gguf_tensors(base_file), gguf_tensors(adapter_file), field(adapter_file, "adapter.lora.alpha")
    for name in weights:
        if f"{name}.lora_a" in lora:
            A, B = lora.pop(f"{name}.lora_a"), lora.pop(f"{name}.lora_b")
            weights[name] = weights[name] + alpha / A.shape[0] * B @ A
    assert not lora, f"adapter tensors with no base tensor: {sorted(lora)[:3]}"
    return weights


def as_gguf(model):
    "A transformers LLaMA's state dict under llama.cpp's names (the gguf library's map), q/k rows in rotary order."
    config, names = model.config, gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    out = {}
    for key, w in model.state_dict().items():
        proj = key.split(".")[-2]
        out[names.get_name(key, try_suffixes=(".weight",))] = rope_interleave(w.float(), heads[proj]) if proj in heads else w.float()
    return out


def peft_adapter(folder, steps=0, b_std=0.02, **lora):
    "An adapter made by peft on the tiny base, B random (or trained `steps` AdamW steps on demo examples), saved to `folder`."
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path(), dtype=torch.float32), LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.normal_(0, b_std)
    if steps:
        tokenizer = AutoTokenizer.from_pretrained(base_path())
        texts = ["".join(prompt_and_reference(m, tokenizer)) for m in load_instructions(demo_path("train"))["messages"][:8]]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
            loss.backward(); optimizer.step(); optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


def peft_merged(adapter):
    base = AutoModelForCausalLM.from_pretrained(base_path(), dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "The base (f32, f16) and the demo adapter alone (f32, f16), each written by `lora-kit export`."
    folder = tmp_path_factory.mktemp("adapter_gguf")
    for dtype in ("f32", "f16"):
        assert main(["export", "--model", "tiny", "--output", str(folder / f"base-{dtype}.gguf"), "--dtype", dtype]) == 0
        assert main(["export", "--adapter", str(DEMO_ADAPTER), "--adapter-only", "--output", str(folder / f"demo-{dtype}.gguf"),
                     "--dtype", dtype]) == 0
    return folder


def test_the_adapter_file_has_llama_cpps_metadata_names_and_shapes(files):
    path = files / "demo-f16.gguf"
    assert field(path, "general.type") == "adapter" and field(path, "adapter.type") == "lora"
    assert field(path, "general.architecture") == field(files / "base-f16.gguf", "general.architecture") == "llama"
    assert gguf.GGUFReader(path).fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    config = json.loads((DEMO_ADAPTER / "adapter_config.json").read_text())
    assert field(path, "adapter.lora.alpha") == config["lora_alpha"]
    assert field(path, "general.base_model.0.name") == field(files / "base-f16.gguf", "general.name") == "tiny"
    base = {t.name: tuple(int(n) for n in t.shape) for t in gguf.GGUFReader(files / "base-f16.gguf").tensors}  # ggml's ne
    lora = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in gguf.GGUFReader(path).tensors}
    layers = AutoModelForCausalLM.from_pretrained(base_path()).config.num_hidden_layers
    expected = {f"blk.{i}.{m}.weight.lora_{ab}" for i in range(layers) for m in ("attn_v", "attn_output") for ab in "ab"}
    assert set(lora) == expected
    r = config["r"]
    for name, (ne, kind) in lora.items():
        inp, out = base[name.rsplit(".", 1)[0]]
        assert kind == "F16"
        assert ne == ((inp, r) if name.endswith("lora_a") else (r, out))  # torch (r, in) and (out, r)


def test_base_plus_adapter_is_the_merged_export(files):
    assert main(["export", "--adapter", str(DEMO_ADAPTER), "--output", str(files / "merged-f32.gguf"), "--dtype", "f32"]) == 0
    rebuilt, merged = applied(files / "base-f32.gguf", files / "demo-f32.gguf"), gguf_tensors(files / "merged-f32.gguf")
    assert rebuilt.keys() == merged.keys()
    for name in merged: torch.testing.assert_close(rebuilt[name], merged[name], rtol=0, atol=1e-6)


def test_f16_adapter_tensors_are_the_f32_ones_rounded(files):
    f32, f16 = gguf_tensors(files / "demo-f32.gguf"), gguf_tensors(files / "demo-f16.gguf")
    for name in f32: assert torch.equal(f16[name], f32[name].half().float())


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_a_peft_adapter_on_every_projection_rebuilds_peft_merge(files, tmp_path, rslora):
    adapter = peft_adapter(tmp_path / "adapter", r=16, lora_alpha=8, target_modules=PROJECTIONS, use_rslora=rslora)
    export_adapter_gguf(adapter, tmp_path / "adapter.gguf", "f32")
    assert field(tmp_path / "adapter.gguf", "adapter.lora.alpha") == pytest.approx(8 * math.sqrt(16) if rslora else 8)
    rebuilt, reference = applied(files / "base-f32.gguf", tmp_path / "adapter.gguf"), as_gguf(peft_merged(adapter))
    assert rebuilt.keys() == reference.keys()
    for name in reference: torch.testing.assert_close(rebuilt[name], reference[name], rtol=0, atol=1e-6)


def test_an_adapter_trained_with_peft_exports_and_reads_back(files, tmp_path):
    adapter = peft_adapter(tmp_path / "trained", steps=5, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert main(["export", "--adapter", str(adapter), "--adapter-only", "--output", str(tmp_path / "trained.gguf"), "--dtype", "f32"]) == 0
    rebuilt, reference = applied(files / "base-f32.gguf", tmp_path / "trained.gguf"), as_gguf(peft_merged(adapter))
    for name in reference: torch.testing.assert_close(rebuilt[name], reference[name], rtol=0, atol=1e-6)
    modelfile = (tmp_path / "trained.Modelfile").read_text()
    assert modelfile.startswith("FROM ./base.gguf\nADAPTER ./trained.gguf\nTEMPLATE ")


@pytest.mark.parametrize("case, lora, reason", [
    ("dora", dict(target_modules=["v_proj"], use_dora=True), "DoRA"),
    ("modules_to_save", dict(target_modules=["v_proj"], modules_to_save=["lm_head"]), "saves whole modules"),
    ("head", dict(target_modules=["lm_head"]), "lm_head, which a llama.cpp LoRA file cannot hold"),
    ("embedding", dict(target_modules=["embed_tokens"]), "embed_tokens, which a llama.cpp LoRA file cannot hold"),
])
def test_what_llama_cpp_cannot_apply_is_refused_with_the_reason_and_nothing_written(tmp_path, case, lora, reason):
    adapter = peft_adapter(tmp_path / case, r=4, lora_alpha=8, **lora)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=reason) as e: export_adapter_gguf(adapter, out / "a.gguf")
    assert "export it merged instead" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() or not any(out.iterdir())


def test_an_adapter_of_another_base_is_refused_before_anything_is_written(tmp_path):
    other = tmp_path / "other_base"
    tiny_llama(hidden_size=128, intermediate_size=256).save_pretrained(other)
    with pytest.raises(ConfigError, match="do not fit the base"):
        export_adapter_gguf(DEMO_ADAPTER, tmp_path / "out" / "a.gguf", model=str(other))
    assert not (tmp_path / "out" / "a.gguf").exists()


@pytest.mark.parametrize("argv, says", [
    (["--output", "x.gguf"], "nothing to export"),
    (["--adapter-only", "--output", "x.gguf"], "give it with --adapter DIR"),
    (["--adapter", str(DEMO_ADAPTER), "--adapter-only", "--output", "x.gguf", "--dtype", "q8_0"], "f32 or f16"),
])
def test_export_usage_mistakes_exit_2_with_one_line(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_applies_the_adapters_to_one_base_switched_per_call(files, tmp_path):
    try:
        import ctypes, llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed here (a source build; see BENCHMARKS.md, GGUF export)")
    tokenizer = AutoTokenizer.from_pretrained(base_path())
    prompts = [prompt_and_reference(m, tokenizer)[0] for m in load_instructions(demo_path("eval"))["messages"][:8]]
    second = peft_adapter(tmp_path / "second", b_std=0.1, r=16, lora_alpha=8, target_modules=PROJECTIONS, use_rslora=True)
    export_adapter_gguf(second, tmp_path / "second.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(files / "base-f16.gguf"), n_ctx=256, verbose=False)
    adapters = {name: llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
                for name, path in {"demo": files / "demo-f16.gguf", "second": tmp_path / "second.gguf"}.items()}
    def answers(name):
        chosen = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapters[name]) if name else None
        llama_cpp.llama_set_adapters_lora(llm.ctx, chosen, int(name is not None), (ctypes.c_float * 1)(1.0) if name else None)
        llm.reset()
        return [llm.create_completion(llm.tokenize(p.encode(), add_bos=False, special=True), max_tokens=48, temperature=0.0,
                                      top_k=1)["choices"][0]["text"].strip() for p in prompts]
    references = {"demo": peft_merged(DEMO_ADAPTER), None: AutoModelForCausalLM.from_pretrained(base_path()).eval(),
                  "second": peft_merged(second)}
    seen = {}
    for name in ["demo", None, "second", "demo"]:  # switched back and forth in one process
        seen[name] = answers(name)
        assert seen[name] == generate(references[name], tokenizer, prompts), name
    assert len({tuple(replies) for replies in seen.values()}) == 3  # three different models answered


def test_a_pissa_adapter_exports_as_the_plain_lora_it_is_saved_as(files, tmp_path):
    # PiSSA changes the base while it trains, and the kit saves it as a rank-2r LoRA on the original base (lesson 07):
    # base file + adapter file must be that adapter merged into the original base, as peft merges it.
    from lora_kit.inject import add_lora, save_adapter
    model = add_lora(AutoModelForCausalLM.from_pretrained(base_path(), dtype=torch.float32), ["q_proj", "v_proj"], r=4, alpha=8,
                     init_lora_weights="pissa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name: p.add_(torch.randn_like(p) * 0.01)  # as if trained: the adapter moved off its init
    adapter = save_adapter(model, tmp_path / "pissa", base_model_name_or_path="tiny")
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    export_adapter_gguf(adapter, tmp_path / "pissa.gguf", "f32")
    rebuilt, reference = applied(files / "base-f32.gguf", tmp_path / "pissa.gguf"), as_gguf(peft_merged(adapter))
    for name in reference: torch.testing.assert_close(rebuilt[name], reference[name], rtol=0, atol=1e-5)
