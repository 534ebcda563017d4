"Interrupted, diverging and tampered training: clear errors, no lost or half-written work."
import json, os, pickle, signal, subprocess, sys
from pathlib import Path

import pytest, torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file
from torch import nn

import lora_kit.train
from lora_kit.core import LoraKitError, WriteError, partial_folder, tiny_llama
from lora_kit.inject import adapter_state_dict, add_lora
from lora_kit.layers import LoRALinear
from lora_kit.train import CHECKPOINTS, NonFiniteLossError, TrainConfig, checkpoints, latest_checkpoint, train
from conftest import SUBPROCESS_ENV
from train_worker import examples


KILLED_RUNS = r"""
import json, os, signal, sys, traceback
tests, root = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests)
import torch, train_worker
import lora_kit.inject as inject, lora_kit.train as loop
ARGS = ["--max-steps", "8", "--save-every", "2", "--dropout", "0.1", "--batch-size", "4", "--loraplus-ratio", "4"]

def die(): os.kill(os.getpid(), signal.SIGKILL)

def arm(point, at):
    "Make this process SIGKILL itself at `point` of step `at`."
    if point == "mid-step":  # after the forward and backward of step `at`, before its update
        check = loop.check_finite
        loop.check_finite = lambda loss, step: die() if step == at else check(loss, step)
    elif point in ("writing trainer_state.pt", "writing the adapter"):  # half of that file of checkpoint `at` written
        mine = (lambda f: str(f).endswith("trainer_state.pt")) if point == "writing trainer_state.pt" else (lambda f: True)
        module, name = (torch, "save") if point == "writing trainer_state.pt" else (inject, "save_file")
        real = getattr(module, name)
        def half(obj, f, *args, **kwargs):
            real(obj, f, *args, **kwargs)
            if mine(f) and f"step-{at:06d}" in str(f):
                os.truncate(f, os.path.getsize(f) // 2); die()
        setattr(module, name, half)
    else:  # "after the checkpoint": just after checkpoint `at` is complete
        save = loop.save_checkpoint
        def saved(output_dir, step, *args, **kwargs):
            path = save(output_dir, step, *args, **kwargs)
            if step == at: die()
            return path
        loop.save_checkpoint = saved

def run(out, *extra, point=None, at=None):
    "One training process, forked from this one (which has imported everything); its exit code, -9 when killed."
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if point: arm(point, at)
            train_worker.main([out, *ARGS, *extra])
        except BaseException: traceback.print_exc(); code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

straight, killed = os.path.join(root, "straight"), os.path.join(root, "killed")
train_worker.main([straight, *ARGS])  # here, not forked: what the first run imports lazily is then there for every fork
report = dict(straight=0, kills=[])
for i, (point, at) in enumerate(json.loads(sys.argv[3])):
    code = run(killed, *(["--resume"] if i else []), point=point, at=at)
    ckpts = os.path.join(killed, "checkpoints")
    report["kills"].append(dict(point=point, at=at, code=code, finished=os.path.exists(os.path.join(killed, "rank0")),
                                checkpoints=sorted(os.listdir(ckpts))))
report["resumed"] = run(killed, "--resume")
print(json.dumps(report))
"""

KILL_POINTS = [  # (where the process is killed, at which step, the checkpoints it leaves: hidden partial ones included)
    ("mid-step", 3, ["step-000002"]),
    ("writing trainer_state.pt", 4, [".step-000004.partial", "step-000002"]),
    ("writing the adapter", 6, [".step-000006.partial", "step-000002", "step-000004"]),
    ("after the checkpoint", 6, ["step-000002", "step-000004", "step-000006"]),
    ("after the checkpoint", 8, ["step-000002", "step-000004", "step-000006", "step-000008"]),  # the last: before the final save
]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a: assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_sigkill_at_five_points_then_resume_equals_uninterrupted(tmp_path):
    """One run killed (SIGKILL) five times, each time at another point: mid-step, while a checkpoint's optimizer state or
    its adapter is half written, just after a checkpoint, after the last one; resumed after each kill. Every checkpoint and
    the final adapter equal those of the same run uninterrupted. The processes are forked from one that imported
    everything once, so the seven runs take seconds."""
    points = [[point, at] for point, at, _ in KILL_POINTS]
    r = subprocess.run([sys.executable, "-c", KILLED_RUNS, str(Path(__file__).parent), str(tmp_path), json.dumps(points)],
                       capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["straight"] == 0 and report["resumed"] == 0, r.stderr[-3000:]
    for kill, (point, at, left) in zip(report["kills"], KILL_POINTS):
        assert (kill["code"], kill["finished"]) == (-signal.SIGKILL, False), (point, at, r.stderr[-3000:])
        assert kill["checkpoints"] == left, (point, at)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert [p.name for p in (killed / CHECKPOINTS).iterdir()] == [p.name for p in (straight / CHECKPOINTS).iterdir()]  # no partial left
    for saved in checkpoints(straight):
        again = killed / CHECKPOINTS / saved.name
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "rng_state_0.pt"} <= {p.name for p in again.iterdir()}
        assert_same(load_file(again / "adapter_model.safetensors"), load_file(saved / "adapter_model.safetensors"))
        theirs, ours = (torch.load(c / "trainer_state.pt", weights_only=True)["optimizer"]["state"] for c in (saved, again))
        assert theirs.keys() == ours.keys()
        for k in theirs: assert_same(theirs[k], ours[k])  # Adam's moments and step count
    assert_same(load_file(killed / "rank0" / "adapter.safetensors"), load_file(straight / "rank0" / "adapter.safetensors"))


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
        train(model := fresh(), examples(), config=cfg, resume_from=tmp_path, resume_fallback=True)
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
    def disk_full(*args, **kwargs): raise OSError("No space left on device")  # no errno: its words say it
    monkeypatch.setattr(lora_kit.train, "save_adapter", disk_full)
    with pytest.raises(WriteError, match=rf"^Could not write {tmp_path / CHECKPOINTS / 'step-000002'}: No space left on device\. "
                                         r"Nothing half-written was left; free some space and run again\. No checkpoint is kept"):
        small_run(tmp_path)
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
        layer.lora_B["default"].weight.normal_()
        x, W0 = torch.randn(3, d_in), layer.base.weight.clone()
        unmerged = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), unmerged, atol=1e-4, rtol=1e-4)
        layer.unmerge()
        assert torch.allclose(layer.base.weight, W0, atol=1e-5)
