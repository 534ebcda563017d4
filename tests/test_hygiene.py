"The tests' own hygiene: every subprocess a test starts has a time limit, so a hung child fails the run instead of stalling CI."
import ast
from pathlib import Path

import pytest

TESTS = sorted(Path(__file__).parent.glob("*.py"))
BLOCKING = {"run", "check_output", "check_call", "call"}  # subprocess functions that wait for the child


def subprocess_calls(tree):
    "(function node or None, call node, name) for each `subprocess.<name>(...)` call."
    found = []
    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            scope = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "subprocess"):
                found.append((function, child, child.func.attr))
            visit(child, scope)
    visit(tree, None)
    return found


def has_timeout(call): return any(k.arg == "timeout" for k in call.keywords)


def waits_with_timeout(tree):
    "The module waits for its children with a limit: `.wait(timeout=...)` or `.communicate(timeout=...)`."
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("wait", "communicate")
               and (has_timeout(n) or n.args) for n in ast.walk(tree))


@pytest.mark.parametrize("path", TESTS, ids=lambda p: p.name)
def test_every_subprocess_has_a_time_limit(path):
    missing, tree = [], ast.parse(path.read_text())
    for function, call, name in subprocess_calls(tree):
        ok = has_timeout(call) if name in BLOCKING else waits_with_timeout(tree) if name == "Popen" else True
        if not ok: missing.append(f"{path.name}:{call.lineno} subprocess.{name} without a timeout")
    assert not missing, "\n".join(missing)


def test_the_check_finds_a_call_without_a_limit():
    tree = ast.parse("import subprocess\ndef f():\n    subprocess.run(['true'])\n    p = subprocess.Popen(['true'])\n    p.wait()")
    assert [(name, has_timeout(c)) for _, c, name in subprocess_calls(tree)] == [("run", False), ("Popen", False)]
    assert not waits_with_timeout(tree) and waits_with_timeout(ast.parse("p.wait(timeout=5)"))
