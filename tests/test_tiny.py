"The shipped tiny base: loads offline from package data, knows both languages, cannot yet translate."
import json, math, os, subprocess, sys
from pathlib import Path

import pytest, torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.tiny import base_path
from lora_kit.data import demo_path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "lora_kit" / "assets"


def rows(split):
    "The demo task's rows, read with plain `json` (not through lora_kit.data)."
    return [json.loads(line) for line in demo_path(split).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_installed_package_loads_base_and_demo_data_offline(tmp_path):
    "`pip install` the package, then load the base and the demo data from the installed copy with no network."
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer; from lora_kit.tiny import base_path;"
            "from lora_kit.data import demo_path, load_instructions; assert len(load_instructions(demo_path('eval')));"
            "m = AutoModelForCausalLM.from_pretrained(base_path()); t = AutoTokenizer.from_pretrained(base_path());"
            "print(base_path(), type(m).__name__, sum(p.numel() for p in m.parameters()), len(t))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    where, name, n_params, vocab = r.stdout.split()[-4:]
    assert where.startswith(str(target))
    assert name == "LlamaForCausalLM"
    assert 1_000_000 <= int(n_params) <= 10_000_000
    assert 300 <= int(vocab) <= 4096


def test_base_is_llama_with_gqa_and_small_files():
    config = json.loads((base_path() / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_act"] == "silu"
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (base_path() / name).is_file(), name
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert size < 15e6, f"assets are {size / 1e6:.1f} MB"


def test_tokenizer_has_llama_special_tokens():
    tok = AutoTokenizer.from_pretrained(base_path())
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    text = "guru tua itu akan membeli mobil merah saya di pasar besok."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_files_need_nothing_newer_than_the_floors():
    "The floor run (tools/check_floors.py) loads them with the oldest transformers admitted; here, what that needs."
    config = json.loads((base_path() / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 knows no TokenizersBackend
    assert config["model_input_names"] == ["input_ids", "attention_mask"]  # else transformers 4 adds token_type_ids
    assert config["chat_template"] == (base_path() / "chat_template.jinja").read_text()  # older releases read only this
    merges = json.loads((base_path() / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)  # "a b": tokenizers < 0.20 reads no pairs
    tok, raw = AutoTokenizer.from_pretrained(base_path()), Tokenizer.from_file(str(base_path() / "tokenizer.json"))
    for r in rows("eval")[:50]:  # the ids are the tokenizers library's own: the config changes none
        text = f"<s>[INST] {r['instruction']}\n\n{r['input']} [/INST] {r['output']} </s>"
        assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    assert set(tok(["a cat", "the big dog"], padding=True)) == {"input_ids", "attention_mask"}


def test_eval_split_is_disjoint_from_train_and_has_no_duplicates():
    train, evaluation = rows("train"), rows("eval")
    assert len(train) >= 1000 and len(evaluation) >= 100
    train_inputs, eval_inputs = [r["input"] for r in train], [r["input"] for r in evaluation]
    assert len(set(train_inputs)) == len(train_inputs) and len(set(eval_inputs)) == len(eval_inputs)
    assert not set(train_inputs) & set(eval_inputs)
    assert not {json.dumps(r, sort_keys=True) for r in train} & {json.dumps(r, sort_keys=True) for r in evaluation}


@pytest.fixture(scope="module")
def base():
    return AutoModelForCausalLM.from_pretrained(base_path()).eval(), AutoTokenizer.from_pretrained(base_path())


def nll_per_token(model, tok, text):
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(): return model(input_ids=ids, labels=ids).loss.item()


def test_base_knows_both_languages(base):
    "Pretrained, not random: real sentences of either language are far likelier than the same words shuffled."
    model, tok = base
    for key in ("input", "output"):  # English, Indonesian
        real = [f"<s>{r[key]}</s>" for r in rows("eval")[:20]]
        shuffled = [f"<s>{' '.join(sorted(r[key].rstrip('.').split()))}.</s>" for r in rows("eval")[:20]]
        real_nll = sum(nll_per_token(model, tok, t) for t in real) / 20
        assert real_nll < 0.5 * math.log(len(tok)), real_nll  # far better than a uniform guess over the vocabulary
        assert real_nll < sum(nll_per_token(model, tok, t) for t in shuffled) / 20 - 0.5


def greedy(model, ids, eos_id, max_new_tokens=40):
    "Greedy decoding by hand: argmax of the last position's logits, one token at a time, no cache."
    ids = list(ids)
    for _ in range(max_new_tokens):
        with torch.no_grad(): nxt = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
        if nxt == eos_id: break
        ids.append(nxt)
    return ids


def test_base_cannot_translate_yet(base):
    "Exact match of the base on the eval split (LLaMA-2 chat prompt written out here) is near zero."
    model, tok = base
    evaluation = rows("eval")[:50]
    hits = 0
    for r in evaluation:
        prompt = f"<s>[INST] {r['instruction']}\n\n{r['input']} [/INST]"
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        reply = tok.decode(greedy(model, ids, tok.eos_token_id)[len(ids):], skip_special_tokens=True).strip()
        hits += reply == r["output"]
    assert hits / len(evaluation) <= 0.05, hits


def test_every_linear_of_the_base_is_whole_64_weight_blocks():
    "bitsandbytes' NF4 blocks (64) and its CPU repacking (blocks of 32 rows) need these widths; LLaMA-2's all are."
    model = AutoModelForCausalLM.from_pretrained(base_path())
    widths = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(widths) == 7 * model.config.num_hidden_layers + 1  # q k v o, gate up down, and the head
    assert {n: w for n, w in widths.items() if w[0] % 64 or w[1] % 64} == {}
    assert len(AutoTokenizer.from_pretrained(base_path())) == model.config.vocab_size


@pytest.mark.parametrize("repacking", [False, True], ids=["standard-kernel", "repacked-as-on-avx512-bf16"])
def test_base_loads_in_4_bits_with_plain_transformers_and_runs_eval_and_generate(repacking):
    "The standard QLoRA load, then an eval-mode forward and generate; where bitsandbytes repacks, the old base crashed."
    pytest.importorskip("bitsandbytes", reason="4-bit needs the qlora extra")
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    tokenizer = AutoTokenizer.from_pretrained(base_path())
    model = AutoModelForCausalLM.from_pretrained(base_path(), quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4")).eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    for layer in layers: layer.support_avx512bf16_for_cpu = repacking  # bitsandbytes decides by the CPU; test both kernels
    ids = tokenizer(["<s>the old teacher will eat my hot rice. the old teacher"], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad(): logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert all(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == repacking for layer in layers)
    if not repacking:  # the standard kernel computes what the fp32 base does, to NF4's error: the same next word
        dense = AutoModelForCausalLM.from_pretrained(base_path()).eval()
        with torch.no_grad(): want = dense(**ids).logits
        assert (logits[0, -1].argmax() == want[0, -1].argmax()).item()
