"""Run each lesson alone from the installed package, or store the lessons' outputs in the notebooks.

Check mode (the default; `make test` runs it):

1. builds the wheel (`python -m build --wheel`, or takes `--wheel FILE`);
2. installs it, without dependencies, into a fresh virtual environment that sees the dependencies of the running
   Python through a `.pth` file listing its site-packages folders. That file only adds folders: the `.pth` files
   inside them are not run, so the meta-path finder of an editable install of lora_kit (which would quietly serve
   any module missing from the wheel out of the checkout) is not installed there. `import lora_kit` is checked to
   resolve to the wheel before anything runs, and every `lora_kit` module a lesson loaded is checked after it ran;
3. records a hash of every file of the installed package;
4. copies each numbered lesson `nbs/NN_*.ipynb` alone into an empty folder and executes it there with that
   environment's Python through execnb (the machinery of `nbdev-test`), with `IN_TEST=1` (small sizes), skipping
   only cells marked `#| slow` or `#| eval: false` (`#| cuda` cells run: on a CPU they skip themselves);
   (`--repeat N`: N times each, every run in its own folder, so a check that passes by luck shows up);
5. smoke-tests the installed `lora-kit` command (`estimate --json`, a 2-step `finetune`);
6. checks that the installed package's files are byte-identical to before.

It prints one line per lesson (ok or FAILED with the error, and its time) and exits 1 on any failure. Lessons run
two at a time (`--jobs`), one thread each (`OMP_NUM_THREADS=1`).

Save mode, `--save [NB ...]` (`make outputs`): executes the lessons in place in `nbs/` from the checkout (the
editable install; every lora_kit module loaded is checked to come from it) at learner sizes (`IN_TEST` unset),
skipping `#| slow` and `#| eval: false` cells, with progress bars off, and writes the outputs into the notebooks
without widget state or execution counts, cleaned as `nbdev-clean` would; a notebook edited while it ran is not overwritten. One lesson at a
time with every thread, as a learner runs it, so the times the outputs show are a learner's (`--jobs 2`: two at a
time, one thread each). It prints each lesson's wall time.
"""
from __future__ import annotations

import argparse, hashlib, json, os, re, shutil, signal, subprocess, sys, tempfile, time, traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from lessons import lessons  # tools/lessons.py: the one list of lessons

ROOT = Path(__file__).resolve().parent.parent
TOOLS, NBS = ROOT / "tools", ROOT / "nbs"
PACKAGE = "lora_kit"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
LESSON_TIMEOUT = 1800   # seconds for one lesson in check mode, all cells together
CELL_TIMEOUT = 600      # seconds for one cell (pyproject's cell_timeout for nbdev-test)
# What a stored lesson shows is results: progress bars (tqdm's, the Hugging Face libraries' loading and map bars) are
# live feedback for a learner running it, not evidence, so the runs that store outputs turn them off.
STORED_OUTPUT_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
_directive = re.compile(r"^\s*#\s*\|\s*([^\s:]+)\s*:?\s?(.*?)\s*$")
_magic = re.compile(r"^\s*%%\w+")
DIGEST_KEY = "stored_source"  # cell metadata: the digest of the source its stored outputs came from
_clear_codes = re.compile(r"(\x1b\[2K|\r)*")


# ---------------------------------------------------------------- cells

def source(cell) -> str:
    "A cell's source as one string (notebook JSON stores a list of lines, execnb a string)."
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


def directives(cell) -> dict[str, str]:
    "The `#|` directives at the top of a cell, as nbdev reads them: `{name: value}`, '' for a bare one."
    found = {}
    for line in source(cell).splitlines():
        if not line.strip() or _magic.match(line): continue
        m = _directive.match(line)
        if not m: break
        found[m.group(1)] = "" if m.group(2) == "true" else m.group(2)
    return found


def skipped(cell) -> bool:
    "Cells these runs leave out: markdown/raw cells, and code cells marked `#| slow` or `#| eval: false`."
    if cell["cell_type"] != "code": return True
    d = directives(cell)
    return "slow" in d or d.get("eval", "").lower() == "false"


def strip_widget_state(nb: dict) -> dict:
    """`nb` without what only a live kernel can show: outputs that carry a widget view (their state is not saved,
    so GitHub and Colab would show an error in their place), `metadata.widgets`, streams that hold nothing but the
    terminal line-clearing codes `clear_output` prints outside a kernel, execution counts, and execnb's timing
    metadata."""
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] != "code": continue
        cell["execution_count"] = None
        cell["outputs"] = [o for o in cell.get("outputs", []) if WIDGET_MIME not in o.get("data", {})
                           and not (o.get("output_type") == "stream" and _clear_codes.fullmatch(source({"source": o.get("text", "")})))]
        for o in cell["outputs"]:
            if "execution_count" in o: o["execution_count"] = None
    return nb


def digest(cell) -> str:
    "The digest of a cell's source that `record_sources` stores and tools/check_outputs.py compares."
    return hashlib.sha256(source(cell).encode()).hexdigest()[:16]


def record_sources(nb: dict) -> dict:
    """`nb` with the digest of each code cell's source in its metadata (`stored_source`) where it has outputs, so
    tools/check_outputs.py can tell a cell whose source changed after its outputs were stored."""
    for cell in nb["cells"]:
        if cell["cell_type"] != "code": continue
        cell.setdefault("metadata", {}).pop(DIGEST_KEY, None)
        if cell.get("outputs"): cell["metadata"][DIGEST_KEY] = digest(cell)
    return nb


# ---------------------------------------------------------------- worker: one notebook in this process

def run_notebook(path: Path, save: bool = False, expect_pkg: Path | None = None, cell_timeout: int = CELL_TIMEOUT) -> int:
    """Execute the notebook at `path` with execnb as `nbdev-test` does, skipping the cells `skipped` names.

    `expect_pkg`: fail unless every lora_kit module loaded lies in that folder. `save`: write the outputs back
    (widget state stripped, then cleaned by nbdev), unless the file changed while it ran."""
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != TOOLS]  # the lesson sees no tools/
    from execnb.shell import CaptureShell
    try: from execnb.nbio import read_nb, write_nb     # older execnb; newer releases moved it into fastcore
    except ImportError: from fastcore.nbio import read_nb, write_nb
    original = path.read_bytes()
    nb = read_nb(path)
    shell = CaptureShell(path)  # puts the notebook's folder on sys.path, as nbdev-test and Jupyter do
    times = []
    def timed(cell): times.append((cell.metadata.get("execution", {}).get("total", 0.0), cell.idx_))
    try:
        shell.run_all(nb, exc_stop=True, preproc=skipped, postproc=timed, cell_timeout=cell_timeout)
    except BaseException:
        tb = shell.prettytb(fname=path) or traceback.format_exc()
        print(f"ERROR in cell #{shell._cell_idx} (counting from 1, markdown cells included)\n{tb}", file=sys.stderr)
        return 1
    slow = ", ".join(f"cell #{i + 1} {t:.1f}s" for t, i in sorted(times, reverse=True)[:3])
    print(f"SLOWEST {slow}")
    if expect_pkg is not None:
        expect_pkg = expect_pkg.resolve()
        strays = sorted(f"{name}: {m.__file__}" for name, m in list(sys.modules.items())
                        if (name == PACKAGE or name.startswith(PACKAGE + ".")) and getattr(m, "__file__", None)
                        and not Path(m.__file__).resolve().is_relative_to(expect_pkg))
        if strays:
            print(f"ERROR: lora_kit modules loaded from outside the installed wheel ({expect_pkg}):", *strays,
                  sep="\n  ", file=sys.stderr)
            return 1
    if save:
        if path.read_bytes() != original:
            print(f"ERROR: {path} changed while it ran; outputs not written", file=sys.stderr)
            return 1
        from fastcore.nbio import nb2dict
        write_nb(record_sources(strip_widget_state(nb2dict(nb))), path)
        from nbdev.clean import nbdev_clean
        nbdev_clean(fname=str(path))  # exactly what tools/check_sync.py will compare against
    return 0


# ---------------------------------------------------------------- the wheel and its environment

def run(cmd, timeout: float, **kw) -> subprocess.CompletedProcess:
    "`subprocess.run` in a new process group, all of which is killed on timeout (a lesson may start processes)."
    with subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) as p:
        try: out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def build_wheel(outdir: Path) -> Path:
    "Build the wheel of the checkout into `outdir`."
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(ROOT)],
                       capture_output=True, text=True)
    if r.returncode: sys.exit(f"building the wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return next(outdir.glob(f"{PACKAGE}-*.whl"))


def dependency_paths() -> list[str]:
    "The site-packages folders of the running Python: where the wheel's dependencies are installed."
    return [p for p in dict.fromkeys(sys.path) if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make_venv(venv: Path, wheel: Path) -> Path:
    """A fresh virtual environment at `venv` with `wheel` installed (no dependencies) and the running Python's
    site-packages on its path after its own; returns the installed package folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv_python(venv)
    # pip of the running Python installs into the venv's interpreter, which at this point sees nothing else (no
    # PYTHONPATH either: a lora_kit*.egg-info found there would count as installed and the wheel would be skipped)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        "--ignore-installed", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, env=venv_env(venv))
    if r.returncode: sys.exit(f"installing {wheel.name} failed:\n{r.stdout}\n{r.stderr}")
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_lora_kit_dependencies.pth").write_text("".join(p + "\n" for p in dependency_paths()))
    return site / PACKAGE


def venv_env(venv: Path, **extra) -> dict[str, str]:
    "The environment for the venv's Python: its bin first on PATH, nothing that would point imports elsewhere."
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "IN_TEST")}
    env.update(PATH=f"{venv_python(venv).parent}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", **extra)
    return env


def check_resolves(venv: Path, pkg: Path, cwd: Path) -> str:
    "Exit unless `import lora_kit` in the venv gives the installed wheel and no editable-install finder is active."
    code = ("import json, sys, lora_kit; print(json.dumps([lora_kit.__file__, "
            "[getattr(f, '__module__', '') + '.' + getattr(f, '__name__', repr(f)) for f in sys.meta_path]]))")
    r = subprocess.run([str(venv_python(venv)), "-c", code], cwd=cwd, env=venv_env(venv), capture_output=True, text=True)
    if r.returncode: sys.exit(f"import lora_kit fails in the venv:\n{r.stderr}")
    file, finders = json.loads(r.stdout)
    if not Path(file).resolve().is_relative_to(pkg.resolve()): sys.exit(f"import lora_kit gives {file}, not the wheel in {pkg}")
    if editable := [f for f in finders if "editable" in f.lower()]: sys.exit(f"an editable-install finder is active: {editable}")
    return file


def package_hashes(pkg: Path) -> dict[str, str]:
    "sha256 of every file of the installed package (bytecode caches aside)."
    return {str(f.relative_to(pkg)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(pkg.rglob("*")) if f.is_file() and "__pycache__" not in f.parts}


# ---------------------------------------------------------------- jobs

def run_lesson(nb: Path, venv: Path, pkg: Path, work: Path, timeout: int, run_name: str = "") -> tuple[bool, str]:
    "Copy lesson `nb` alone into an empty folder and run it there with the venv's Python; (ok, log)."
    folder, home = work / "lessons" / (run_name or nb.stem), work / "hf" / (run_name or nb.stem)
    folder.mkdir(parents=True)
    shutil.copy(nb, folder / nb.name)
    env = venv_env(venv, IN_TEST="1", HF_HOME=str(home))  # a learner's fresh cache, not one another lesson filled
    cmd = [str(venv_python(venv)), str(TOOLS / "run_lessons.py"), "--worker", str(folder / nb.name), "--expect-pkg", str(pkg)]
    try: r = run(cmd, timeout, cwd=folder, env=env)
    except subprocess.TimeoutExpired as e: return False, f"ERROR: timed out after {timeout}s\n{(e.stderr or '')[-3000:]}"
    return r.returncode == 0, r.stdout + r.stderr


def smoke_cli(venv: Path, work: Path) -> tuple[bool, str]:
    "The installed `lora-kit` command: `estimate --json` parses; a 2-step `finetune` writes an adapter."
    folder = work / "cli"
    folder.mkdir()
    env, exe = venv_env(venv, HF_HOME=str(work / "hf" / "cli")), str(venv_python(venv).parent / "lora-kit")
    r = run([exe, "estimate", "--model", "llama-2-7b", "--method", "qlora", "--json"], 600, cwd=folder, env=env)
    if r.returncode: return False, f"lora-kit estimate exited {r.returncode}\n{r.stderr}"
    try: est = json.loads(r.stdout)
    except json.JSONDecodeError as e: return False, f"lora-kit estimate --json printed no JSON ({e}):\n{r.stdout[:2000]}"
    if not isinstance(est, dict) or "memory_bytes" not in est: return False, f"unexpected estimate: {r.stdout[:2000]}"
    out = folder / "out"
    r = run([exe, "finetune", "--max-steps", "2", "--eval-examples", "4", "--output", str(out)], 1200, cwd=folder, env=env)
    if r.returncode: return False, f"lora-kit finetune exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    if not (out / "adapter_model.safetensors").is_file(): return False, f"no adapter_model.safetensors in {out}: {sorted(os.listdir(out))}"
    return True, "estimate --json parses; finetune --max-steps 2 wrote adapter_model.safetensors"


def error_summary(log: str, lines: int = 25) -> str:
    "The part of a failed lesson's log that says what went wrong."
    i = log.find("ERROR")
    text = log[i:] if i >= 0 else log
    kept = text.strip().splitlines()
    if len(kept) > lines: kept = kept[:6] + ["..."] + kept[-(lines - 7):]
    return "\n".join("    " + l for l in kept)


def select(names: list[str]) -> list[Path]:
    "Lessons named on the command line (paths or file names in nbs/), or all of them."
    if not names: return lessons()
    found = []
    for n in names:
        p = Path(n) if Path(n).exists() else NBS / Path(n).name
        if not p.exists() and not n.endswith(".ipynb"): p = NBS / f"{n}.ipynb"
        if not p.exists(): sys.exit(f"no such notebook: {n}")
        found.append(p.resolve())
    return found


def check(args) -> int:
    t0 = time.perf_counter()
    nbs = select(args.notebooks)
    with tempfile.TemporaryDirectory(prefix="lora_kit_lessons_") as tmp:
        work = Path(tmp)
        wheel = Path(args.wheel).resolve() if args.wheel else build_wheel(work / "dist")
        pkg = make_venv(work / "venv", wheel)
        (work / "empty").mkdir()
        where = check_resolves(work / "venv", pkg, work / "empty")
        before = package_hashes(pkg)
        print(f"{wheel.name} in a fresh venv ({time.perf_counter() - t0:.1f}s): import lora_kit -> {where}; "
              f"{len(before)} package files hashed", flush=True)
        jobs = {"lora-kit CLI": lambda: smoke_cli(work / "venv", work)} if not args.no_cli else {}
        for i in range(args.repeat):  # a check that passes by luck fails in one of several runs
            suffix = f" (run {i + 1} of {args.repeat})" if args.repeat > 1 else ""
            jobs |= {nb.name + suffix: (lambda nb=nb, tag=suffix: run_lesson(nb, work / "venv", pkg, work, args.timeout,
                                                                              nb.stem + tag.replace(" ", "_")))
                     for nb in nbs}
        results = {}
        def timed(name):
            s = time.perf_counter()
            try: ok, log = jobs[name]()
            except Exception: ok, log = False, "ERROR: " + traceback.format_exc()
            return name, ok, log, time.perf_counter() - s
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for fut in as_completed([pool.submit(timed, name) for name in jobs]):
                name, ok, log, secs = fut.result()
                results[name] = ok, log, secs
                slow = next((l[8:] for l in log.splitlines() if l.startswith("SLOWEST ")), "")
                print(f"{'ok' if ok else 'FAILED':6} {name:40} {secs:7.1f}s" + (f"  slowest: {slow}" if ok and slow else ""), flush=True)
                if not ok: print(error_summary(log), flush=True)
        after = package_hashes(pkg)
        changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    failed = [n for n, (ok, _, _) in results.items() if not ok]
    print(f"\n{'job':34} {'result':8} time")
    for name in jobs: print(f"{name:46} {'ok' if results[name][0] else 'FAILED':8} {results[name][2]:6.1f}s")
    print(f"{'total (wall, ' + str(args.jobs) + ' at a time)':34} {'':8} {time.perf_counter() - t0:6.1f}s")
    if changed:
        print("the lessons changed files of the installed package:", *changed, sep="\n  ")
    else:
        print(f"installed package unchanged ({len(after)} files byte-identical)")
    if failed: print(f"FAILED: {', '.join(failed)}")
    return 1 if failed or changed else 0


def save(args) -> int:
    "Run lessons in place at learner sizes and store their outputs."
    nbs, t0 = select(args.notebooks), time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "IN_TEST"}
    env |= STORED_OUTPUT_ENV
    if args.jobs > 1: env["OMP_NUM_THREADS"] = "1"  # several at once: one thread each
    def one(nb):
        s = time.perf_counter()
        r = subprocess.run([sys.executable, str(TOOLS / "run_lessons.py"), "--worker", str(nb), "--write",
                            "--expect-pkg", str(ROOT / PACKAGE)], cwd=nb.parent, env=env, capture_output=True, text=True)
        return nb, r.returncode == 0, r.stdout + r.stderr, time.perf_counter() - s
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for fut in as_completed([pool.submit(one, nb) for nb in nbs]):
            nb, ok, log, secs = fut.result()
            slow = next((l[8:] for l in log.splitlines() if l.startswith("SLOWEST ")), "")
            print(f"{'saved' if ok else 'FAILED':6} {nb.name:28} {secs:7.1f}s" + (f"  slowest: {slow}" if ok and slow else ""),
                  flush=True)
            if not ok: failed.append(nb.name); print(error_summary(log), flush=True)
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("notebooks", nargs="*", help="lessons to run (default: every nbs/NN_*.ipynb)")
    p.add_argument("--save", action="store_true", help="run in place at learner sizes and store the outputs")
    p.add_argument("--wheel", help="check mode: install this wheel instead of building one")
    p.add_argument("--jobs", type=int, default=None, help="lessons at once, 1 or 2 (check: 2; --save: 1, all threads)")
    p.add_argument("--timeout", type=int, default=LESSON_TIMEOUT, help="check mode: seconds for one lesson")
    p.add_argument("--no-cli", action="store_true", help="check mode: skip the lora-kit command smoke test")
    p.add_argument("--repeat", type=int, default=1, help="check mode: run every lesson this many times, each alone")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--expect-pkg", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        rc = run_notebook(args.worker.resolve(), save=args.write, expect_pkg=args.expect_pkg)
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(rc)  # threads or atexit hooks a lesson left behind cannot hold the process open
    args.jobs = min(max(args.jobs or (1 if args.save else 2), 1), 2)
    return save(args) if args.save else check(args)


if __name__ == "__main__":
    sys.exit(main())
