"Interrupted, diverging and tampered training: clear errors, no lost or half-written work."
import os, pickle, signal, subprocess, sys, time
from pathlib import Path

import pytest, torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file
from torch import nn

import lora_kit.train
from lora_kit.core import LoraKitError, partial_folder, tiny_llama
from lora_kit.inject import adapter_state_dict, add_lora
from lora_kit.layers import LoRALinear
from lora_kit.train import CHECKPOINTS, NonFiniteLossError, TrainConfig, checkpoints, latest_checkpoint, train

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import examples  # noqa: E402

WORKER = Path(__file__).with_name("train_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SLOW = ["--hidden", "256", "--max-steps", "24", "--save-every", "4", "--dropout", "0.1", "--batch-size", "4",
        "--loraplus-ratio", "4"]  # LoRA+: two optimizer groups to save and restore


def worker(out, *args):
    r = subprocess.run([sys.executable, str(WORKER), str(out), *SLOW, *args], capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(Path(out) / "rank0" / "adapter.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a: assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    straight = worker(tmp_path / "straight")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), *SLOW], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / CHECKPOINTS / "step-000008").exists():
        assert proc.poll() is None and time.time() < deadline, "the worker ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait(timeout=60)
    assert not (out / "rank0").exists(), "the run finished before SIGKILL: make it slower"
    for saved in checkpoints(out):  # only whole ones: what `save_checkpoint` writes, all of it
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "rng_state_0.pt"} <= {p.name for p in saved.iterdir()}
    assert_same(worker(out, "--resume"), straight)


def test_broken_latest_checkpoint_is_an_error_or_falls_back(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=8, batch_size=2, lr=5e-3, warmup_steps=1, save_every=4)
    def fresh():
        torch.manual_seed(0)
        return add_lora(tiny_llama(), "all-linear", r=4, alpha=8)
    straight = fresh()
    train(straight, examples(), config=cfg, output_dir=tmp_path)
    (tmp_path / CHECKPOINTS / "step-000008" / "trainer_state.pt").write_bytes(b"truncated")
    with pytest.raises(LoraKitError, match="step-000008 cannot be resumed from"):
        train(fresh(), examples(), config=cfg, resume_from=tmp_path)
    with pytest.warns(UserWarning, match="Falling back to step-000004"):
        resumed = train(model := fresh(), examples(), config=cfg, resume_from=tmp_path, resume_fallback=True)
    for a, b in zip(straight.parameters(), model.parameters()): assert torch.allclose(a, b, atol=1e-6)


def small_run(output_dir, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, alpha=4)
    train(model, examples(), config=TrainConfig(max_steps=4, batch_size=2, lr=5e-3, save_every=2, seed=seed, **kwargs),
          output_dir=output_dir)
    return model


def test_saving_a_step_again_replaces_that_checkpoint(tmp_path):
    first = adapter_state_dict(small_run(tmp_path))
    second = adapter_state_dict(small_run(tmp_path, seed=1))  # a new run into the same folder writes steps 2 and 4 again
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    saved = load_file(tmp_path / CHECKPOINTS / "step-000004" / "adapter_model.safetensors")
    assert saved.keys() == second.keys()
    for key in saved: assert torch.equal(saved[key], second[key]) and not torch.equal(saved[key], first[key]), key
    assert not [p.name for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".")]


def test_a_partial_checkpoint_is_never_listed_or_resumed_from(tmp_path):
    small_run(tmp_path)
    left = partial_folder(tmp_path / CHECKPOINTS / "step-000006")  # as a run killed while writing step 6 leaves it
    left.mkdir()
    (left / "trainer_state.pt").write_bytes(b"half")
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    assert latest_checkpoint(tmp_path).name == "step-000004"
    train(add_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, alpha=4), examples(),
          config=TrainConfig(max_steps=4, batch_size=2, save_every=2), resume_from=tmp_path)


def test_a_checkpoint_that_fails_while_written_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(*args): raise OSError("No space left on device")
    monkeypatch.setattr(lora_kit.train, "save_adapter", disk_full)
    with pytest.raises(OSError, match="No space left"): small_run(tmp_path)
    assert list((tmp_path / CHECKPOINTS).iterdir()) == []


class Payload:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=2, save_every=2)
    train(add_lora(tiny_llama(), ["q_proj"], r=2), examples(), config=cfg, output_dir=tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / CHECKPOINTS / "step-000002" / "trainer_state.pt", "wb") as f: pickle.dump(Payload(marker), f)
    with pytest.raises(LoraKitError, match="cannot be resumed from"):
        train(add_lora(tiny_llama(), ["q_proj"], r=2), examples(), config=cfg, resume_from=tmp_path)
    assert not marker.exists(), "the pickle's code ran"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_adapter():
    model = add_lora(tiny_llama(), "all-linear", r=8, alpha=16)
    with torch.no_grad(): model.model.embed_tokens.weight.fill_(float("inf"))  # as after an fp16 overflow
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    with pytest.raises(NonFiniteLossError, match=r"nan at step 1; that update was not applied.*lower learning rate"):
        train(model, examples(), config=TrainConfig(max_steps=5, batch_size=4))
    for k, v in model.named_parameters():
        if v.requires_grad: assert torch.equal(v, before[k]), k


def test_same_seed_same_data_same_adapter():
    def run():
        torch.manual_seed(0)
        model = add_lora(tiny_llama(), "all-linear", r=4, alpha=8, dropout=0.1)
        train(model, examples(), config=TrainConfig(max_steps=5, batch_size=3, seed=7))
        return model
    for a, b in zip(run().parameters(), run().parameters()): assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(d_in=st.integers(1, 48), d_out=st.integers(1, 48), data=st.data(), rslora=st.booleans())
def test_merge_unmerge_property(d_in, d_out, data, rslora):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    alpha = data.draw(st.floats(0.1, 64))
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(d_in, d_out), r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        x, W0 = torch.randn(3, d_in), layer.base.weight.clone()
        unmerged = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), unmerged, atol=1e-4, rtol=1e-4)
        layer.unmerge()
        assert torch.allclose(layer.base.weight, W0, atol=1e-5)
