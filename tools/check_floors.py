"""Run the library's tests against the lowest versions `pyproject.toml` admits of the Hugging Face stack.

`pyproject.toml`'s `dependencies` declare floors (`transformers>=X`, ...) that a user may really have (Colab ships its
own, older transformers). This tool makes them tested floors: it builds a virtual environment on top of this Python
(`--system-site-packages`: torch and the test tools come from the system), `pip install`s exactly the floor of each
package in `FLOORED` into it (so they shadow the system's newer ones; the rest of `dependencies` as declared, so pip
resolves against all of them), checks inside it that those are the versions imported and that `lora_kit` is this
checkout's, and runs the library's tests there with `python -m pytest`. It prints what it installed and pytest's
summary, and exits with pytest's code (1, with the reason, when the environment cannot be built).

The environment is cached under `.floors/` in the checkout (or `--venv-root`, or `$LORA_KIT_FLOORS_DIR`), one folder
per set of pins, so a second run only runs the tests.

    python tools/check_floors.py                               # the declared floors, the library's tests
    python tools/check_floors.py --pin transformers==5.3.0     # another version of one package (to bisect)
    python tools/check_floors.py -- tests/test_data.py -x      # these pytest arguments instead of the library's tests
    python tools/check_floors.py --print-floors                # only read and print the floors
"""
import argparse, json, os, re, shutil, site, subprocess, sys, time, tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
FLOORED = ("transformers", "peft", "accelerate", "datasets")  # installed at exactly their declared floor
# Optional dependencies that newer releases of a floored package made required, so this Python has them at versions the
# floor never knew, and the floor imports them anyway and breaks (transformers 5.4 with kernels 0.19: "Either a revision
# or a version must be specified"). The floor's own extra installs them at the range that floor declares.
EXTRAS = {"transformers": "kernels"}
REPORTED = ("kernels", "torch", "tokenizers", "huggingface_hub", "safetensors", "numpy", "pyarrow", "bitsandbytes")  # printed only
LIBRARY_TESTS = (  # everything that exercises the library; not the app, the browser, the lessons or the packaging
    "tests/test_interop.py", "tests/test_adapter_errors.py", "tests/test_adapter_interface.py", "tests/test_efficient.py",
    "tests/test_data.py", "tests/test_tiny.py", "tests/test_train.py", "tests/test_jobs.py", "tests/test_bad_input.py",
    "tests/test_cli.py", "tests/test_reliability.py", "tests/test_accounting.py", "tests/test_qlora.py",
    "tests/test_bench.py", "tests/test_variants.py", "tests/test_export.py", "tests/test_output_folder.py",
    "tests/test_cli_fuzz.py",
)
STAMP = "floors-ok.json"  # written into the environment once it is built and checked


class FloorError(Exception):
    "The floors cannot be read, installed or verified; the message says which and why."


def dependencies(pyproject:str|Path=PYPROJECT) -> list[str]:
    "`[project] dependencies` of `pyproject`, as written."
    return tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]["dependencies"]


def read_floors(pyproject:str|Path=PYPROJECT, names=FLOORED) -> dict[str, str]:
    "{name: floor} of `names` from `[project] dependencies`: each must be declared with exactly one `>=` bound."
    found = {canonicalize_name(Requirement(d).name): Requirement(d) for d in dependencies(pyproject)}
    floors = {}
    for name in names:
        req = found.get(canonicalize_name(name))
        if req is None: raise FloorError(f"{pyproject}: {name} is not in [project] dependencies")
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if len(lows) != 1: raise FloorError(f"{pyproject}: {req} needs exactly one '>=' bound to have a floor")
        floors[name] = lows[0]
    return floors


def other_requirements(pyproject:str|Path=PYPROJECT, names=FLOORED) -> list[str]:
    "The rest of `[project] dependencies`, as declared."
    pinned = {canonicalize_name(n) for n in names}
    return [d for d in dependencies(pyproject) if canonicalize_name(Requirement(d).name) not in pinned]


def parse_pins(pins:list[str]) -> dict[str, str]:
    "`--pin name==version` overrides, as {name: version}."
    out = {}
    for pin in pins:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([0-9][^\s=,;]*)\s*", pin)
        if not m: raise FloorError(f"--pin {pin!r}: write it as name==version, e.g. transformers==4.56.0")
        out[m.group(1)] = m.group(2)
    return out


def requirement(name:str, version:str) -> str:
    "What pip is asked for: `name` at exactly `version`, with its extra from `EXTRAS` if it has one."
    return f"{name}[{EXTRAS[name]}]=={version}" if name in EXTRAS else f"{name}=={version}"


def venv_name(pins:dict[str, str]) -> str:
    "A folder name that changes with any pin and with the Python version."
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return "-".join([py, *(f"{canonicalize_name(n)}{v}" for n, v in sorted(pins.items()))])


def venv_python(venv:Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


PROBE = """import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        m = importlib.import_module(name)
        out[name] = dict(version=getattr(m, "__version__", "?"), file=getattr(m, "__file__", None))
    except Exception as e: out[name] = dict(error=f"{type(e).__name__}: {e}")
print(json.dumps(out))"""


def probe(python:Path, names, env=None) -> dict:
    "{module: {version, file} or {error}} as `python` imports each of `names`."
    r = subprocess.run([str(python), "-c", PROBE, *names], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode: raise FloorError(f"{python} cannot run the import check:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_pins(found:dict, pins:dict[str, str], venv:Path):
    "Raise `FloorError` unless each pinned package imports at its pinned version."
    bad = []
    for name, want in pins.items():
        got = found.get(name, {})
        if "error" in got: bad.append(f"{name}: {got['error']}")
        elif Version(got["version"]) != Version(want): bad.append(f"{name}: wanted {want}, imported {got['version']} from {got['file']}")
    if bad: raise FloorError(f"{venv} does not import the pinned versions:\n  " + "\n  ".join(bad))


def outer_site_packages() -> list[str]:
    "Site folders of the virtual environment this runs in, if any (`--system-site-packages` only adds the base Python's)."
    if sys.prefix == sys.base_prefix: return []
    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def build(venv:Path, pins:dict[str, str], extra:list[str]) -> dict:
    "Create `venv` on top of this Python, pip install the pins and `extra`, check, stamp; the versions it imports."
    try: return _build(venv, pins, extra)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)  # nothing half-built is left to be taken for a cached one
        raise


def _build(venv:Path, pins:dict[str, str], extra:list[str]) -> dict:
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv_python(venv)
    if outer := outer_site_packages():  # run from inside a venv: see its packages too, after the new venv's own
        own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        (Path(own) / "_outer_env.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
    wanted = [*(requirement(n, v) for n, v in pins.items()), *extra]
    print("pip install", *wanted, flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *wanted],
                       capture_output=True, text=True)
    if r.returncode:
        raise FloorError(f"pip could not install {' '.join(wanted)} (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    print(f"  installed in {time.perf_counter() - t0:.0f} s", flush=True)
    found = probe(python, [*pins, *REPORTED])
    check_pins(found, pins, venv)
    (venv / STAMP).write_text(json.dumps(dict(pins=pins, extra=extra), indent=1))
    return found


def ensure(venv:Path, pins:dict[str, str], extra:list[str], rebuild:bool=False) -> tuple[dict, bool]:
    "The checked environment for `pins`: the cached one if its stamp matches, else a new one. (versions, built)"
    stamp = venv / STAMP
    if not rebuild and stamp.is_file() and venv_python(venv).exists():
        if json.loads(stamp.read_text()) == dict(pins=pins, extra=extra):
            found = probe(venv_python(venv), [*pins, *REPORTED])
            try:
                check_pins(found, pins, venv)  # still so: nothing was installed into it since
                return found, False
            except FloorError as e: print(f"rebuilding: {e}", flush=True)
    return build(venv, pins, extra), True


def test_env(venv:Path) -> dict:
    "The tests' environment: the venv first on PATH, this checkout's lora_kit first on the path, one thread, offline."
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
    env.update(VIRTUAL_ENV=str(venv), PATH=os.pathsep.join([str(venv_python(venv).parent), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return env


def describe(found:dict, floors:dict, pins:dict, venv:Path) -> list[str]:
    "One line per package: version, its floor and where it comes from."
    lines = []
    for name, info in found.items():
        if "error" in info: lines.append(f"  {name:16} not importable ({info['error'][:80]})"); continue
        origin = "venv" if info["file"] and str(venv) in info["file"] else "system"
        note = "" if name not in pins else f"  pinned (floor {floors[name]}{', overridden' if pins[name] != floors[name] else ''})"
        lines.append(f"  {name:16} {info['version']:14} {origin}{note}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION",
                   help="install this version instead of the declared floor (repeatable)")
    p.add_argument("--venv-root", default=os.environ.get("LORA_KIT_FLOORS_DIR", str(ROOT / ".floors")),
                   help="where the environments are cached (default: .floors/ in the checkout)")
    p.add_argument("--rebuild", action="store_true", help="build the environment again even if cached")
    p.add_argument("--print-floors", action="store_true", help="print the declared floors and exit")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest arguments instead of the library's tests")
    args = p.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    try:
        floors = read_floors()
        if args.print_floors:
            print(" ".join(f"{n}=={v}" for n, v in floors.items()))
            return 0
        pins = {**floors, **parse_pins(args.pin)}
        venv = Path(args.venv_root).resolve() / venv_name(pins)
        t0 = time.perf_counter()
        found, built = ensure(venv, pins, other_requirements(), args.rebuild)
        env = test_env(venv)
        kit = probe(venv_python(venv), ["lora_kit"], env)["lora_kit"]
        if "error" in kit or not Path(kit["file"]).is_relative_to(ROOT):
            raise FloorError(f"the tests would not import this checkout's lora_kit: {kit}")
    except (FloorError, subprocess.CalledProcessError) as e:
        print(f"check_floors: {e}", file=sys.stderr)
        return 1
    print(f"{venv} ({'built' if built else 'cached'}, ready in {time.perf_counter() - t0:.0f} s):", *describe(found, floors, pins, venv), sep="\n")
    cmd = [str(venv_python(venv)), "-m", "pytest", "-p", "no:cacheprovider", *(pytest_args or LIBRARY_TESTS)]
    print("python -m pytest", *cmd[3:], flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
