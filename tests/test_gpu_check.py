"""`make gpu-check` without a GPU, its budget, and the offline install of its bundle (`make gpu-bundle`).

The end-to-end rehearsal on a stand-in of the GPU machine is tests/test_gpu_rehearsal.py (slow: `make gpu-rehearsal`)."""
import json, os, subprocess, sys, zipfile
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes", reason="gpu-check measures QLoRA: pip install 'lora_kit[qlora]'")
ROOT = Path(__file__).resolve().parent.parent
import gpu_bundle
import gpu_check

no_gpu = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine, run `make gpu-check` itself")


def gpu_check_run(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@no_gpu
@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    r = gpu_check_run(tmp_path, "--only", "environment,estimates,training,paths")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no GPU here" in r.stdout and "dry run" in r.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] and set(report["phases"]) == {"environment", "estimates", "training", "paths"}
    assert all(p["status"] == "done" and p["seconds"] >= 0 for p in report["phases"].values())
    env = report["phases"]["environment"]["result"]
    assert env["versions"]["torch"] and env["versions"]["bitsandbytes"] and env["python"].count(".") == 2
    assert report["phases"]["estimates"]["result"]["default_compute_dtype"] == "float32"  # no GPU: fp32
    training = report["phases"]["training"]["result"]
    assert training["base_written"]["seconds"] >= 0
    rows = {(row["setup"], row["implementation"]): row for row in training["rows"]}
    assert set(rows) == {(s, i) for s in ("NF4 QLoRA", "fp32 LoRA") for i in ("lora_kit", "peft + bitsandbytes")} \
        | {("fp32 full", "transformers")}  # the study's comparison (lesson 19): full fine-tuning beside LoRA and QLoRA
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["peak_bytes"] > 0
        assert 0.5 < row["peak_bytes"] / row["estimate_bytes"] < 2  # the closed form tracks the measured step
    paths = report["phases"]["paths"]["result"]["rows"]
    assert {(row["path"], row["dropout"]) for row in paths} == {(p, d) for p in ("fp32", "autocast bf16", "qlora bf16")
                                                              for d in (0.05, 0.0)}
    assert all(row["saved_bytes"] < 1 for row in paths)  # the lean layer keeps less than peft on every path
    table = (tmp_path / "report.md").read_text()
    assert "dry run" in table and "| cuda_lessons | not asked (--only) |" in table
    assert table.count("| NF4 QLoRA |") == 2 and table.count("| qlora bf16 |") == 2


@no_gpu
@pytest.mark.slow
def test_a_small_budget_runs_what_fits_and_says_what_it_skipped(tmp_path):
    r = gpu_check_run(tmp_path, "--budget", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    phases = json.loads((tmp_path / "report.json").read_text())["phases"]
    assert [n for n, p in phases.items() if p["status"] == "done"] == ["environment", "estimates"]
    for name in ("loftq", "training", "paths", "cuda_lessons"):
        assert phases[name]["status"] == "skipped"
        expected = gpu_check.EXPECTED_SECONDS[name][1]
        assert f"expected ~{expected} s" in phases[name]["reason"] and "of the 3 s budget left" in phases[name]["reason"]
    assert "gpu-check: training skipped: expected ~" in r.stdout
    assert "| training | skipped |" in (tmp_path / "report.md").read_text()


@no_gpu
def test_the_loftq_phase_beats_qlora_start_and_says_peft_needs_cuda(tmp_path):
    "Issue 31's GPU check, dry: the kit's LoftQ start error below QLoRA's (bitsandbytes' NF4 of W), peft's row left to CUDA."
    import bitsandbytes.functional as bnbF, torch
    from transformers import AutoModelForCausalLM
    from lora_kit.tiny import base_path
    r = gpu_check_run(tmp_path, "--only", "loftq")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "report.json").read_text())["phases"]["loftq"]["result"]
    weights = [m.weight.detach() for n, m in AutoModelForCausalLM.from_pretrained(base_path()).named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    def qlora_error(W):
        q, state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
        return float((W - bnbF.dequantize_4bit(q, state)).norm() / W.norm())
    qlora = sum(map(qlora_error, weights)) / len(weights)
    assert result["layers"] == len(weights)
    errors = {(row["scale"], row["iters"]): row["kit_error"] for row in result["rows"]}
    assert errors[1, 5] < errors[1, 1] < qlora
    assert abs(errors[2, 5] - errors[1, 5]) < 1e-3  # the kit fits s·BA: the scale does not change where it starts
    assert all(row["peft_error"] is None for row in result["rows"])
    assert (tmp_path / "report.md").read_text().count("needs CUDA") == 3


def test_the_budget_counts_the_time_already_spent():
    "A phase starts only while its expected time fits in what is left; one that fails is reported and the next runs."
    now = [0.0]
    def clock(): return now[0]
    def spend(seconds):
        def phase(ctx): now[0] += seconds; return seconds
        return phase
    def broken(ctx): now[0] += 1; raise ValueError("no such kernel")
    expected = dict(environment=(5, 5), estimates=(5, 5), training=(50, 50), paths=(20, 20), cuda_lessons=(10, 10))
    written = []
    ctx = dict(on_gpu=False, report=dict(phases={}))
    report = gpu_check.run_phases(ctx, 70, written.append, [("environment", spend(4)), ("estimates", broken),
                                                             ("training", spend(55)), ("paths", spend(1)),
                                                             ("cuda_lessons", spend(1))], expected, clock=clock)
    status = {n: p["status"] for n, p in report["phases"].items()}
    # 4 + 1 + 55 = 60 s spent: 10 left, so paths (20 expected) is skipped and cuda_lessons (10) still starts
    assert status == dict(environment="done", estimates="failed", training="done", paths="skipped", cuda_lessons="done")
    assert report["phases"]["estimates"]["error"] == "ValueError: no such kernel"
    assert report["phases"]["paths"]["reason"] == "expected ~20 s, 10 s of the 70 s budget left"
    assert len(written) == 6 and report["seconds"] == 61  # the report is written after every phase and at the end


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires=()) -> Path:
    "A minimal valid wheel of `name` holding `files`, with a RECORD that lists them."
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    members = {**files, f"{info}/METADATA": meta.encode(), f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    members[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*members, f"{info}/RECORD"]).encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items(): z.writestr(n, data)
    return path


def test_slimming_removes_the_kernels_of_other_runtimes_and_their_record_lines(tmp_path):
    kernels = {f"pkg/libbitsandbytes_{k}.so": b"\0" * 1000 for k in ("cpu", "cuda118", "cuda126", "cuda130", "rocm64", "xpu2025")}
    wheel = make_wheel(tmp_path, "pkg", "1.0", {"pkg/__init__.py": b"", **kernels})
    saved, dropped = gpu_bundle.slim_wheel(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
    kept = {n for n in kernels if n in names}
    assert kept == {f"pkg/libbitsandbytes_{k}.so" for k in ("cpu", "cuda126", "cuda130")}
    assert dropped == ["CUDA 11", "Intel XPU", "ROCm"] and saved > 0
    assert "cuda118" not in record and "rocm64" not in record and "cuda130" in record
    assert gpu_bundle.slim_wheel(wheel) == (0, [])  # nothing left to remove: the wheel is not rewritten


def test_requirements_follow_the_target_pythons_markers(tmp_path):
    wheel = make_wheel(tmp_path, "pkg", "1.0", {}, requires=["a>=1", "b; python_version < '3.11'", "c; sys_platform == 'win32'",
                                                               "d; extra == 'test'", "e; python_version >= '3.12'"])
    names = lambda v: [r.name for r in gpu_bundle.requirements(wheel, gpu_bundle.target_environment(v))]
    assert names("3.12") == ["a", "e"] and names("3.10") == ["a", "b"]


def test_the_machine_list_has_what_the_gpu_check_must_not_replace():
    machine = gpu_bundle.machine_packages()
    assert machine["torch"] == "2.11.0" and machine["transformers"] == "5.17.0" and "peft" in machine
    assert not set(gpu_bundle.NEEDED) & set(machine)  # what the bundle brings is what the machine lacks


def test_the_bundle_installs_offline_and_never_replaces_what_is_there(tmp_path):
    wheels = tmp_path / "wheels"; wheels.mkdir()
    fresh = make_wheel(wheels, "lora_kit_probe", "0.1", {"lora_kit_probe/__init__.py": b"VALUE = 42\n"})
    shadow = make_wheel(wheels, "packaging", "0.0.1", {"packaging/__init__.py": b"raise ImportError('the bundle replaced packaging')\n"})
    manifest = dict(python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
                    wheels=[dict(name="lora-kit-probe", file=fresh.name), dict(name="packaging", file=shadow.name)])
    (wheels / "manifest.json").write_text(json.dumps(manifest))
    site = tmp_path / "site"
    code = ("import json, sys; sys.path.insert(0, 'tools'); import gpu_check; from pathlib import Path; "
            f"b = gpu_check.install_bundle(Path({str(wheels)!r}), Path({str(site)!r})); "
            "import lora_kit_probe, packaging, lora_kit; print(json.dumps([b, lora_kit_probe.VALUE, lora_kit.__file__]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull})
    assert r.returncode == 0, r.stderr[-3000:]
    bundle, value, lora_kit_file = json.loads(r.stdout.strip().splitlines()[-1])
    assert bundle["installed"] == [fresh.name] and "packaging" in bundle["kept_the_machines"] and value == 42
    assert not (site / "packaging").exists() and Path(lora_kit_file).is_relative_to(ROOT)  # lora_kit from the checkout


def test_a_bundle_for_another_python_is_refused_with_the_fix(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(dict(python_version="3.12" if sys.version_info[:2] != (3, 12) else "3.11",
                                                            wheels=[])))
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--wheels", str(tmp_path), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "holds wheels for Python" in r.stderr and "--python-version" in r.stderr
    assert r.stderr.count("\n") <= 1  # one line, no traceback


@no_gpu
@pytest.mark.slow
def test_the_sharded_phase_trains_two_processes_as_one_on_the_cpu(tmp_path):
    "The dry run of issue 34's check: FSDP2 over 2 CPU processes (gloo) against one plain process."
    r = gpu_check_run(tmp_path, "--only", "sharded")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "report.json").read_text())["phases"]["sharded"]["result"]
    assert result["processes"] == 2 and result["backend"] == "gloo (CPU)" and result["max_loss_gap"] < 1e-5
    assert all(share <= 0.55 for share in result["held_share"])
    assert "FSDP2 over 2 processes (gloo (CPU), no)" in (tmp_path / "report.md").read_text()
