"""Sharded training (issue 34): FSDP2 on 2 CPU processes (torchrun, gloo) against one plain process on the same global batch.

fp32, bf16 and a 4-bit base: the loss history, the bytes each process holds, the adapter peft loads, and a resume."""
import json, shutil, subprocess, sys
from pathlib import Path

import pytest, torch
from safetensors.torch import load_file

from lora_kit.core import ConfigError, tiny_llama
from lora_kit.inject import add_lora, load_adapter
from lora_kit.train import check_shardable, shard_model
from conftest import SUBPROCESS_ENV, free_port
from train_worker import examples

WORKER = Path(__file__).with_name("fsdp_worker.py")


def launch(out: Path, *args: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    "The worker as one plain process (`processes=0`, with 2 accumulation steps: the same global batch) or under torchrun with FSDP."
    if processes: cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                         str(free_port()), str(WORKER), str(out), "--fsdp", *args]
    else: cmd = [sys.executable, str(WORKER), str(out), "--grad-accum", "2", *args]
    r = subprocess.run(cmd, cwd=WORKER.parent, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r


def results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*/result.json"))]


RUNS = {}  # (precision, four_bit) -> the folder holding both runs: each pair is trained once per test session
SETTINGS = [("no", False), ("bf16", False), ("no", True), ("bf16", True)]
IDS = ["fp32", "bf16", "4bit-fp32", "4bit-bf16"]


def trained(tmp_path_factory, precision: str, four_bit: bool) -> Path:
    "One plain process and two sharded ones, trained alike (checkpoints every 3 steps in the sharded run)."
    if (precision, four_bit) not in RUNS:
        tmp = tmp_path_factory.mktemp(f"fsdp-{precision}{'-4bit' if four_bit else ''}")
        args = ["--precision", precision, *(["--four-bit"] if four_bit else [])]
        launch(tmp / "single", *args, processes=0)
        launch(tmp / "sharded", *args, "--save-every", "3")
        RUNS[precision, four_bit] = tmp
    return RUNS[precision, four_bit]


@pytest.mark.slow
@pytest.mark.parametrize("precision,four_bit", SETTINGS, ids=IDS)
def test_two_sharded_processes_train_as_one_plain_process(tmp_path_factory, precision, four_bit):
    tmp = trained(tmp_path_factory, precision, four_bit)
    (single,), sharded = results(tmp / "single"), results(tmp / "sharded")
    assert [r["world_size"] for r in sharded] == [2, 2] and single["world_size"] == 1
    assert sharded[0]["losses"] == sharded[1]["losses"]  # one reduced loss, seen by both
    # fp32: the same sums in another order; bf16: FSDP casts every weight to bf16 where autocast keeps norms and embeddings fp32
    tolerance = 1e-5 if precision == "no" else 2e-3
    for a, b in zip(single["losses"], sharded[0]["losses"], strict=True): assert abs(a - b) < tolerance, (single["losses"], sharded[0]["losses"])
    assert single["losses"][-1] < single["losses"][0]


@pytest.mark.slow
@pytest.mark.parametrize("precision,four_bit", SETTINGS, ids=IDS)
def test_each_process_holds_about_half_of_the_base(tmp_path_factory, precision, four_bit):
    tmp = trained(tmp_path_factory, precision, four_bit)
    (single,), sharded = results(tmp / "single"), results(tmp / "sharded")
    assert single["held_bytes"] > single["whole_bytes"]  # the plain process holds the whole base and the adapters
    for r in sharded:
        assert r["held_bytes"] <= 0.55 * r["whole_bytes"], (r["held_bytes"], r["whole_bytes"])
        assert abs(r["held_bytes"] - single["held_bytes"] / 2) <= 0.01 * single["held_bytes"]  # half of everything, adapters too


@pytest.mark.slow
@pytest.mark.parametrize("precision,four_bit", SETTINGS, ids=IDS)
def test_sharded_adapters_train_in_fp32_on_the_lean_path_without_logits(tmp_path_factory, precision, four_bit):
    "Under FSDP too: adapters (and so Adam's state) stay fp32 in bf16 runs, every layer takes lesson 06's lean backward, no logits."
    for r in results(trained(tmp_path_factory, precision, four_bit) / "sharded"):
        assert r["trained_dtypes"] == ["torch.float32"] and r["plain_path"] == {} and r["largest_head_output"] == 0, r


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"], ids=["fp32", "bf16"])
def test_the_gathered_adapter_is_the_plain_runs_in_peft(tmp_path_factory, precision):
    "The adapter rank 0 wrote from the shards, loaded by peft, gives the logits of the plain run's adapter in lora_kit."
    from peft import PeftModel
    tmp = trained(tmp_path_factory, precision, False)
    ids = torch.tensor([examples()[0]["input_ids"]])
    ours = load_adapter(tiny_llama(hidden_size=64, intermediate_size=192, vocab_size=4096), tmp / "single" / "adapter")
    theirs = PeftModel.from_pretrained(tiny_llama(hidden_size=64, intermediate_size=192, vocab_size=4096), tmp / "sharded" / "adapter")
    with torch.no_grad(): a, b = ours(ids).logits, theirs(ids).logits
    assert (a - b).abs().max() < (1e-4 if precision == "no" else 2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("precision,four_bit", SETTINGS, ids=IDS)
def test_the_adapters_of_both_runs_agree(tmp_path_factory, precision, four_bit):
    tmp = trained(tmp_path_factory, precision, four_bit)
    ours, theirs = (load_file(tmp / d / "adapter" / "adapter_model.safetensors") for d in ("single", "sharded"))
    assert ours.keys() == theirs.keys() and len(ours) == 6 * (4 if four_bit else 2)  # q, v, down: A and B, per layer
    for key in ours:
        if precision == "no": assert torch.allclose(ours[key], theirs[key], atol=1e-5), key
        else:  # bf16 gradients: where one is near 0, Adam's first steps move an entry ±lr either way; the whole matrix stays within 3%
            assert (ours[key] - theirs[key]).norm() <= 0.03 * ours[key].norm(), key


@pytest.mark.slow
def test_dora_with_gradient_checkpointing_shards_too(tmp_path):
    "DoRA's magnitudes (a norm of the gathered weight) and recomputed activations under FSDP: the plain run's losses."
    args = ["--dora", "--grad-checkpointing"]
    launch(tmp_path / "single", *args, processes=0)
    launch(tmp_path / "sharded", *args)
    (single,), sharded = results(tmp_path / "single"), results(tmp_path / "sharded")
    for a, b in zip(single["losses"], sharded[0]["losses"], strict=True): assert abs(a - b) < 1e-5, (single["losses"], sharded[0]["losses"])
    assert single["losses"][-1] < single["losses"][0]
    ours, theirs = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("single", "sharded"))
    assert any("lora_magnitude_vector" in k for k in ours) and ours.keys() == theirs.keys()
    for key in ours: assert torch.allclose(ours[key], theirs[key], atol=1e-5), key


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_to_the_same_adapter(tmp_path_factory, tmp_path):
    "The fp32 run as killed after its step-3 checkpoint (the step-6 one and the outputs gone), resumed on 2 processes."
    tmp = trained(tmp_path_factory, "no", False)
    out = tmp_path / "killed"
    shutil.copytree(tmp / "sharded" / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "step-000006")
    launch(out, "--resume", "--save-every", "3")
    resumed, whole = results(out)[0], results(tmp / "sharded")[0]
    assert resumed["losses"] == whole["losses"][3:]
    ours, theirs = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, tmp / "sharded"))
    for key in ours: assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.slow
def test_a_sharded_checkpoint_refuses_another_number_of_processes(tmp_path_factory, tmp_path):
    tmp = trained(tmp_path_factory, "no", False)
    out = tmp_path / "one"
    shutil.copytree(tmp / "sharded" / "checkpoints", out / "checkpoints")
    r = launch(out, "--resume", processes=1, check=False)
    assert r.returncode != 0 and "was trained with 2 processes, this run asks for 1 process: resume under torchrun with 2 processes" in r.stderr


@pytest.mark.slow
def test_packed_codes_stored_as_bytes_are_refused_before_any_step(tmp_path):
    "uint8 codes gathered in fp32 would be converted into garbage: one line names the layer and the setting that fixes it."
    r = launch(tmp_path / "out", "--four-bit", "--quant-storage", "uint8", check=False)
    assert r.returncode != 0
    assert "keeps its 4-bit codes as torch.uint8, but FSDP gathers in torch.float32" in r.stderr
    assert "bnb_4bit_quant_storage=torch.float32" in r.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_sharding_needs_the_processes_torchrun_starts():
    model = add_lora(tiny_llama(), ["q_proj"], r=2, alpha=4)
    with pytest.raises(ConfigError, match="fsdp shards over the processes torchrun starts: launch with torchrun --nproc-per-node N"):
        shard_model(model)


def test_fsdp_in_fp32_refuses_a_model_of_two_dtypes():
    model = add_lora(tiny_llama().to(torch.bfloat16), ["q_proj"], r=2, alpha=4)
    model.model.layers[0].self_attn.q_proj.lora_A["default"].float()
    with pytest.raises(ConfigError, match=r"FSDP in fp32 gathers one dtype, but the model holds torch.bfloat16, torch.float32: "
                                          r"train with precision 'bf16'"):
        check_shardable(model, torch.float32)
    check_shardable(model, torch.bfloat16)  # cast to bf16 for the gather: fine


def test_fsdp_refuses_lorafa():
    model = add_lora(tiny_llama(), ["q_proj"], r=2, alpha=4, lorafa=True)
    with pytest.raises(ConfigError, match="LoRA-FA's gradient correction needs each A whole"):
        check_shardable(model, torch.float32)



def finetune_job(out: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    "`lora-kit finetune` on the demo (4 steps, 4 held-out prompts) as one process, or under torchrun."
    flags = ["finetune", "--max-steps", "4", "--eval-examples", "4", "--output", str(out), *args]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--no-python", "--nproc_per_node", str(processes), "--master_port",
            str(free_port()), "lora-kit"] if processes > 1 else ["lora-kit"]) + flags
    return subprocess.run(cmd, env=SUBPROCESS_ENV | {"TQDM_DISABLE": "1"}, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    "The demo fine-tune as one process with a batch of 4: the global batch of 2 processes with 2 each."
    out = tmp_path_factory.mktemp("alone") / "out"
    r = finetune_job(out, "--batch-size", "4", processes=1)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["data-parallel", "fsdp"])
def test_the_main_job_runs_under_torchrun_as_one_process_would(alone, tmp_path, sharded):
    out = tmp_path / "out"
    r = finetune_job(out, "--batch-size", "2", *(["--fsdp"] if sharded else []))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained ") == 1  # one summary, by the process that wrote
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, alone))
    assert ours["world_size"] == 2 and theirs["world_size"] == 1
    assert ours["flops_per_step"] == theirs["flops_per_step"]  # the global batch's
    for a, b in zip(ours["history"], theirs["history"], strict=True): assert abs(a["loss"] - b["loss"]) < 1e-5
    assert abs(ours["eval_loss_after"] - theirs["eval_loss_after"]) < 1e-5
    a, b = (load_file(d / "adapter_model.safetensors") for d in (out, alone))
    for key in a: assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert not (out / ".lora-kit.lock").exists()


@pytest.mark.slow
def test_a_job_under_torchrun_is_refused_a_folder_another_run_holds(tmp_path):
    "Every process says so on one line and stops; none waits for the others."
    from lora_kit.core import output_lock
    with output_lock(tmp_path / "out"):
        r = finetune_job(tmp_path / "out")
    assert r.returncode != 0
    assert r.stderr.count("is being written by another lora-kit run") == 2, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "4bit-fp32"])
def test_the_estimate_per_gpu_is_what_each_process_holds(tmp_path_factory, four_bit):
    "`estimate(..., gpus=2, fsdp=True)`'s weights per GPU against the bytes each of the 2 processes held, within 10%."
    from lora_kit.accounting import Setup, estimate, load_config
    from lora_kit.core import tiny_llama_config
    from lora_kit.tiny import base_path
    tmp = trained(tmp_path_factory, "no", four_bit)
    model = str(base_path() / "config.json") if four_bit else load_config(tiny_llama_config(hidden_size=64, intermediate_size=192, vocab_size=4096))
    setup = Setup("qlora" if four_bit else "lora", rank=4, targets=("q_proj", "v_proj", "down_proj"), precision="fp32", gpus=2, fsdp=True)
    predicted = estimate(model, setup)["memory_bytes"]["weights"]
    for r in results(tmp / "sharded"): assert abs(predicted - r["held_bytes"]) <= 0.1 * r["held_bytes"], (predicted, r["held_bytes"])


@pytest.mark.parametrize("settings", [dict(lorafa=True), dict(init_lora_weights="pissa"), dict(init_lora_weights="loftq")],
                         ids=["lorafa", "pissa", "loftq"])
def test_the_job_refuses_fsdp_with_what_it_cannot_shard(settings):
    from lora_kit.finetune import FinetuneConfig
    from lora_kit.train import TrainConfig
    with pytest.raises(ConfigError, match="fsdp trains LoRA, rsLoRA, DoRA and LoRA\\+ adapters; LoRA-FA's correction needs each A whole") as e:
        FinetuneConfig(train=TrainConfig(fsdp=True), **settings)
    assert e.value.field == "fsdp"


def test_the_cli_names_the_flag_of_a_refused_fsdp_job():
    r = subprocess.run(["lora-kit", "finetune", "--fsdp", "--init", "pissa"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("lora-kit finetune --fsdp: fsdp trains LoRA"), r.stderr


def test_the_other_processes_of_a_sharded_job_load_no_weights():
    "What `job_base` builds on every process but the first: the architecture on the meta device, from the config alone."
    from lora_kit.qlora import load_base
    model, tokenizer = load_base("tiny", meta=True)
    assert {p.device.type for p in model.parameters()} == {"meta"} and sum(p.numel() for p in model.parameters()) > 0
    assert tokenizer.pad_token_id is not None
