"""`make gpu-bundle`: the wheels `make gpu-check` needs on a GPU machine that reaches no package index.

The machine (tools/gpu_machine.txt) has torch, transformers, peft, accelerate and most of what they need, but not
bitsandbytes, datasets, fastcore or execnb (the lessons' `#| cuda` cells run through execnb, as `nbdev-test` runs
them). This downloads, for that machine's Python (3.12, manylinux x86_64), exactly the wheels of those packages and
of their dependencies that the machine lacks, walking each wheel's `Requires-Dist` and stopping at what the machine
has. Versions are the ones installed here (tested here), else the newest. Nothing the machine has is bundled, torch
above all. lora_kit itself is not bundled: the checkout travels with every run, and the GPU check imports it from
there (its wheel, ~12 MB of tiny-base weights, would not fit beside the tree in one 64 MiB transfer).

bitsandbytes' wheel carries kernels for every GPU runtime (43 MB); the bundle keeps its CPU, CUDA 12 and CUDA 13
kernels and drops those for ROCm, Intel XPU and CUDA 11 (its RECORD rewritten to match). The bundle fails when it
would exceed 60 MiB, or the bundle and the working tree together the 64 MiB a run may carry, and prints both sizes.
`manifest.json` in the bundle lists each wheel, why it is there, its size and sha256.
"""
from __future__ import annotations

import argparse, base64, hashlib, json, re, shutil, subprocess, sys, tempfile, zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
MACHINE_LIST = ROOT / "tools" / "gpu_machine.txt"
NEEDED = ("bitsandbytes", "datasets", "fastcore", "execnb")  # what the GPU check imports that the machine lacks
MiB = 2**20
BUNDLE_LIMIT, TRANSFER_LIMIT = 60 * MiB, 64 * MiB
# kernels of runtimes the lent machines do not have: (pattern in the wheel, why it goes)
DROPPED_KERNELS = ((r"libbitsandbytes_rocm\d+\.so$", "ROCm"), (r"libbitsandbytes_xpu\d+\.so$", "Intel XPU"),
                   (r"libbitsandbytes_cuda11\d\.so$", "CUDA 11"))


def normalize(name: str) -> str: return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(path: Path = MACHINE_LIST) -> dict[str, str | None]:
    "The GPU machine's packages: {normalized name: version or None where unknown}."
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line: continue
        name, _, version = line.partition("==")
        found[normalize(name)] = version or None
    return found


def target_environment(python_version: str) -> dict[str, str]:
    "The marker environment of the target: CPython `python_version` on Linux x86_64."
    env = default_environment()
    env.update(python_version=python_version, python_full_version=python_version + ".0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix", implementation_name="cpython",
               platform_python_implementation="CPython")
    return env


def platform_args(python_version: str) -> list[str]:
    "pip's arguments for binary wheels of CPython `python_version` on manylinux x86_64 (pip matches each tag exactly)."
    tags = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
            "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    return ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            *[a for t in tags for a in ("--platform", t)]]


def local_version(name: str) -> str | None:
    "The version installed here (the one the test suite ran with), or None."
    try: return metadata.version(name)
    except metadata.PackageNotFoundError: return None


def download(name: str, dest: Path, python_version: str) -> Path:
    "The wheel of `name` (the version installed here, else the newest) for the target, downloaded into `dest`."
    version = local_version(name)
    spec = f"{name}=={version}" if version else name
    before = set(dest.glob("*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        *platform_args(python_version), "-d", str(dest), spec], capture_output=True, text=True, timeout=1200)
    if r.returncode: sys.exit(f"gpu-bundle: no wheel of {spec} for Python {python_version} manylinux x86_64:\n{r.stderr[-2000:]}")
    new = [w for w in set(dest.glob("*.whl")) - before if normalize(w.name.split("-")[0]) == normalize(name)]
    if not new:  # already downloaded by an earlier run into the same folder
        new = [w for w in dest.glob("*.whl") if normalize(w.name.split("-")[0]) == normalize(name)]
    return new[0]


def requirements(wheel: Path, env: dict[str, str], extras: set[str] = frozenset()) -> list[Requirement]:
    "The `Requires-Dist` of `wheel` that apply on the target with `extras` asked for."
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [Requirement(l.split(":", 1)[1].strip()) for l in meta.splitlines() if l.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))]


def missing_closure(dest: Path, python_version: str, machine: dict[str, str | None]) -> tuple[dict[str, tuple[Path, str]], set[str]]:
    """Download `NEEDED` and every dependency the machine lacks: ({name: (wheel, who needs it)}, the names of the
    machine's packages the bundle relies on)."""
    env = target_environment(python_version)
    wanted, found, relied_on = [(n, "the GPU check") for n in NEEDED], {}, set()
    while wanted:
        name, why = wanted.pop(0)
        name = normalize(name)
        if name in machine: relied_on.add(name)
        if name in found or name in machine: continue
        wheel = download(name, dest, python_version)
        found[name] = (wheel, why)
        print(f"  {wheel.name:70} ({why})", flush=True)
        wanted += [(r.name, f"needed by {name}") for r in requirements(wheel, env, set())]
    return found, relied_on


def slim_wheel(wheel: Path) -> tuple[int, list[str]]:
    "Remove the kernels `DROPPED_KERNELS` names from `wheel` in place (RECORD kept in step); (bytes saved, what went)."
    with zipfile.ZipFile(wheel) as z: members = {i.filename: (i, z.read(i)) for i in z.infolist()}
    gone = {n: why for n in members for pattern, why in DROPPED_KERNELS if re.search(pattern, n)}
    if not gone: return 0, []
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, (info, data) in members.items():
            if name in gone: continue
            if name.endswith(".dist-info/RECORD"):
                data = "".join(l for l in data.decode().splitlines(keepends=True) if l.split(",")[0] not in gone).encode()
            z.writestr(info, data)
    tmp.replace(wheel)
    return before - wheel.stat().st_size, sorted(set(gone.values()))


def sha256(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_bytes() -> int:
    "Bytes of the working tree that travels with a run: tracked files and untracked files git does not ignore."
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return sum((ROOT / f).stat().st_size for f in r.stdout.split("\0") if f and (ROOT / f).is_file())


def build(dest: Path, python_version: str, machine_list: Path = MACHINE_LIST) -> dict:
    "Make the bundle in `dest` (replaced whole, only once complete); its manifest."
    machine = machine_packages(machine_list)
    dest = dest.resolve()
    work = Path(tempfile.mkdtemp(prefix=".gpu-wheels-", dir=dest.parent if dest.parent.exists() else None))
    try:
        print(f"gpu-bundle: wheels for Python {python_version} manylinux x86_64 that the GPU machine lacks", flush=True)
        found, relied_on = missing_closure(work, python_version, machine)
        for stray in set(work.glob("*.whl")) - {w for w, _ in found.values()}: stray.unlink()
        wheels = []
        for name, (wheel, why) in sorted(found.items()):
            saved, dropped = slim_wheel(wheel)
            note = f"kernels for {', '.join(dropped)} removed ({saved / MiB:.1f} MiB)" if dropped else ""
            wheels.append(dict(name=name, file=wheel.name, why=why, bytes=wheel.stat().st_size, sha256=sha256(wheel),
                               **({"note": note} if note else {})))
        total, tree = sum(w["bytes"] for w in wheels), tree_bytes()
        manifest = dict(python_version=python_version, platform="manylinux x86_64", bytes=total, tree_bytes=tree,
                        machine_list=str(machine_list.relative_to(ROOT)) if machine_list.is_relative_to(ROOT) else str(machine_list),
                        wheels=wheels, relies_on_the_machines=sorted(relied_on))
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"gpu-bundle: {len(wheels)} wheels, {total / MiB:.1f} MiB (limit {BUNDLE_LIMIT // MiB} MiB); with the "
              f"working tree ({tree / MiB:.1f} MiB) a run carries {(total + tree) / MiB:.1f} MiB (limit {TRANSFER_LIMIT // MiB} MiB)")
        if total > BUNDLE_LIMIT:
            sys.exit(f"gpu-bundle: {total / MiB:.1f} MiB is over the {BUNDLE_LIMIT // MiB} MiB limit: drop a package "
                     f"from NEEDED or add the machine's own to {MACHINE_LIST.name}")
        if total + tree > TRANSFER_LIMIT:
            sys.exit(f"gpu-bundle: the bundle and the working tree are {(total + tree) / MiB:.1f} MiB, over the "
                     f"{TRANSFER_LIMIT // MiB} MiB one run may carry: make the tree or the bundle smaller")
        if dest.exists(): shutil.rmtree(dest)
        work.replace(dest)
        return manifest
    finally:
        if work.exists(): shutil.rmtree(work)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=ROOT / "build" / "gpu-wheels", help="the bundle's folder (replaced)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (the rehearsal: this one's)")
    p.add_argument("--machine", type=Path, default=MACHINE_LIST, help="the GPU machine's package list")
    args = p.parse_args(argv)
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    m = build(args.dest, args.python_version, args.machine.resolve())
    print(f"gpu-bundle: {args.dest} ({m['bytes'] / MiB:.1f} MiB). On a lent machine carry build/gpu-wheels and run "
          f"`make gpu-check`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
