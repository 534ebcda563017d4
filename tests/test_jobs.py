"`lora-kit generate` and `lora-kit merge` as a user runs them, on a local checkpoint."
import math, subprocess, sys

import pytest, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.core import byte_tokenizer, tiny_llama
from lora_kit.qlora import open_adapter
from lora_kit.tiny import generate
from lora_kit.inject import adapter_layers, add_lora, save_adapter
from conftest import SUBPROCESS_ENV

PROMPT = "<s>Halo dunia"


def lora_kit(*args):
    return subprocess.run([sys.executable, "-m", "lora_kit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=SUBPROCESS_ENV)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    tiny_llama().save_pretrained(root / "base"); byte_tokenizer().save_pretrained(root / "base")
    model = add_lora(tiny_llama(), ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n: p.normal_(std=0.5)
    return save_adapter(model, root / "adapter", base_model_name_or_path=str(root / "base"))


@pytest.mark.slow
def test_generate_prints_the_adapted_models_greedy_text(adapter):
    r = lora_kit("generate", "--adapter", adapter, "--prompt", PROMPT, "--max-new-tokens", 12)
    assert r.returncode == 0, r.stderr
    model, tok, _ = open_adapter(adapter)
    base = AutoModelForCausalLM.from_pretrained(adapter.parent / "base")
    expected = generate(model, tok, [PROMPT], 12)[0]
    assert r.stdout.strip() == expected and expected != generate(base, tok, [PROMPT], 12)[0]


@pytest.mark.slow
def test_merge_writes_a_plain_checkpoint_with_the_same_generations(adapter, tmp_path):
    r = lora_kit("merge", "--adapter", adapter, "--output", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    model, tok, _ = open_adapter(adapter)
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(): assert (merged(ids).logits - model(ids).logits).abs().max() < 1e-5
    assert generate(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"), [PROMPT], 12) == generate(model, tok, [PROMPT], 12)


def test_finetune_output_folder_loads_in_peft_and_has_the_metrics(tmp_path):
    import json
    from dataclasses import replace
    from peft import AutoPeftModelForCausalLM
    from lora_kit.finetune import DEMO_CONFIG, finetune
    finetune(output=tmp_path, eval_examples=12, train=replace(DEMO_CONFIG, max_steps=3))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("base_model", "trainable_params", "total_params", "steps", "train_seconds", "tokens_per_second",
                "peak_memory_bytes", "eval_loss_before", "eval_loss_after", "eval_accuracy_before", "eval_accuracy_after"):
        assert key in metrics, key
    assert len(metrics["samples"]) >= 10 and set(metrics["samples"][0]) == {"prompt_text", "expected", "generated"}
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    theirs = AutoPeftModelForCausalLM.from_pretrained(tmp_path)  # offline: the base is named by its local path
    ours, tok, _ = open_adapter(tmp_path)
    ids = tok(metrics["samples"][0]["prompt_text"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    # the same weights through two loaders: compared in float64, where no reduction order moves the logits of a
    # trained base (|logit| ~ 15) by more than rounding (fp32 differed by up to ~1e-5 between CPUs, as in test_variants)
    with torch.no_grad(): assert (theirs.double()(ids).logits - ours.double()(ids).logits).abs().max() < 1e-9


def test_finetune_trains_with_the_efficient_layer_and_holds_out_with_datasets(tmp_path):
    "The measured benefit of lesson 06 is what the job gives by default; no eval file means a seeded 5% hold-out."
    import json
    from dataclasses import replace
    from lora_kit.data import demo_path
    from lora_kit.inject import plain_path_reasons
    from lora_kit.finetune import DEMO_CONFIG, FinetuneConfig, split_data
    config = FinetuneConfig(data=str(demo_path("train")), output=tmp_path, eval_examples=500, train=replace(DEMO_CONFIG, max_steps=1))
    train_ds, eval_ds = split_data(config)
    assert (len(train_ds), len(eval_ds)) == (1900, 100)
    assert not {json.dumps(m) for m in train_ds["messages"]} & {json.dumps(m) for m in eval_ds["messages"]}
    assert split_data(config)[1]["messages"] == eval_ds["messages"]  # seeded: the same split every run
    from lora_kit.train import train
    model = add_lora(tiny_llama(), ["q_proj"], r=2)
    train(model, [dict(input_ids=[1, 5, 6, 7], labels=[-100, 5, 6, 7])], config=replace(DEMO_CONFIG, max_steps=1))
    assert plain_path_reasons(model) == {}  # every adapter layer trained on the lean path
    assert {l.backward for l in adapter_layers(model).values()} == {"lean"}


@pytest.mark.slow
def test_cli_finetune_prints_the_summary_and_writes_the_folder(tmp_path):
    r = lora_kit("finetune", "--max-steps", 3, "--eval-examples", 10, "--output", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors import safe_open
    from lora_kit.tiny import base_path
    with safe_open(base_path() / "model.safetensors", "pt") as f: base = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    adapters = 4 * 16 * (256 + 128 + 256 + 256)  # rank 16 on v, o of 4 layers: r x (in + out) each
    assert f"trained {adapters:,} of {base + adapters:,} parameters ({100 * adapters / (base + adapters):.2f}%) for 3 steps" in r.stdout
    assert "exact match 0.0% ->" in r.stdout
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
