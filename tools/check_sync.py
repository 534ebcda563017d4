"""Fail when the notebooks and what is generated from them are out of step.

Runs `nbdev-export` (library), `nbdev-clean` (notebook metadata) and `tools/readme.py` (README.md) and exits 1,
naming the files, if any of them changed a file: the change was not exported, the notebooks were not cleaned,
or the README was not regenerated. The files are left as the tools wrote them, so committing them is the fix.
"""
import hashlib, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATORS = (["nbdev-export"], ["nbdev-clean"], [sys.executable, "tools/readme.py"])


def snapshot() -> dict[str, str]:
    "Content hash of every file the generators may write."
    files = [*ROOT.glob("lora_kit/**/*.py"), *ROOT.glob("nbs/**/*.ipynb"), ROOT / "README.md"]
    return {str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def main() -> int:
    before = snapshot()
    for cmd in GENERATORS: subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    after = snapshot()
    changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    if not changed:
        print("in step: nbdev-export, nbdev-clean and tools/readme.py change nothing")
        return 0
    print("out of step with the notebooks (run nbdev-export, nbdev-clean, python tools/readme.py, then commit):",
          *changed, sep="\n  ", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
