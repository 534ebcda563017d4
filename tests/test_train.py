"The training loop: its settings, its loss, its layers and optimizer groups, and two processes (torchrun, gloo on CPU) matching one."
import copy, json, math, subprocess, sys
from dataclasses import fields
from pathlib import Path

import pytest, torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from lora_kit.core import ConfigError, LoraKitError, tiny_llama
from lora_kit.data import collate
from lora_kit.inject import adapter_layers, adapter_state_dict, add_lora, plain_path_reasons
from lora_kit.layers import LoRALinear
from lora_kit.train import CHECKPOINTS, TrainConfig, loss_sum, optimizer_groups, step_indices, train
from conftest import SUBPROCESS_ENV, free_port

from train_worker import examples

WORKER = Path(__file__).with_name("train_worker.py")

BAD_SETTINGS = [  # (field, refused value): every field of TrainConfig at least once
    ("max_steps", 0), ("max_steps", 2.5), ("max_steps", True), ("batch_size", 0), ("grad_accum", -1),
    ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf), ("lr", "1e-3"),
    ("loraplus_lr_ratio", 0), ("loraplus_lr_ratio", math.nan), ("warmup_steps", -1), ("warmup_steps", 1.0),
    ("schedule", "constant"), ("schedule", None), ("weight_decay", -0.1), ("weight_decay", math.inf),
    ("max_grad_norm", 0.0), ("max_grad_norm", math.nan), ("precision", "fp32"), ("precision", None),
    ("grad_checkpointing", 1), ("efficient_layers", "yes"), ("eval_every", -1), ("save_every", 0.5), ("seed", -1),
    ("fsdp", "yes"),
]


@pytest.mark.parametrize("name, value", BAD_SETTINGS)
def test_a_setting_out_of_range_is_refused_naming_field_value_and_what_is_accepted(name, value):
    with pytest.raises(ConfigError) as e: TrainConfig(**{name: value})
    message = str(e.value)
    assert message.startswith(f"{name} must be ") and message.endswith(f"got {value!r}"), message
    assert e.value.field == name
    assert isinstance(e.value, LoraKitError) and isinstance(e.value, ValueError)


def test_every_setting_has_a_refused_case():
    assert {f.name for f in fields(TrainConfig)} == {name for name, _ in BAD_SETTINGS}


def test_settings_at_the_edge_of_their_range_are_accepted():
    TrainConfig(max_steps=1, lr=1, loraplus_lr_ratio=16, batch_size=1, grad_accum=1, warmup_steps=0, schedule="linear",
                weight_decay=0, max_grad_norm=1e-9, precision="bf16", grad_checkpointing=True, efficient_layers=False,
                eval_every=0, save_every=0, seed=0)


@pytest.fixture
def one_process_group(tmp_path):
    "A data-parallel group of one process (gloo, CPU), so `DistributedDataParallel` runs its real forward in this test."
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def adapted(kind):
    "The tiny LLaMA with all-linear adapters, B random (so A gets a gradient too), as our layers or peft's."
    torch.manual_seed(0)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    else: model = add_lora(tiny_llama(), "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", ["lora_kit", "peft", "data parallel"])
def test_loss_sum_and_its_gradients_equal_cross_entropy_on_the_full_logits(kind, request):
    if kind == "data parallel": request.getfixturevalue("one_process_group")
    batch = collate(examples()[:4], pad_token_id=0)  # rows of different lengths: right padding, prompts masked
    labels = batch["labels"]
    assert (batch["attention_mask"] == 0).any() and (labels[:, 1:] == -100).any() and (labels[:, 1:] != -100).any()
    ours = adapted("peft" if kind == "peft" else "lora_kit")
    reference = copy.deepcopy(ours)
    total, count = loss_sum(DistributedDataParallel(ours) if kind == "data parallel" else ours, batch)
    total.backward()
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    expected.backward()
    assert count.item() == (labels[:, 1:] != -100).sum().item()
    assert torch.allclose(total, expected, rtol=1e-5), (total.item(), expected.item())
    pairs = [(n, p, q) for (n, p), (_, q) in zip(ours.named_parameters(), reference.named_parameters()) if p.requires_grad]
    assert len(pairs) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks
    for name, p, q in pairs:
        assert q.grad.abs().max() > 0, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), f"{name}: {(p.grad - q.grad).abs().max()}"



def test_loss_sum_refuses_an_adapted_output_head_naming_the_fix():
    model = add_lora(tiny_llama(), ["lm_head"], r=2)
    with pytest.raises(ConfigError, match="not LoRALinear: leave lm_head out of the adapter's target_modules"):
        loss_sum(model, collate(examples()[:2], pad_token_id=0))

@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_loss_is_divided_by_the_targets_of_the_batches_collate_fn_makes(grad_accum):
    "A collate_fn that cuts examples short leaves fewer targets than the examples hold: the loop counts the collated ones."
    cut_short = lambda batch: collate([dict(input_ids=e["input_ids"][:19], labels=e["labels"][:19]) for e in batch], pad_token_id=0)
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=2)
    reference = copy.deepcopy(model)
    config = TrainConfig(max_steps=1, batch_size=2, grad_accum=grad_accum, lr=1e-3)
    loss = train(model, examples(), config=config, collate_fn=cut_short)["history"][0]["loss"]
    picked = [[examples()[i] for i in m[0]] for m in step_indices(0, len(examples()), 2, grad_accum, seed=config.seed)]
    micro = [cut_short(exs) for exs in picked]
    counts = [(b["labels"][:, 1:] != -100).sum().item() for b in micro]  # Hugging Face's own count: labels shifted by one
    with torch.no_grad(): means = [reference(**b).loss.item() for b in micro]  # Hugging Face's mean over each batch
    assert sum(counts) < sum(sum(t != -100 for t in e["labels"][1:]) for exs in picked for e in exs)  # the cut drops targets
    assert loss == pytest.approx(sum(m * n for m, n in zip(means, counts)) / sum(counts), rel=1e-5)


PLAIN_ASKED = "backward='plain' was asked for"


def trained(efficient_layers):
    torch.manual_seed(0)
    # built on the other path than the one asked for, so that train has to switch it
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, backward="plain" if efficient_layers else "lean")
    assert {type(layer) for layer in adapter_layers(model).values()} == {LoRALinear}
    assert plain_path_reasons(model) == ({PLAIN_ASKED: 4} if efficient_layers else {})
    train(model, examples(), config=TrainConfig(max_steps=3, batch_size=3, lr=5e-3, warmup_steps=1,
                                                efficient_layers=efficient_layers))
    return model


def test_precision_auto_trains_as_auto_precision_says_for_this_machine():
    "auto is kept in the config and resolved by the loop: on this CPU it is fp32, so the same run as precision='no'."
    from lora_kit.core import auto_precision
    def adapter_after(precision):
        torch.manual_seed(0)
        model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8)
        train(model, examples(), config=TrainConfig(max_steps=2, batch_size=3, lr=5e-3, warmup_steps=0, precision=precision))
        return adapter_state_dict(model)
    auto, resolved = adapter_after("auto"), adapter_after(auto_precision())
    for key in auto: assert torch.equal(auto[key], resolved[key]), key
    if not torch.cuda.is_available(): assert auto_precision() == "no"


def test_train_switches_the_layers_to_the_lean_or_the_plain_path_with_the_same_result():
    efficient, plain = trained(True), trained(False)
    assert {type(layer) for layer in adapter_layers(efficient).values()} == {LoRALinear}
    assert {layer.backward for layer in adapter_layers(efficient).values()} == {"lean"} and plain_path_reasons(efficient) == {}
    assert {layer.backward for layer in adapter_layers(plain).values()} == {"plain"}
    assert plain_path_reasons(plain) == {PLAIN_ASKED: 4}  # 2 blocks x (q_proj, v_proj)
    ours, reference = adapter_state_dict(efficient), adapter_state_dict(plain)  # reference: plain autograd
    assert ours.keys() == reference.keys()
    for key in ours: assert torch.allclose(ours[key], reference[key], atol=1e-6), key


class BothFaster(LoRALinear):
    "An adapter layer whose LoRA+ parameters are A and B: the groups must follow the interface, not the names."
    def loraplus_parameters(self): return [self.lora_A["default"].weight, self.lora_B["default"].weight]


def test_loraplus_group_is_what_the_layers_name_and_frozen_ones_stay_out():
    model = add_lora(tiny_llama(), ["q_proj"], r=2, layer_cls=BothFaster)
    assert {type(layer) for layer in adapter_layers(model).values()} == {BothFaster}  # add_lora built the subclass
    frozen = next(iter(adapter_layers(model).values())).lora_A["default"].weight.requires_grad_(False)
    head = model.lm_head.weight.requires_grad_(True)  # trainable, but no adapter layer's
    adapters = [p for name, p in model.named_parameters() if "lora_" in name and p is not frozen]
    slow, fast = optimizer_groups(model, 1e-3, loraplus_lr_ratio=16)
    assert (slow["lr"], fast["lr"]) == (1e-3, 16e-3)
    assert [id(p) for p in slow["params"]] == [id(head)]
    assert {id(p) for p in fast["params"]} == {id(p) for p in adapters} and len(fast["params"]) == len(adapters)


@pytest.mark.parametrize("case, message", [
    ("no examples", "train_examples is empty"),
    ("nothing trainable", "no trainable parameters"),
    ("fp16 on CPU", "precision='fp16' needs a GPU"),
])
def test_bad_input_to_train_is_the_kits_error(case, message):
    if case == "fp16 on CPU" and torch.cuda.is_available(): pytest.skip("fp16 works on a GPU")
    model, rows = add_lora(tiny_llama(), ["q_proj"], r=2), examples()
    config = TrainConfig(max_steps=1, batch_size=2, precision="fp16" if case == "fp16 on CPU" else "no")
    if case == "no examples": rows = []
    if case == "nothing trainable": model = tiny_llama().requires_grad_(False)
    with pytest.raises(LoraKitError, match=message): train(model, rows, config=config)


def run(cmd, tmp):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]


VOCAB = 4096  # well above the other widths (hidden 64, MLP 192), as LLaMA-2's 32000 is; the bytes use the first 259 ids


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The worker's results: 1 process with 2 accumulation steps, and 2 processes under torchrun with 1, same global batch."
    tmp = tmp_path_factory.mktemp("train")
    vocab = ["--vocab-size", str(VOCAB)]
    run([sys.executable, str(WORKER), str(tmp / "single"), "--grad-accum", "2", *vocab], tmp)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), str(tmp / "ddp"), "--save-every", "3", *vocab], tmp)
    return tmp


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(runs):
    single = json.loads((runs / "single" / "rank0" / "result.json").read_text())
    ddp = [json.loads((runs / "ddp" / f"rank{r}" / "result.json").read_text()) for r in (0, 1)]
    assert single["world_size"] == 1 and ddp[0]["world_size"] == 2
    for a, b in zip(single["losses"], ddp[0]["losses"]): assert abs(a - b) < 1e-5, (single["losses"], ddp[0]["losses"])
    assert single["losses"][-1] < single["losses"][0]
    weights = [load_file(runs / d / "adapter.safetensors") for d in ("single/rank0", "ddp/rank0", "ddp/rank1")]
    for key in weights[0]:
        assert torch.equal(weights[1][key], weights[2][key]), f"ranks disagree on {key}"
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-5), f"1 vs 2 processes differ on {key}"
    # each checkpoint was written whole by both processes: the main one's state and each one's RNG state
    saved = runs / "ddp" / CHECKPOINTS
    assert sorted(p.name for p in saved.iterdir()) == ["step-000003", "step-000006"]
    for step in saved.iterdir():
        assert {"adapter_model.safetensors", "trainer_state.pt", "rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in step.iterdir()}


@pytest.mark.slow
def test_packed_rows_train_the_same_under_two_processes_as_under_one(tmp_path):
    "Packed rows (issue 32) through data parallel: 1 process with 2 accumulation steps against 2 under torchrun, same global batch."
    pack = ["--pack", "64", "--batch-size", "1"]
    run([sys.executable, str(WORKER), str(tmp_path / "single"), "--grad-accum", "2", *pack], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), str(tmp_path / "ddp"), *pack], tmp_path)
    single, ddp = (json.loads((tmp_path / d / "rank0" / "result.json").read_text()) for d in ("single", "ddp"))
    assert (single["world_size"], ddp["world_size"]) == (1, 2) and single["losses"][-1] < single["losses"][0]
    for a, b in zip(single["losses"], ddp["losses"], strict=True): assert abs(a - b) < 1e-5, (single["losses"], ddp["losses"])
    ours, theirs = (load_file(tmp_path / d / "rank0" / "adapter.safetensors") for d in ("single", "ddp"))
    for key in ours: assert torch.allclose(ours[key], theirs[key], atol=1e-5), key


def test_data_parallel_never_builds_the_full_logits(runs):
    "Each micro-batch (2 rows per process in both runs) would have batch × seq × vocab fp32 logits; none are made."
    shortest = min(len(row["input_ids"]) for row in examples())
    logits_bytes = 2 * (shortest - 1) * VOCAB * 4  # the smallest full logits of any micro-batch, fp32
    for name in ("single/rank0", "ddp/rank0", "ddp/rank1"):
        result = json.loads((runs / name / "result.json").read_text())
        assert result["largest_head_output"] * 4 < logits_bytes / 8, (name, result, logits_bytes)
        assert 0 < result["largest_saved_bytes"] < logits_bytes / 8, (name, result, logits_bytes)


NOTEBOOK_PLOTS = '''import sys
from execnb.shell import CaptureShell
shell = CaptureShell()  # nbdev-test's and the lessons' kernel: matplotlib inline
shell.run(f"from lora_kit.train import plot_history\\nh = [dict(step=1, loss=2.0), dict(step=2, loss=1.5, eval_loss=1.6)]\\nplot_history(h, {sys.argv[1]!r});")
print(sum("image/png" in o.get("data", {}) for o in shell.run("plot_history(h);")))
'''


def test_a_run_that_saves_its_loss_plot_leaves_a_notebooks_later_plots_shown(tmp_path):
    "Saving loss.png (every `finetune` does) once switched matplotlib to Agg: each later plot of that notebook stayed blank."
    r = subprocess.run([sys.executable, "-c", NOTEBOOK_PLOTS, str(tmp_path / "loss.png")], capture_output=True, text=True,
                       timeout=120, env=SUBPROCESS_ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1"], "the plot after a saved one must be shown, once"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
