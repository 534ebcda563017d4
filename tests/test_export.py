"""`lora-kit export`: the shipped demo adapter merged and written as GGUF (f32, f16, q8_0), read back by an independent
reader, transformers' GGUF loader (`from_pretrained(folder, gguf_file=...)`), and by llama.cpp itself through
llama-cpp-python where that is installed. References are peft's own merge (`merge_and_unload`), closed-form fp16
rounding and Q8_0 decoding written out here, and the training prompts of `lora_kit.data`.
"""
import copy, json, re, sys

import numpy as np
import pytest
import transformers
from packaging.version import Version
import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

gguf = pytest.importorskip("gguf", reason="GGUF export needs the export extra: pip install 'lora_kit[export]'")

from lora_kit.cli import main
from lora_kit.core import ConfigError, tiny_llama
from lora_kit.data import LLAMA2_CHAT_TEMPLATE, demo_path, load_instructions, prompt_and_reference
from lora_kit.export import (FILE_TYPES, export_gguf, ollama_template, rope_interleave, tokenizer_metadata, write_gguf,
                             chat_template_for, tensor_type)
from lora_kit.finetune import DEMO_ADAPTER
from lora_kit.tiny import base_path, corpus, generate

EVAL_PROMPTS = 64  # greedy replies compared on this many of the demo's held-out prompts


def peft_merged():
    "The demo adapter merged by peft, the reference the files are checked against."
    base = AutoModelForCausalLM.from_pretrained(base_path(), dtype=torch.float32)
    return PeftModel.from_pretrained(base, DEMO_ADAPTER).merge_and_unload().eval()


def cli(*argv, capsys):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    "The demo adapter exported by `lora-kit export` in each dtype, into one folder."
    folder = tmp_path_factory.mktemp("gguf")
    for dtype in FILE_TYPES:
        assert main(["export", "--adapter", str(DEMO_ADAPTER), "--output", str(folder / f"demo-{dtype}.gguf"), "--dtype", dtype]) == 0
    return folder


@pytest.fixture(scope="module")
def reference():
    return peft_merged()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(base_path())


@pytest.fixture(scope="module")
def conversations():
    return load_instructions(demo_path("eval"))["messages"][:EVAL_PROMPTS]


@pytest.fixture(scope="module")
def prompts(conversations, tokenizer):
    return [prompt_and_reference(m, tokenizer)[0] for m in conversations]


def read_back(folder, dtype):
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"demo-{dtype}.gguf", dtype=torch.float32).eval()


def prompt_logits(model, tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad(): return model(**batch).logits


def test_cli_writes_three_files_and_modelfiles(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == sorted([f"demo-{d}.gguf" for d in FILE_TYPES] + [f"demo-{d}.Modelfile" for d in FILE_TYPES])
    sizes = {d: (exported / f"demo-{d}.gguf").stat().st_size for d in FILE_TYPES}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    assert sizes["f16"] < 0.51 * sizes["f32"] and sizes["q8_0"] < 0.33 * sizes["f32"]


def test_f32_logits_equal_the_merged_model(exported, reference, tokenizer, prompts):
    got, want = prompt_logits(read_back(exported, "f32"), tokenizer, prompts[:16]), prompt_logits(reference, tokenizer, prompts[:16])
    assert (got - want).abs().max().item() <= 1e-4


def test_f16_is_the_merged_model_rounded_to_fp16(exported, reference, tokenizer, prompts):
    model = read_back(exported, "f16")
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2: p.copy_(p.half().float())
    loaded = model.state_dict()
    for key, w in rounded.state_dict().items():
        assert torch.equal(loaded[key], w), key
    got = prompt_logits(model, tokenizer, prompts[:16])
    assert (got - prompt_logits(rounded, tokenizer, prompts[:16])).abs().max().item() <= 1e-4
    # and fp16 rounding moves the logits by a few thousandths, no more
    assert (got - prompt_logits(reference, tokenizer, prompts[:16])).abs().max().item() <= 0.05


def test_q8_0_gives_the_merged_models_greedy_replies(exported, reference, tokenizer, prompts):
    want = generate(reference, tokenizer, prompts)
    got = generate(read_back(exported, "q8_0"), tokenizer, prompts)
    assert got == want


def q8_0_decode(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    "Q8_0 bytes decoded from the format's definition: per 32 weights, an fp16 scale then 32 int8 codes."
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    codes = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * codes).reshape(rows, cols)


def test_q8_0_tensors_decode_to_the_merged_weights(exported, reference):
    reader = gguf.GGUFReader(exported / "demo-q8_0.gguf")
    tensors = {t.name: t for t in reader.tensors}
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_v.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 704 weights: 22 whole 32-weight blocks
    assert tensor_type((256, 688), "q8_0") == "F16"  # rows that are not whole blocks stay F16, as llama.cpp's converter does
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    W = reference.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    back = q8_0_decode(np.asarray(tensors["blk.0.ffn_up.weight"].data), *W.shape)
    step = np.abs(W).reshape(-1, 32).max(1, keepdims=True) / 127  # one quantization step per block
    # rounding to the nearest code: half a step; the step itself stored in fp16 (relative error <= 2^-11) times a code <= 127
    assert (np.abs(back - W).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11)).all()
    assert np.abs(back - W).max() > 0.1 * step.max()  # a real rounding, not a copy of the weights


def test_a_qlora_adapter_is_merged_into_the_full_precision_base(tmp_path):
    "An adapter trained on the 4-bit base: the file holds W0 + BA with W0 the base's own weights, not their NF4 rounding."
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra: pip install 'lora_kit[qlora]'")
    from lora_kit.inject import adapter_layers, add_lora, save_adapter
    from lora_kit.qlora import load_4bit
    four_bit = add_lora(load_4bit(str(base_path())), ("q_proj", "v_proj"), r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(four_bit).values(): layer.lora_B["default"].weight.normal_(0, 0.05)  # as if trained
    save_adapter(four_bit, tmp_path / "qlora", base_model_name_or_path=str(base_path()))
    assert main(["export", "--adapter", str(tmp_path / "qlora"), "--output", str(tmp_path / "q.gguf"), "--dtype", "f32"]) == 0
    read = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_path(), dtype=torch.float32)
    want = PeftModel.from_pretrained(base, tmp_path / "qlora").merge_and_unload().state_dict()
    for key, w in want.items(): torch.testing.assert_close(read[key], w, rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (read[q] - AutoModelForCausalLM.from_pretrained(base_path()).state_dict()[q]).abs().max() > 1e-3  # the update is in


def field(reader, key):
    "A metadata value from `gguf.GGUFReader`'s raw parts: strings decoded, arrays as lists."
    f = reader.fields[key]
    string = f.types[-1] == gguf.GGUFValueType.STRING
    values = [bytes(f.parts[i]).decode() if string else f.parts[i][0].item() for i in f.data]
    return values if f.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def test_q_and_k_rows_are_in_llama_cpp_order(exported, reference):
    "In the file, q rows of each head go 0, d/2, 1, d/2+1, ...: llama.cpp's rotary pairs (2i, 2i+1)."
    reader = gguf.GGUFReader(exported / "demo-f32.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    config, sd = reference.config, reference.state_dict()
    d = config.head_dim
    for name, key, heads in (("attn_q", "q_proj", config.num_attention_heads), ("attn_k", "k_proj", config.num_key_value_heads)):
        W = sd[f"model.layers.2.self_attn.{key}.weight"].numpy()
        stored = tensors[f"blk.2.{name}.weight"].reshape(heads, d, -1)
        original = W.reshape(heads, d, -1)
        for i in range(d // 2):
            np.testing.assert_array_equal(stored[:, 2 * i], original[:, i])
            np.testing.assert_array_equal(stored[:, 2 * i + 1], original[:, i + d // 2])


def test_rope_interleave_is_undone_by_transformers_reader_for_gqa_shapes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    undo = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    q, k = torch.randn(8 * 16, 32), torch.randn(2 * 16, 32)
    np.testing.assert_array_equal(undo.process(rope_interleave(q, 8).numpy(), "blk.0.attn_q.weight").weights, q.numpy())
    np.testing.assert_array_equal(undo.process(rope_interleave(k, 2).numpy(), "blk.0.attn_k.weight").weights, k.numpy())


def test_gguf_metadata_describes_the_model(exported, reference):
    reader = gguf.GGUFReader(exported / "demo-q8_0.gguf")
    value = lambda key: field(reader, key)
    c = reference.config
    assert value("general.architecture") == "llama"
    assert (value("llama.block_count"), value("llama.embedding_length"), value("llama.feed_forward_length")) == (
        c.num_hidden_layers, c.hidden_size, c.intermediate_size)
    assert (value("llama.attention.head_count"), value("llama.attention.head_count_kv")) == (4, 2)  # grouped-query attention
    assert value("llama.rope.dimension_count") == c.head_dim
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.chat_template") == LLAMA2_CHAT_TEMPLATE


def test_tokenizer_read_back_encodes_the_prompts_to_the_same_ids(exported, tokenizer, conversations, prompts):
    back = AutoTokenizer.from_pretrained(exported, gguf_file="demo-f16.gguf")
    texts = [*prompts, "hello world", "Grüße 🙂"]
    assert back(texts, add_special_tokens=False)["input_ids"] == tokenizer(texts, add_special_tokens=False)["input_ids"]
    reader = gguf.GGUFReader(exported / "demo-f16.gguf")  # the prompts carry <s> themselves: the file says add none
    assert (field(reader, "tokenizer.ggml.add_bos_token"), tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id) == (False, False)
    for m, prompt in zip(conversations[:8], prompts):  # the template in the file renders the training prompt
        assert back.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True) == prompt


def llama2_style_tokenizer(lines, vocab_size=700):
    "A LLaMA-2-shaped SentencePiece-style BPE built with `tokenizers` (▁ for spaces, 256 byte tokens at ids 3-258, BOS added)."
    specials, byte_tokens = ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)  # pieces within words
    learner.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)[3:]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_llama2_style_sentencepiece_tokenizer_round_trips(tmp_path, prompts):
    spm = llama2_style_tokenizer(corpus(800, seed=3))
    model = tiny_llama(vocab_size=len(spm))
    write_gguf(model, spm, tmp_path / "spm.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "spm.gguf")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert "tokenizer.ggml.merges" not in reader.fields  # as LLaMA-2's files: scores, no merges
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:5] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE, gguf.TokenType.BYTE]
    # the model round-trips as well: f32 logits of a random LLaMA with this vocabulary
    read = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="spm.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([spm(prompts[0])["input_ids"]])
    with torch.no_grad(): assert (read(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
    if Version(transformers.__version__) < Version("5.24"):
        pytest.skip("transformers before 5.24 (checked: 5.4) reads a GGUF SentencePiece vocabulary in legacy mode, with an "
                    "extra '▁' after special tokens; the file itself is checked above and by llama.cpp")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    texts = [*prompts, "Grüße, ü ß 🙂 and  two  spaces", " leading space", "kopi\nbaru"]
    assert back(texts)["input_ids"] == spm(texts)["input_ids"]
    assert back(texts, add_special_tokens=False)["input_ids"] == spm(texts, add_special_tokens=False)["input_ids"]
    decoded = [back.decode(i, skip_special_tokens=True) for i in back(texts)["input_ids"]]
    assert decoded == [spm.decode(i, skip_special_tokens=True) for i in spm(texts)["input_ids"]]
    # byte fallback and inner spaces survive; a leading space is dropped, as LLaMA-2's decoder (and the source here) does
    assert decoded[-3:] == [texts[-3], texts[-2].lstrip(), texts[-1]]


def render_ollama(template, system, prompt):
    "The prompt Ollama renders from a .System/.Prompt/.Response template for one turn: if resolved, fields filled, cut at .Response."
    branch = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}(.*)", template, re.S)
    text = (branch[1] if system else branch[2]) + branch[3]
    return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).split("{{ .Response }}")[0]


def test_modelfile_uses_the_training_template(exported, tokenizer, conversations):
    text = (exported / "demo-q8_0.Modelfile").read_text()
    assert text.splitlines()[0] == "FROM ./demo-q8_0.gguf"
    assert 'PARAMETER stop "</s>"' in text.splitlines()
    template = re.search(r'TEMPLATE """(.*)"""', text, re.S)[1]
    assert template == ollama_template("llama2", tokenizer)
    with_system = [{"role": "system", "content": "Be brief."}, *conversations[0]]
    for m in [with_system, *conversations[:16]]:
        system = m[0]["content"] if m[0]["role"] == "system" else ""
        assert render_ollama(template, system, m[-2]["content"]) == prompt_and_reference(m, tokenizer)[0]


def test_chat_template_must_exist_for_the_chat_choice():
    spm = llama2_style_tokenizer(corpus(200, seed=4), vocab_size=400)
    with pytest.raises(ConfigError, match="template='chat'"): chat_template_for("chat", spm)


def bad_export(capsys, tmp_path, *args):
    "Run `lora-kit export` with `args`; return (exit code, stderr lines, files left in tmp_path/out)."
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    code, _, err = cli("export", *args, capsys=capsys)
    return code, err.strip().splitlines(), sorted(p.name for p in out.iterdir())


def test_bad_dtype(tmp_path, capsys):
    code, err, left = bad_export(capsys, tmp_path, "--adapter", str(DEMO_ADAPTER), "--output", str(tmp_path / "out/m.gguf"), "--dtype", "q4_0")
    assert (code, len(err), left) == (2, 1, []) and "q4_0" in err[0] and "f16" in err[0]
    with pytest.raises(ConfigError, match="dtype 'q4_0'"): export_gguf(DEMO_ADAPTER, tmp_path / "out/m.gguf", "q4_0")


def test_adapter_whose_base_cannot_be_found(tmp_path, capsys):
    lost = tmp_path / "lost"
    lost.mkdir()
    config = json.loads((DEMO_ADAPTER / "adapter_config.json").read_text()) | {"base_model_name_or_path": str(tmp_path / "no_base")}
    (lost / "adapter_config.json").write_text(json.dumps(config))
    code, err, left = bad_export(capsys, tmp_path, "--adapter", str(lost), "--output", str(tmp_path / "out/m.gguf"))
    assert (code, len(err), left) == (2, 1, []) and "cannot be found" in err[0] and "--model" in err[0]


def test_base_that_is_not_llama(tmp_path, capsys):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    code, err, left = bad_export(capsys, tmp_path, "--adapter", str(DEMO_ADAPTER), "--model", str(tmp_path / "gpt2"),
                                 "--output", str(tmp_path / "out/m.gguf"))
    assert (code, len(err), left) == (2, 1, []) and "'gpt2' model, not LLaMA" in err[0] and "convert_hf_to_gguf" in err[0]


@pytest.mark.parametrize("change, message", [({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE scaling"),
                                             ({"attention_bias": True}, "biases")])
def test_llama_variants_the_exporter_cannot_write_exactly(tmp_path, capsys, change, message):
    config = json.loads((base_path() / "config.json").read_text()) | change
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    code, err, left = bad_export(capsys, tmp_path, "--adapter", str(DEMO_ADAPTER), "--model", str(tmp_path / "base"),
                                 "--output", str(tmp_path / "out/m.gguf"))
    assert (code, len(err), left) == (2, 1, []) and message in err[0]


def test_unwritable_output(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_file").write_text("")
    code, err, left = bad_export(capsys, tmp_path, "--adapter", str(DEMO_ADAPTER), "--output", str(tmp_path / "out/a_file/m.gguf"))
    assert (code, len(err), left) == (2, 1, ["a_file"]) and "cannot write" in err[0]
    code, err, left = bad_export(capsys, tmp_path, "--adapter", str(DEMO_ADAPTER), "--output", str(tmp_path / "out/m.bin"))
    assert (code, len(err), left) == (2, 1, ["a_file"]) and ".gguf" in err[0]


def test_a_failure_while_writing_leaves_the_old_file_and_no_fragment(tmp_path, reference, tokenizer):
    path = write_gguf(reference, tokenizer, tmp_path / "m.gguf", "f16")
    before = path.read_bytes()
    broken = copy.deepcopy(reference)
    broken.model.layers[3].register_parameter("extra", torch.nn.Parameter(torch.zeros(4)))  # no GGUF name: fails late
    with pytest.raises(KeyError): write_gguf(broken, tokenizer, path, "q8_0")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_without_the_gguf_library_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError, as when not installed
    (tmp_path / "out").mkdir()
    code, err, left = bad_export(capsys, tmp_path, "--adapter", str(DEMO_ADAPTER), "--output", str(tmp_path / "out/m.gguf"))
    assert (code, len(err), left) == (2, 1, []) and "pip install 'lora_kit[export]'" in err[0]


def test_cli_dtype_choices_are_the_exporters():
    from lora_kit.cli import build_parser
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    assert next(a for a in export._actions if a.dest == "dtype").choices == list(FILE_TYPES)


def test_tokenizer_with_a_different_size_than_the_embedding(tokenizer):
    with pytest.raises(ConfigError, match=f"{len(tokenizer)} tokens, the model's embedding 600 rows"): tokenizer_metadata(tokenizer, 600)


def test_llama_cpp_generates_the_merged_models_reply(exported, reference, tokenizer, prompts):
    try:
        from llama_cpp import Llama
    except ImportError:
        pytest.skip("llama-cpp-python is not installed here (a source build; see BENCHMARKS.md, GGUF export)")
    want = generate(reference, tokenizer, prompts[:4], max_new_tokens=24)
    for dtype in ("f32", "q8_0"):
        llm = Llama(model_path=str(exported / f"demo-{dtype}.gguf"), n_ctx=256, n_threads=1, verbose=False)
        for prompt, reply in zip(prompts[:4], want):
            tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            assert tokens == tokenizer(prompt, add_special_tokens=False)["input_ids"]
            out = llm.create_completion(tokens, max_tokens=24, temperature=0.0, top_k=1)
            assert out["choices"][0]["text"].strip() == reply, (dtype, prompt)
