"""What every lesson shares, and what the tests check about lessons.

`INSTALL_CELL` is the code cell right under each lesson's title: in Colab it installs lora_kit from the repository
named in `pyproject.toml` (not yet on the package index) and turns on Colab's support for ipywidgets 8; anywhere
else it does nothing. `python tools/lessons.py --write` puts it into every lesson that lacks it.
"""
import argparse, json, re, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
INSTALL_CELL = f'''# In Colab: install lora_kit from its repository and turn on ipywidgets 8. Anywhere else: nothing to do.
import sys
if "google.colab" in sys.modules:
    import subprocess
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lora_kit[qlora,export] @ git+{REPOSITORY}"], check=True)
    from google.colab import output
    output.enable_custom_widget_manager()'''


def lessons() -> list[Path]:
    "The numbered lesson notebooks, in reading order."
    return sorted(p for p in NBS.glob("*.ipynb") if re.match(r"\d\d_", p.name))


def source(cell) -> str: return "".join(cell["source"])


def install_cell_index(cells) -> int:
    "Where the install cell belongs: right after the first markdown cell (the title)."
    return next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown") + 1


def add_install_cell(path: Path) -> bool:
    "Put `INSTALL_CELL` under the title of the lesson at `path` (replacing an older version of it); True if the file changed."
    nb = json.loads(path.read_text())
    i = install_cell_index(nb["cells"])
    if i < len(nb["cells"]) and source(nb["cells"][i]) == INSTALL_CELL: return False
    lines = INSTALL_CELL.split("\n")
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "source": [l + "\n" for l in lines[:-1]] + [lines[-1]]}
    older = i < len(nb["cells"]) and source(nb["cells"][i]).startswith(INSTALL_CELL.split("\n")[0])
    nb["cells"][i:i + older] = [cell]
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="add the install cell where it is missing or older")
    args = p.parse_args(argv)
    if args.write:
        for nb in lessons():
            if add_install_cell(nb): print(f"wrote the install cell of {nb.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
