"""The reading order is the architecture: a lesson, and the module it exports, build only on earlier lessons.

Lessons are the numbered notebooks in `nbs/`, read in file-name order. Each module of `lora_kit` is the export of
exactly one lesson (`#| default_exp`). A use of `lora_kit.X` (an import at the top of a module, one inside a
function, or one in a lesson cell, or its name in a string: `python -m lora_kit.X` runs it) is a forward use when X is
exported by a later lesson.
"""
import ast, json, re
from pathlib import Path
import pytest
from lessons import lessons  # tools/lessons.py, on the path through conftest

ROOT = Path(__file__).resolve().parent.parent
NBS, PKG = ROOT / "nbs", ROOT / "lora_kit"
LESSONS = lessons()
EXPORTED = {"__init__", "_modidx"}  # written by nbdev itself, not by a lesson


def code_cells(nb: Path) -> list[str]:
    "Source of each code cell, with shell (`!`) and magic (`%`) lines blanked so `ast` can parse it."
    cells = json.loads(nb.read_text())["cells"]
    blank = lambda line: "" if line.lstrip().startswith(("!", "%")) else line
    return ["\n".join(map(blank, "".join(c["source"]).splitlines())) for c in cells if c["cell_type"] == "code"]


def default_exp(nb: Path) -> str | None:
    return next((m.group(1) for src in code_cells(nb) if (m := re.search(r"^#\|\s*default_exp\s+(\w+)", src, re.M))), None)


def kit_uses(source: str, relative_ok: bool) -> set[str]:
    "Names X of the `lora_kit.X` modules that `source` imports or names (`relative_ok`: `from .X import` counts too)."
    uses = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and relative_ok:
                uses |= {node.module} if node.module else {a.name for a in node.names}
            elif node.level == 0 and node.module and node.module.split(".")[0] == "lora_kit":
                parts = node.module.split(".")
                uses |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            uses |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lora_kit.")}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lora_kit":
            uses.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (named := re.fullmatch(r"lora_kit\.(\w+)", node.value)):
            uses.add(named.group(1))  # a module run by name: [sys.executable, "-m", "lora_kit.X"], importlib
    return uses - {"__version__"}


def lesson_of() -> dict[str, int]:
    "Module name -> position of the lesson that exports it."
    owners = {}
    for i, nb in enumerate(LESSONS):
        if mod := default_exp(nb):
            assert mod not in owners, f"{mod} is exported by two lessons: {LESSONS[owners[mod]].name} and {nb.name}"
            owners[mod] = i
    return owners


def forward_uses() -> list[str]:
    owners, found = lesson_of(), []
    for i, nb in enumerate(LESSONS):
        for j, src in enumerate(code_cells(nb)):
            for mod in sorted(kit_uses(src, relative_ok=False)):
                if owners.get(mod, -1) > i: found.append(f"{nb.name} code cell {j} uses lora_kit.{mod} ({LESSONS[owners[mod]].name})")
    for py in sorted(PKG.glob("*.py")):
        if py.stem in EXPORTED: continue
        for mod in sorted(kit_uses(py.read_text(), relative_ok=True)):
            if owners.get(mod, -1) > owners[py.stem]:
                found.append(f"lora_kit/{py.name} ({LESSONS[owners[py.stem]].name}) uses lora_kit.{mod} ({LESSONS[owners[mod]].name})")
    return found


def test_every_module_is_the_export_of_exactly_one_lesson():
    owners = lesson_of()
    modules = {p.stem for p in PKG.glob("*.py")} - EXPORTED
    assert modules == set(owners), f"modules without a lesson: {modules - set(owners)}; lessons without a module file: {set(owners) - modules}"


def test_no_lesson_or_module_uses_a_later_lesson():
    assert forward_uses() == []


def test_the_checker_sees_every_kind_of_use():
    assert kit_uses("from lora_kit.train import x\nimport lora_kit.data\nlora_kit.tiny.base_path()", False) == {"train", "data", "tiny"}
    assert kit_uses("def f():\n    from .finetune import g\n    from . import app", True) == {"finetune", "app"}
    assert kit_uses("from .finetune import g", False) == set()
    assert kit_uses('subprocess.run([sys.executable, "-m", "lora_kit.cli", "finetune"])', False) == {"cli"}
    assert kit_uses('print("see lora_kit.cli and python -m lora_kit.study")', False) == set()  # prose names no module run


@pytest.mark.parametrize("nb", [p.name for p in LESSONS])
def test_lessons_are_numbered_uniquely(nb):
    assert sum(p.name[:2] == nb[:2] for p in LESSONS) == 1
