"""What a lesson stores is what a reader sees: check every lesson's stored outputs are evidence, not noise.

A stored lesson fails on:
- an absolute path of the machine that stored it: a temporary folder, a home folder, the checkout, site-packages;
- a traceback, or a Python warning (`SomethingWarning:` or `warnings.warn(`);
- a progress bar (tqdm's `NN%|`, `it/s]`);
- anything written to stderr: a log, a warning or a usage message is not a result (show the value instead);
- an output over `MAX_CHARS` characters of text;
- an image loaded from a URL (markdown or HTML), instead of a file beside the lessons;
- a code cell without outputs whose source ends on a value (`ends_on_value`) that the stored run should have shown;
- a code cell ending on a call of a `plot_*` or `draw_*` function (`ends_on_a_figure`) that stores no image;
- a code cell whose source changed since its outputs were stored: `tools/run_lessons.py --save` (`make outputs`)
  records a digest of each cell's source in the cell's metadata (`stored_source`).

`python tools/check_outputs.py [NB ...]` prints one line per problem and exits 1 if there is any; tests/test_lessons.py
runs it over every lesson.
"""
from __future__ import annotations

import argparse, ast, json, re, sys
from pathlib import Path

from lessons import lessons
from run_lessons import DIGEST_KEY, digest, directives, source  # the tool that stores the outputs

ROOT = Path(__file__).resolve().parent.parent
MAX_CHARS = 4000
NOT_SHOWN = {"export", "exporti", "exports", "hide", "slow", "cuda"}  # cells whose value a reader does not see
NOISE = {
    "a temporary folder's path": re.compile(r"(?<![\w.])/(?:tmp|var/folders|private/var)/[\w.-]+"),
    "a home folder's path": re.compile(r"(?<![\w.])(?:/root|/home/[\w.-]+|/Users/[\w.-]+)/"),
    "the checkout's path": re.compile(re.escape(str(ROOT)) + r"\b"),
    "a site-packages path": re.compile(r"[\\/](?:site|dist)-packages[\\/]"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    "a Python warning": re.compile(r"\b[A-Z]\w*Warning: |warnings\.warn\("),
    "a progress bar": re.compile(r"\d+%\|.*\||\d+(?:\.\d+)?(?:it|s)/(?:s|it)\]"),
}
URL_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*https?://|<img[^>]+src=[\"']https?://", re.I)


def output_text(cell) -> str:
    "The text a reader sees in a code cell's outputs (streams, text/* data, errors); images left out."
    parts = []
    for o in cell.get("outputs", []):
        if "text" in o: parts.append(source({"source": o["text"]}))
        for mime, value in o.get("data", {}).items():
            if mime.startswith("text/"): parts.append(source({"source": value}))
        if o.get("output_type") == "error": parts.append("Traceback (most recent call last)\n" + "\n".join(o.get("traceback", [])))
    return "\n".join(parts)


def shown_code(cell) -> str:
    "The code of a cell a reader runs and sees, magics and comments blanked; empty for a markdown cell or an `#| export`/`#| hide`/`#| slow`/`#| eval: false`/`#| cuda` one."
    if cell["cell_type"] != "code": return ""
    d = directives(cell)
    if NOT_SHOWN & d.keys() or d.get("eval", "").lower() == "false": return ""
    return "\n".join("" if l.lstrip().startswith(("!", "%", "#")) else l for l in source(cell).splitlines()).strip()


def last_expression(code:str) -> ast.expr|None:
    "The expression `code` ends on, if its last statement is one (not an assignment, import or definition)."
    try: body = ast.parse(code).body
    except SyntaxError: return None
    return body[-1].value if body and isinstance(body[-1], ast.Expr) else None


def called(expr:ast.expr|None) -> str:
    "The name of the function `expr` calls (`f(...)` or `x.f(...)`); empty if it is no call."
    f = expr.func if isinstance(expr, ast.Call) else None
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def ends_on_value(cell) -> bool:
    """A code cell a reader runs whose last statement is an expression that shows a value: not ending in `;`,
    not an assignment, import or definition (those are statements), and not a `test_*` check (they return None)."""
    code = shown_code(cell)
    if not code or code.splitlines()[-1].rstrip().endswith(";"): return False
    expr = last_expression(code)
    return expr is not None and not called(expr).startswith("test_")


def ends_on_a_figure(cell) -> bool:
    "A code cell a reader runs that ends on a call of a `plot_*` or `draw_*` function: it draws a figure to be seen (a `;` only hides the returned value)."
    return called(last_expression(shown_code(cell))).startswith(("plot_", "draw_"))


def problems(path: Path) -> list[str]:
    "Every problem of the stored lesson at `path`, one line each (`cell N` counts from 1, markdown cells included)."
    nb, found = json.loads(path.read_text()), []
    store = f"make outputs NB={path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    for i, cell in enumerate(nb["cells"], 1):
        where = f"{path.name} cell {i}"
        if cell["cell_type"] == "markdown":
            if URL_IMAGE.search(source(cell)): found.append(f"{where}: an image loaded from a URL (use a file in nbs/images)")
            continue
        if cell["cell_type"] != "code": continue
        outputs, text = cell.get("outputs", []), output_text(cell)
        for what, pattern in NOISE.items():
            if m := pattern.search(text): found.append(f"{where}: {what} in its output ({m.group(0)!r})")
        if any(o.get("name") == "stderr" for o in outputs):
            found.append(f"{where}: its output has a stderr stream (a log, warning or usage message: show the value instead)")
        if len(text) > MAX_CHARS: found.append(f"{where}: {len(text):,} characters of output (at most {MAX_CHARS:,})")
        if not outputs and ends_on_value(cell):
            found.append(f"{where}: ends on a value but has no stored output (store it: {store})")
        if ends_on_a_figure(cell) and not any("image/png" in o.get("data", {}) for o in outputs):
            found.append(f"{where}: draws a figure but stores no image (store it: {store})")
        if outputs and cell.get("metadata", {}).get(DIGEST_KEY) != digest(cell):
            found.append(f"{where}: its source changed since its outputs were stored ({store})")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", type=Path, help="lessons to check (default: every nbs/NN_*.ipynb)")
    args = p.parse_args(argv)
    found = [line for nb in (args.notebooks or lessons()) for line in problems(nb.resolve())]
    print("\n".join(found) if found else "stored outputs clean")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
