"""Every lesson is a document that runs alone from the installed package.

- it starts with the shared install cell (`tools/lessons.py`'s `INSTALL_CELL`) right under its title, installing
  from the repository that `pyproject.toml` names;
- it has no `nbdev_export()` cell (a learner's copy has no library to export into);
- it reads nothing by a repository-relative path: images as cell attachments, no `../` or `images/` paths;
- it is committed with its outputs (GitHub and Colab show them as the docs), clean and in step with its source:
  tests/test_stored_outputs.py (`tools/check_outputs.py`). `python tools/run_lessons.py --save` stores them.

Whether each lesson really runs alone from the built wheel is `tools/run_lessons.py`'s check (`make test`).
"""
import json, re, tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
import lessons as L
from check_outputs import ends_on_value
from run_lessons import source

LESSONS = L.lessons()
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
URL = re.compile(r"""(?:https?|ftp)://[^\s)"'<>\]]+""")
RELATIVE = re.compile(r"\.\./|(?<![\w.-])images/")
RELATIVE_CODE = re.compile(r"\.\./|(?<![\w.-])images/|\bnbs/")  # prose may name the nbs/ folder; code may not open it


def cells(nb: Path) -> list[dict]: return json.loads(nb.read_text())["cells"]


def ids(paths): return [p.name for p in paths]


def test_there_are_lessons():
    assert len(LESSONS) >= 10, LESSONS


@pytest.mark.parametrize("nb", LESSONS, ids=ids(LESSONS))
def test_install_cell_under_the_title(nb):
    cs = cells(nb)
    i = L.install_cell_index(cs)
    assert cs[0]["cell_type"] == "markdown" and source(cs[0]).lstrip().startswith("# "), f"{nb.name}: no title first"
    assert i < len(cs) and cs[i]["cell_type"] == "code" and source(cs[i]) == L.INSTALL_CELL, (
        f"{nb.name}: cell {i} is not tools/lessons.py's INSTALL_CELL (run `python tools/lessons.py --write`)")
    assert sum(source(c) == L.INSTALL_CELL for c in cs) == 1, f"{nb.name}: the install cell appears more than once"
    urls = re.findall(r"git\+(\S+?)\"", source(cs[i]))
    assert urls == [REPOSITORY], f"{nb.name}: installs from {urls}, pyproject's Repository is {REPOSITORY}"


@pytest.mark.parametrize("nb", LESSONS, ids=ids(LESSONS))
def test_no_nbdev_export_cell(nb):
    found = [i for i, c in enumerate(cells(nb)) if c["cell_type"] == "code" and re.search(r"\bnb(dev)?_export\s*\(", source(c))]
    assert found == [], f"{nb.name}: nbdev_export() in cell(s) (from 0) {found}"


def relative_paths(text: str, code: bool = False) -> list[str]:
    """Repository-relative paths in `text` (a cell's source): `../` or `images/` outside URLs; in code also `nbs/`,
    in markdown also an image or link target, or an `<img src>`, that is not a URL or an anchor."""
    pattern = RELATIVE_CODE if code else RELATIVE
    found = [m.group(0) for line in text.splitlines() for m in [pattern.search(URL.sub("", line))] if m]
    if code: return found  # `f[0](x)` is a call, not a link
    for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)", text):
        if not re.match(r"(https?://|mailto:|#|attachment:)", target): found.append(target)
    for target in re.findall(r"""<img[^>]*\bsrc=["']([^"']+)""", text):
        if not re.match(r"(https?://|data:|attachment:)", target): found.append(target)
    return found


def test_relative_path_finder():
    assert relative_paths("![x](images/a.png)") == ["images/", "images/a.png"]
    assert relative_paths('open("../lora_kit/assets/x")\nPath("nbs/images/y.png")', code=True) == ["../", "nbs/"]
    assert relative_paths("The lessons live in `nbs/`.") == []
    assert relative_paths('<img src="pic.png">') == ["pic.png"]
    assert relative_paths("fns[0](x)", code=True) == []
    assert relative_paths("![x](https://raw.githubusercontent.com/o/r/main/nbs/images/a.png) [see](#below)") == []
    assert relative_paths("[Colab](https://colab.research.google.com/github/o/r/blob/main/nbs/01_x.ipynb)") == []


@pytest.mark.parametrize("nb", LESSONS, ids=ids(LESSONS))
def test_no_repository_relative_paths(nb):
    found = {i: p for i, c in enumerate(cells(nb))
             if c["cell_type"] in ("code", "markdown") and (p := relative_paths(source(c), code=c["cell_type"] == "code"))}
    assert found == {}, f"{nb.name}: repository-relative paths ({{cell from 0: paths}}) {found}; use absolute URLs"


def test_ends_on_value():
    cell = lambda s: {"cell_type": "code", "source": s}
    assert ends_on_value(cell("x = 1\nx"))
    assert ends_on_value(cell("model.count(3)  # the count"))
    assert not ends_on_value(cell("x = 1\nx;"))
    assert not ends_on_value(cell("x = 1"))
    assert not ends_on_value(cell("import torch"))
    assert not ends_on_value(cell("def f(): return 1"))
    assert not ends_on_value(cell("test_eq(1, 1)"))
    assert not ends_on_value(cell("#| export\nx"))
    assert not ends_on_value(cell("#| hide\nx"))
    assert not ends_on_value(cell("#| eval: false\nx"))
    assert not ends_on_value(cell("#| cuda\nx"))
    assert not ends_on_value(cell("#| slow\nx"))
    assert not ends_on_value({"cell_type": "markdown", "source": "x"})


