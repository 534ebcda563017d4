"""Faults a long run meets, as a user meets them: a disk that fills up at any file of a save, an output folder on a
read-only disk or without permission, a resume with other settings, an export or a merge cut short.

Each ends in one line on stderr naming the path (or each difference) and the fix, exit code 2; nothing half-written is
left, and the work before the fault is kept: the checkpoints are those of a run without the fault, and `--resume`
continues to the same adapter. Injected faults raise the error type the real writer raises (safetensors'
`SafetensorError`, Python's `OSError`, torch's `RuntimeError`, tokenizers' plain `Exception`); real ones come from
a small tmpfs (root only: skipped with the reason where mounting is not permitted)."""
import errno, functools, json, os, shutil, signal, subprocess, sys, tempfile
from pathlib import Path

import pytest, torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_kit.cli import main
from lora_kit.core import LOCK_NAME, LoraKitError, tiny_llama, write_failure
from lora_kit.inject import WEIGHTS_NAME, add_lora
from lora_kit.train import CHECKPOINTS, RUN_SETTINGS, CheckpointMismatchError, TrainConfig, checkpoints, train
from conftest import SUBPROCESS_ENV

from train_worker import examples

QUICK = ["finetune", "--max-steps", "2", "--eval-examples", "2", "--batch-size", "2", "--save-every", "1", "--warmup-steps", "0"]
FULL = "No space left on device"


def run(capsys, *args):
    "`lora-kit finetune` with the quick flags, in this process: (exit code, stderr)."
    code = main([*QUICK, *map(str, args)])
    return code, capsys.readouterr().err


def lora_kit(*args, prefix=()):
    "`lora-kit ARGS` in a new process, as a user runs it (`prefix`: e.g. a command that drops privileges)."
    return subprocess.run([*prefix, sys.executable, "-m", "lora_kit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=SUBPROCESS_ENV)


def message(err:str) -> str:
    "The error line of a run's stderr: the only line besides progress bars (a `\\r`-redrawn `NN%|...|` line); no traceback."
    assert "Traceback" not in err, err[-3000:]
    *lines, last = err.strip().split("\n")
    *bars, line = last.split("\r")
    for bar in [*lines, *bars]: assert not bar.strip() or "%|" in bar, f"more than one line on stderr: {err[-3000:]}"
    return line


def assert_whole(folder:Path):
    "Nothing hidden (a temporary, a partial folder, the lock) and nothing half-written: every file reads back."
    from PIL import Image
    for p in folder.rglob("*"):
        assert not p.name.startswith("."), f"left behind: {p}"
        if p.is_dir(): continue
        if p.suffix == ".json": json.loads(p.read_text())
        elif p.suffix == ".safetensors": load_file(p)
        elif p.suffix == ".pt": torch.load(p, weights_only=True)
        elif p.suffix == ".png": Image.open(p).load()


def assert_same_adapter(a:Path, b:Path):
    x, y = load_file(a / WEIGHTS_NAME), load_file(b / WEIGHTS_NAME)
    assert x.keys() == y.keys()
    for k in x: assert torch.allclose(x[k], y[k], atol=1e-6), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "The quick run without a fault: the checkpoints and the adapter every faulty run must keep or reach."
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([*QUICK, "--output", str(out)]) == 0
    return out


# The writers of a save, each made to fail as its library fails on a full disk, on its `nth` call: with --max-steps 2
# and --save-every 1, checkpoint step-000001 is call 1 of a checkpoint file's writer, step-000002 call 2, the final
# adapter call 3; the tokenizer, loss.png and metrics.json are written once, after the last checkpoint.

def _nth(nth):
    calls = [0]
    def now():
        calls[0] += 1
        return calls[0] == nth
    return now

def safetensors_fills_up(monkeypatch, nth):
    import lora_kit.inject as inject
    real, now = inject.save_file, _nth(nth)
    def save_file(tensors, filename, metadata=None):
        if not now(): return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 1000)  # what got written before the disk was full
        raise SafetensorError(f"Error while serializing: I/O error: {FULL} (os error 28)")
    monkeypatch.setattr(inject, "save_file", save_file)

def write_text_fills_up(name):  # json files: json.dumps, then Path.write_text (Python's own OSError)
    def install(monkeypatch, nth):
        real, now = Path.write_text, _nth(nth)
        def write_text(self, data, *args, **kwargs):
            if not (self.name == name or self.name.startswith(f".{name}.")) or not now(): return real(self, data, *args, **kwargs)
            real(self, data[:len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, FULL, str(self))
        monkeypatch.setattr(Path, "write_text", write_text)
    return install

def torch_save_fills_up(name):
    def install(monkeypatch, nth):
        real, now = torch.save, _nth(nth)
        def save(obj, f, *args, **kwargs):
            if not str(f).endswith(name) or not now(): return real(obj, f, *args, **kwargs)
            Path(f).write_bytes(b"PK\3\4" + b"\0" * 1000)
            raise RuntimeError(f"[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: {FULL}")
        monkeypatch.setattr(torch, "save", save)
    return install

def savefig_fills_up(monkeypatch, nth):
    import matplotlib.figure
    real, now = matplotlib.figure.Figure.savefig, _nth(nth)
    def savefig(self, fname, *args, **kwargs):
        if not now(): return real(self, fname, *args, **kwargs)
        Path(fname).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        raise OSError(errno.ENOSPC, FULL)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)

def tokenizer_fills_up(monkeypatch, nth):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
    real, now = TokenizersBackend.save_pretrained, _nth(nth)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not now(): return real(self, save_directory, *args, **kwargs)
        real(self, save_directory, *args, **kwargs)
        cut = Path(save_directory) / "tokenizer.json"
        cut.write_bytes(cut.read_bytes()[:1000])  # where the disk filled up
        raise Exception(f"{FULL} (os error 28)")  # what tokenizers' Rust writer raises
    monkeypatch.setattr(TokenizersBackend, "save_pretrained", save_pretrained)

STEP1, STEP2 = f"{CHECKPOINTS}/step-000001", f"{CHECKPOINTS}/step-000002"
SAVES = {  # file: (the fault, its nth call, the path the message names (relative to the output), the checkpoint kept)
    "checkpoint adapter_model.safetensors": (safetensors_fills_up, 2, f"{STEP2}/{WEIGHTS_NAME}", STEP1),
    "checkpoint adapter_config.json": (write_text_fills_up("adapter_config.json"), 2, f"{STEP2}/adapter_config.json", STEP1),
    "checkpoint trainer_state.pt": (torch_save_fills_up("trainer_state.pt"), 2, STEP2, STEP1),
    "checkpoint run_settings.json": (write_text_fills_up(RUN_SETTINGS), 2, STEP2, STEP1),
    "checkpoint rng_state_0.pt": (torch_save_fills_up("rng_state_0.pt"), 2, STEP2, STEP1),
    "final adapter_model.safetensors": (safetensors_fills_up, 3, WEIGHTS_NAME, STEP2),
    "final adapter_config.json": (write_text_fills_up("adapter_config.json"), 3, "adapter_config.json", STEP2),
    "final tokenizer files": (tokenizer_fills_up, 1, "", STEP2),
    "final loss.png": (savefig_fills_up, 1, "loss.png", STEP2),
    "final metrics.json": (write_text_fills_up("metrics.json"), 1, "metrics.json", STEP2),
}


@pytest.mark.parametrize("save", SAVES)
def test_a_full_disk_at_any_file_of_a_save_is_one_line_and_loses_no_training(save, reference, tmp_path, capsys, monkeypatch):
    fault, nth, named, kept = SAVES[save]
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fault(m, nth)
        code, err = run(capsys, "--output", out)
    line = message(err)
    assert code == 2, err[-3000:]
    assert line.startswith(f"Could not write {out / named if named else out}: {FULL}"), line
    assert line.endswith(f"The last good checkpoint, {out / kept}, is kept: lora-kit finetune --resume --output {out} continues from it."), line
    assert_whole(out)
    assert [p.relative_to(out).as_posix() for p in checkpoints(out)] == [STEP1, STEP2][:[STEP1, STEP2].index(kept) + 1]
    for saved in checkpoints(out): assert_same_adapter(saved, reference / saved.relative_to(out))  # intact: as without the fault
    code, err = run(capsys, "--output", out, "--resume")  # the fix the message gives, once there is room again
    assert code == 0, err[-3000:]
    assert_same_adapter(out, reference)
    assert_whole(out)


# Real disks: a tmpfs of a few hundred KiB, read-only disks, a folder without write permission.

@functools.cache
def mount_refused() -> str|None:
    "Why this test run cannot mount a tmpfs (None when it can)."
    if os.geteuid() != 0: return "mounting a tmpfs needs root"
    if not shutil.which("mount"): return "no mount command"
    probe = tempfile.mkdtemp()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True, text=True, timeout=60)
    if r.returncode: return f"mount -t tmpfs is not permitted here: {r.stderr.strip()}"
    subprocess.run(["umount", probe], check=True, timeout=60)
    os.rmdir(probe)
    return None


@pytest.fixture
def small_disk(tmp_path):
    "`small_disk(size, *options)`: a new tmpfs under tmp_path, unmounted after the test."
    mounted = []
    def mount(size, *options):
        if reason := mount_refused(): pytest.skip(reason)
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(disk)], check=True, timeout=60)
        mounted.append(disk)
        return disk
    yield mount
    for disk in reversed(mounted): subprocess.run(["umount", "-l", str(disk)], check=True, timeout=60)


def files_on(disk:Path) -> list[str]: return sorted(p.relative_to(disk).as_posix() for p in disk.rglob("*") if not p.is_dir())


@pytest.mark.slow
def test_a_real_120k_disk_ends_in_one_line_naming_the_file(small_disk):
    disk = small_disk("120k")
    r = lora_kit("finetune", "--output", disk / "out", "--max-steps", "2", "--eval-examples", "4")
    assert r.returncode == 2, r.stderr[-3000:]
    line = message(r.stderr)  # safetensors' SafetensorError, recognised by its "(os error 28)"
    assert line.startswith(f"Could not write {disk / 'out' / WEIGHTS_NAME}: {FULL}. Nothing half-written was left; free some space"), line
    assert files_on(disk) in ([], ["out/progress.jsonl"])  # not a byte of a partial adapter, and no lock: at most the run's log


def test_torch_save_on_a_real_full_disk_is_told_by_its_words_and_the_disk(small_disk, tmp_path):
    "torch.save names no cause ('unexpected pos ...'): the disk it wrote to is asked, while the failed file still fills it."
    disk = small_disk("64k")
    with pytest.raises(RuntimeError) as caught: torch.save(torch.zeros(100_000), disk / "x.pt")
    assert FULL not in str(caught.value)
    assert write_failure(caught.value, disk) == (FULL, "free some space")
    assert write_failure(caught.value, tmp_path) == ("the write failed", "check that the disk has space and can be written")


def test_a_real_disk_full_at_a_checkpoints_trainer_state_keeps_nothing_partial(small_disk, reference, capsys):
    "Room for a checkpoint's adapter, not for its optimizer state (torch.save): the first checkpoint fails whole."
    sizes = {p.name: p.stat().st_size for p in (reference / STEP1).iterdir()}
    disk = small_disk(f"{(sizes[WEIGHTS_NAME] + sizes['trainer_state.pt'] // 2) // 1024 + 16}k")
    code, err = run(capsys, "--output", disk / "out")
    line = message(err)
    assert code == 2 and line.startswith(f"Could not write {disk / 'out' / STEP1}: {FULL}. Nothing half-written was left;"), line
    assert line.endswith("No checkpoint is kept to resume from (runs save them with --save-every N)."), line
    assert files_on(disk) in ([], ["out/progress.jsonl"])  # at most the run's log


def test_a_real_disk_full_at_the_final_adapter_keeps_the_checkpoint_and_resume_finishes(small_disk, reference, capsys):
    "Room for both checkpoints but not the final adapter; once the disk is larger, --resume writes the same adapter."
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in (reference / CHECKPOINTS).rglob("*") if p.is_file())
    disk = small_disk(f"{(used + (reference / WEIGHTS_NAME).stat().st_size // 2) // 1024 + 8}k")
    out = disk / "out"
    code, err = run(capsys, "--output", out)
    line = message(err)
    assert code == 2 and line.startswith(f"Could not write {out / WEIGHTS_NAME}: {FULL}."), line
    assert line.endswith(f"The last good checkpoint, {out / STEP2}, is kept: lora-kit finetune --resume --output {out} continues from it."), line
    assert_whole(out)
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True, timeout=60)  # room again
    code, err = run(capsys, "--output", out, "--resume")
    assert code == 0, err[-3000:]
    assert_same_adapter(out, reference)


def _drop_write_override() -> list[str]:
    "A command prefix under which this user's permission bits hold (root ignores them unless it drops CAP_DAC_OVERRIDE)."
    if os.geteuid() != 0: return []
    if not shutil.which("setpriv"): pytest.skip("running as root without setpriv: a folder's permission bits do not stop root")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("case", ["read-only disk", "folder on a disk remounted read-only", "folder without write permission"])
@pytest.mark.slow
def test_an_output_that_cannot_be_written_is_refused_in_one_line_before_anything_loads(case, small_disk, tmp_path):
    prefix, cause, fix = [], "Read-only file system", "choose a writable folder"
    if case == "read-only disk":
        out = small_disk("1m", "ro") / "out"
    elif case == "folder on a disk remounted read-only":
        disk = small_disk("1m")
        (out := disk / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, timeout=60)
    else:
        prefix, cause, fix = _drop_write_override(), "Permission denied", "choose a folder you can write to"
        (locked := tmp_path / "locked").mkdir()
        locked.chmod(0o555)
        out = locked / "out"
    r = lora_kit("finetune", "--output", out, "--max-steps", "2", "--eval-examples", "2", prefix=prefix)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]  # no training bar: refused before it
    assert r.stderr.strip() == f"Could not write {out}: {cause}. Nothing half-written was left; {fix} and run again."
    assert not (out / LOCK_NAME).exists()


# Resume with other settings: each difference named with both values and the flag that resumes the checkpoint.

CHECKPOINTED = dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8)


def checkpointed(out, steps=2, base=None, **lora):
    "A run of the tiny model that leaves checkpoints in `out` (every 2 steps)."
    torch.manual_seed(0)
    model = add_lora(tiny_llama(), **(CHECKPOINTED | lora))
    train(model, examples(), config=TrainConfig(max_steps=steps, batch_size=2, save_every=2), output_dir=out,
          base_model_name_or_path=base)
    return out


def resumed(out, steps=2, base=None, fallback=False, **lora):
    model = add_lora(tiny_llama(), **(CHECKPOINTED | lora))
    train(model, examples(), config=TrainConfig(max_steps=steps, batch_size=2, save_every=2), resume_from=out,
          resume_fallback=fallback, base_model_name_or_path=base)
    return model


DIFFERENCES = {  # what the resume changes: (its settings, what the error says)
    "rank": (dict(r=8), "was trained with rank 4, this run asks for rank 8: resume with --rank 4, or start again with --overwrite."),
    "alpha": (dict(alpha=16), "was trained with alpha 8, this run asks for alpha 16: resume with --alpha 8, or"),
    "dropout": (dict(dropout=0.1), "was trained with dropout 0, this run asks for dropout 0.1: resume with --dropout 0, or"),
    "targets": (dict(target_modules=["v_proj", "o_proj"]),
                "was trained with targets q_proj,v_proj, this run asks for targets o_proj,v_proj: resume with --targets q_proj,v_proj, or"),
    "rslora": (dict(use_rslora=True), "was trained with rsLoRA off, this run asks for rsLoRA on: resume without --rslora, or"),
    "dora": (dict(use_dora=True), "was trained with DoRA off, this run asks for DoRA on: resume without --dora, or"),
    "init": (dict(init_lora_weights="pissa"), "was trained with init kaiming, this run asks for init pissa: resume with --init kaiming, or"),
    "several": (dict(r=8, alpha=16, use_dora=True), "was trained with rank 4, this run asks for rank 8; with alpha 8, this run asks "
                "for alpha 16; with DoRA off, this run asks for DoRA on: resume with --rank 4 --alpha 8, without --dora, or start again"),
}


@pytest.mark.parametrize("change", DIFFERENCES)
def test_a_resume_with_other_adapter_settings_names_each_difference_and_its_flag(change, tmp_path):
    lora, said = DIFFERENCES[change]
    out = checkpointed(tmp_path)
    with pytest.raises(CheckpointMismatchError) as caught: resumed(out, **lora)
    assert str(caught.value).startswith(f"Checkpoint {out / CHECKPOINTS / 'step-000002'} {said}")
    resumed(out)  # with the checkpoint's own settings it resumes


def test_a_pissa_checkpoint_is_told_by_what_was_asked_not_the_rank_2r_it_saves(tmp_path):
    "PiSSA saves a rank-2r plain LoRA: the rank-8 plain run has the same saved config, but not the same run."
    out = checkpointed(tmp_path, init_lora_weights="pissa")
    assert json.loads((out / CHECKPOINTS / "step-000002" / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(CheckpointMismatchError, match="with rank 4, this run asks for rank 8; with alpha 8, this run asks for alpha 16; "
                                                      "with init pissa, this run asks for init kaiming: resume with --rank 4 --alpha 8 --init pissa, or"):
        resumed(out, r=8, alpha=16)
    resumed(out, init_lora_weights="pissa")


def test_a_checkpoint_of_more_processes_says_how_to_launch(tmp_path):
    out = checkpointed(tmp_path)
    step = out / CHECKPOINTS / "step-000002"
    shutil.copy(step / "rng_state_0.pt", step / "rng_state_1.pt")  # as two processes leave it: one RNG state each
    with pytest.raises(CheckpointMismatchError, match=r"was trained with 2 processes, this run asks for 1 process: resume under "
                                                      r"torchrun with 2 processes, or start again with --overwrite\.$"):
        resumed(out)


def test_a_checkpoint_of_another_base_names_it(tmp_path):
    from lora_kit.tiny import base_path
    out = checkpointed(tmp_path / "named", base="org/base-a")
    assert json.loads((out / CHECKPOINTS / "step-000002" / RUN_SETTINGS).read_text())["base_model_name_or_path"] == "org/base-a"
    with pytest.raises(CheckpointMismatchError, match="with base model org/base-a, this run asks for base model org/base-b: "
                                                      "resume with --model org/base-a, or"):
        resumed(out, base="org/base-b")
    resumed(out, base="org/base-a")
    tiny = checkpointed(tmp_path / "tiny", base=str(base_path()))  # the embedded base: named as --model names it
    with pytest.raises(CheckpointMismatchError, match="with base model tiny, this run asks for base model org/base-b: resume with --model tiny,"):
        resumed(tiny, base="org/base-b")


def test_other_settings_never_fall_back_and_a_broken_record_still_does(tmp_path):
    out = checkpointed(tmp_path, steps=4)
    with pytest.raises(CheckpointMismatchError, match="step-000004 was trained with rank 4"):  # the older one has them too
        resumed(out, steps=4, fallback=True, r=8)
    (out / CHECKPOINTS / "step-000004" / RUN_SETTINGS).write_text('{"adapter": {"r": 4,')  # truncated
    with pytest.raises(LoraKitError, match="step-000004 cannot be resumed from"): resumed(out, steps=4)
    with pytest.warns(UserWarning, match="Falling back to step-000002"): resumed(out, steps=4, fallback=True)


def test_a_checkpoint_from_before_run_settings_is_checked_by_its_adapter_config(tmp_path):
    out = checkpointed(tmp_path)
    (out / CHECKPOINTS / "step-000002" / RUN_SETTINGS).unlink()
    with pytest.raises(CheckpointMismatchError, match="was trained with rank 4, this run asks for rank 8: resume with --rank 4,"):
        resumed(out, r=8)
    resumed(out)


def test_cli_resume_with_another_rank_says_the_rank_differs(tmp_path, capsys, monkeypatch):
    "The issue's case: it used to blame 'a different base model' for a shape (16, 256) against (8, 256)."
    monkeypatch.chdir(tmp_path)
    quick = ["finetune", "--max-steps", "4", "--save-every", "2", "--output", "o", "--eval-examples", "2", "--batch-size", "2"]
    assert main(quick) == 0
    capsys.readouterr()
    code = main([*quick, "--rank", "8", "--resume"])
    assert code == 2
    assert message(capsys.readouterr().err) == ("Checkpoint o/checkpoints/step-000004 was trained with rank 16, this run asks for "
                                                "rank 8: resume with --rank 16, or start again with --overwrite.")
    assert main([*quick, "--rank", "16", "--resume"]) == 0  # the advice works


# Export and merge cut short: a full disk (injected) and a kill (SIGKILL, in a process of its own) midway through the write.

def cut_short(fault:str, command:str, setattr=setattr):
    "Make the writer of `command` (export: gguf's; merge: safetensors' in save_pretrained) stop part way through the file."
    def cut(full):
        if fault == "kill": os.kill(os.getpid(), signal.SIGKILL)
        raise full  # the disk filled up
    if command == "export":  # gguf writes through a Python file: an OSError
        import gguf
        def write_tensors_to_file(self, *args, **kwargs):
            self.write_ti_data_to_file()
            for f in self.fout: f.write(b"\0" * 4096); f.flush()
            cut(OSError(errno.ENOSPC, FULL))
        setattr(gguf.GGUFWriter, "write_tensors_to_file", write_tensors_to_file)
    else:
        import transformers.modeling_utils as modeling_utils
        def safe_save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as f: f.write(b"\0" * 4096); f.flush()
            cut(SafetensorError(f"Error while serializing: I/O error: {FULL} (os error 28)"))
        setattr(modeling_utils, "safe_save_file", safe_save_file)


KILLED = """import sys; sys.path.insert(0, sys.argv[1])
from test_faults import cut_short, main
cut_short("kill", sys.argv[2])
sys.exit(main(sys.argv[2:]))"""


def cut_short_run(fault, monkeypatch, capsys, *argv) -> tuple[int, str]:
    "`lora-kit ARGV` with its writer cut short: (exit code, stderr); a kill needs a process of its own."
    argv = list(map(str, argv))
    if fault == "kill":
        r = subprocess.run([sys.executable, "-c", KILLED, str(Path(__file__).parent), *argv], capture_output=True, text=True,
                           timeout=600, env=SUBPROCESS_ENV)
        return r.returncode, r.stderr
    with monkeypatch.context() as m:
        cut_short(fault, argv[0], m.setattr)
        code = main(argv)
    return code, capsys.readouterr().err


def hidden(folder:Path) -> list[str]: return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fault", ["full", "kill"])
@pytest.mark.slow
def test_an_export_cut_short_keeps_the_old_file_and_leaves_nothing_partial(fault, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf", reason="GGUF export needs the export extra: pip install 'lora_kit[export]'")
    from lora_kit.finetune import DEMO_ADAPTER
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"an older export")
    code, err = cut_short_run(fault, monkeypatch, capsys, "export", "--adapter", DEMO_ADAPTER, "--output", gguf_file, "--dtype", "f32")
    assert gguf_file.read_bytes() == b"an older export"  # the old file, untouched
    assert not gguf_file.with_suffix(".Modelfile").exists()
    if fault == "full":
        assert code == 2 and message(err) == (f"Could not write {gguf_file}: {FULL}. Nothing half-written was left; "
                                              "free some space and run again."), err[-3000:]
        assert hidden(tmp_path) == []
    else:
        assert code == -signal.SIGKILL, err[-3000:]
        assert len(hidden(tmp_path)) == 1  # the killed writer's temporary: it could not remove it
    assert main(["export", "--adapter", str(DEMO_ADAPTER), "--output", str(gguf_file), "--dtype", "f32"]) == 0
    assert gguf_file.read_bytes()[:4] == b"GGUF" and hidden(tmp_path) == []  # the next export removed it


@pytest.mark.parametrize("fault", ["full", "kill"])
@pytest.mark.slow
def test_a_merge_cut_short_leaves_no_output_and_the_next_merge_writes_it(fault, tmp_path, monkeypatch, capsys):
    from lora_kit.finetune import DEMO_ADAPTER
    merged = tmp_path / "merged"
    code, err = cut_short_run(fault, monkeypatch, capsys, "merge", "--adapter", DEMO_ADAPTER, "--output", merged)
    assert not merged.exists()  # no folder that looks like a merged model
    if fault == "full":
        assert code == 2 and message(err) == (f"Could not write {merged}: {FULL}. Nothing half-written was left; "
                                              "free some space and run again."), err[-3000:]
        assert hidden(tmp_path) == []
    else:
        assert code == -signal.SIGKILL, err[-3000:]
        assert hidden(tmp_path) == [".merged.partial"]  # removed by the next merge into that folder
    assert main(["merge", "--adapter", str(DEMO_ADAPTER), "--output", str(merged)]) == 0
    assert hidden(tmp_path) == [] and load_file(merged / "model.safetensors")
