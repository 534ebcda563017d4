"""`make gpu-rehearsal`: `make gpu-check` rehearsed here on a stand-in of the GPU machine, offline, from the bundle.

1. The bundle for this Python (`tools/gpu_bundle.py --python-version` this one's), in a folder of its own.
2. A virtual environment standing in for the GPU machine: the packages of `tools/gpu_machine.txt` that the GPU check
   relies on (lora_kit's requirements the machine has, and those the bundle's manifest names), at the versions the
   list gives. Stand-ins, as the issue allows: this machine's Python and the CPU build of torch (`STAND_INS`) for
   Python 3.12 and the CUDA build (gigabytes to download); numpy 2.5 needs Python 3.12, so the newest numpy for this
   Python stands in. The environment is checked to hold none of what the bundle brings (no bitsandbytes, datasets,
   fastcore, execnb or their dependencies).
3. `make gpu-check` in it with pip cut off from every index (`PIP_NO_INDEX=1`, no pip configuration, so no local
   wheel folders either) and only the bundle: the CPU dry run must pass end to end, every phase done.

It prints each step's time and the report's per-phase times (the README's "On a GPU" quotes them), and exits 1 when
anything fails. `--keep DIR` keeps the bundle, environment and report there.
"""
from __future__ import annotations

import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from gpu_bundle import MACHINE_LIST, machine_packages, normalize  # noqa: E402

# The GPU machine's packages that lora_kit and the GPU check import directly (the rest come as their dependencies).
DIRECT = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "matplotlib", "tqdm",
          "pytest", "hypothesis")
# what stands in here for the machine's version, and why
STAND_INS = {"torch": ("torch==2.13.0", "the CPU build on this machine's disk stands in for 2.11.0+cu130"),
             "numpy": ("numpy", "numpy 2.5 needs Python 3.12: the newest for this Python stands in")}


def step(what: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    "Run `cmd`, print its time; exit with its output if it fails."
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw, timeout=1200)
    print(f"gpu-rehearsal: {what}: {'ok' if r.returncode == 0 else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
    if r.returncode: sys.exit(f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def stand_in_requirements(manifest: dict) -> list[str]:
    "The pip requirements of the stand-in: the machine's packages the check relies on, at the machine's versions."
    machine = machine_packages(MACHINE_LIST)
    names = sorted(set(DIRECT) | set(manifest["relies_on_the_machines"]))
    missing = [n for n in names if normalize(n) not in machine]
    if missing: sys.exit(f"gpu-rehearsal: {', '.join(missing)} not in {MACHINE_LIST.name}: the GPU machine lacks them")
    return [STAND_INS[n][0] if n in STAND_INS else f"{n}=={machine[n]}" if machine[n] else n for n in names]


def installed(python: Path) -> set[str]:
    "The normalized names of the packages in the environment of `python`."
    r = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                       capture_output=True, text=True, check=True, timeout=1200)
    return {normalize(p["name"]) for p in json.loads(r.stdout)}


def offline_env(venv: Path) -> dict[str, str]:
    "The stand-in's environment with pip reaching no index and no configured wheel folder."
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), PIP_NO_INDEX="1",
               PIP_CONFIG_FILE=os.devnull, OMP_NUM_THREADS="1")
    return env


def rehearse(work: Path) -> dict:
    "The three steps in `work`; the report of `make gpu-check`."
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels, venv, out = work / "gpu-wheels", work / "machine", work / "report"
    step(f"bundle for Python {here}", [sys.executable, str(ROOT / "tools" / "gpu_bundle.py"), "--python-version", here,
                                       "--dest", str(wheels)])
    manifest = json.loads((wheels / "manifest.json").read_text())
    step("stand-in environment", [sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    reqs = stand_in_requirements(manifest)
    step(f"stand-in packages ({len(reqs)} named, with their dependencies)",
         [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs])
    there = installed(python)
    if bundled := sorted(there & {w["name"] for w in manifest["wheels"]}):
        sys.exit(f"gpu-rehearsal: the stand-in already holds what the bundle brings: {', '.join(bundled)}")
    if newer := sorted(there - set(machine_packages(MACHINE_LIST))):  # newest releases of unpinned machine packages
        print(f"gpu-rehearsal: the stand-in also has {', '.join(newer)} (dependencies of newer releases of the machine's "
              f"packages whose versions the list does not give)")
    for name, (_, why) in STAND_INS.items(): print(f"gpu-rehearsal: stand-in {name}: {why}")
    step("make gpu-check, offline, from the bundle",
         ["make", "-s", "gpu-check", f"PYTHON={python}", f"GPU_WHEELS={wheels}", f"GPU_ARGS=--out {out}"],
         cwd=ROOT, env=offline_env(venv))
    report = json.loads((out / "report.json").read_text())
    for name, p in report["phases"].items(): print(f"gpu-rehearsal: phase {name}: {p['status']} in {p.get('seconds', 0)} s")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=Path, help="do the work in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    if args.keep:
        if args.keep.exists(): shutil.rmtree(args.keep)
        args.keep.mkdir(parents=True)
        report = rehearse(args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-rehearsal-") as tmp: report = rehearse(Path(tmp))
    bad = [n for n, p in report["phases"].items() if p["status"] != "done"]
    if bad: print(f"gpu-rehearsal: FAILED: {', '.join(bad)} not done", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
