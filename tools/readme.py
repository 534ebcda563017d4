"""Write README.md from nbs/index.ipynb.

`nbdev-readme` renders through Quarto, which cannot be installed offline, so the README is converted with
nbconvert instead: cells marked `#| hide` are dropped and `#|` directive lines removed, as nbdev does.
`python tools/readme.py --check` exits 1 when README.md is out of step with the notebook.
"""
import argparse, re, sys
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parent.parent
INDEX, README = ROOT / "nbs" / "index.ipynb", ROOT / "README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file. -->\n\n"
_directive = re.compile(r"^\s*#\|\s*(.*)$")


def _directives(cell) -> set[str]:
    "The directive names of `cell` (`hide`, `export`, ...)."
    return {m.group(1).split(":")[0].split()[0] for line in cell.source.splitlines()
            if (m := _directive.match(line)) and m.group(1).strip()}


def readme_text(index: Path = INDEX) -> str:
    "README.md's text for the notebook at `index`."
    nb = nbformat.read(index, as_version=4)
    nb.metadata["language_info"] = {"name": "python"}  # nbdev-clean drops it; it names the code fences' language
    nb.cells = [c for c in nb.cells if not {"hide", "export", "exporti", "default_exp"} & _directives(c)]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = "\n".join(l for l in cell.source.splitlines() if not _directive.match(l))
    body, _ = MarkdownExporter().from_notebook_node(nb)
    body = body.replace("](images/", "](nbs/images/")  # images live beside the notebooks
    return HEADER + re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is out of step, change nothing")
    args = p.parse_args(argv)
    text = readme_text()
    if args.check:
        if README.exists() and README.read_text() == text: return 0
        print("README.md is out of step with nbs/index.ipynb: run `python tools/readme.py`", file=sys.stderr)
        return 1
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
