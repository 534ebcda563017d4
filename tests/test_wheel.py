"""`tools/run_lessons.py` on tiny synthetic notebooks: which cells run, what a failure reports, what `--save` stores.

The real run (build the wheel, a fresh venv, every lesson alone) is `make test`'s last step; these check the
runner's own logic in seconds.
"""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from run_lessons import WIDGET_MIME, directives, run, skipped, strip_widget_state

RUNNER = ROOT / "tools" / "run_lessons.py"


def code(src, **kw): return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": src, **kw}
def md(src): return {"cell_type": "markdown", "metadata": {}, "source": src}


def notebook(path: Path, *cells, metadata=None) -> Path:
    nb = {"cells": list(cells), "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}, **(metadata or {})}}
    for i, c in enumerate(nb["cells"]): c["id"] = f"c{i:07d}"
    path.write_text(json.dumps(nb, indent=1))
    return path


def test_directives_as_nbdev_reads_them():
    assert directives(code("#| export\nx = 1")) == {"export": ""}
    assert directives(code("#|eval: false\n#| slow\nx")) == {"eval": "false", "slow": ""}
    assert directives(code("%%time\n\n#| eval:false\nx")) == {"eval": "false"}
    assert directives(code("#| eval: true\nx")) == {"eval": ""}
    assert directives(code("x = 1\n#| slow")) == {}, "a directive below code is a comment"
    assert directives(code(["#| hide\n", "x"])) == {"hide": ""}, "notebook JSON stores the source as lines"


@pytest.mark.parametrize("cell, skip", [
    (code("x = 1"), False), (code("#| export\nx = 1"), False), (code("#| hide\nx"), False),
    (code("#| cuda\nif gpu_available(): x"), False),  # GPU cells run: on a CPU they skip themselves
    (code("#| slow\nx"), True), (code("#| eval: false\nx"), True), (code("#| eval: False\nx"), True),
    (md("# title"), True), ({"cell_type": "raw", "metadata": {}, "source": "x"}, True)])
def test_skipped(cell, skip):
    assert bool(skipped(cell)) is skip


def test_strip_widget_state():
    widget = {"output_type": "display_data", "metadata": {}, "data": {"text/plain": "VBox()", WIDGET_MIME: {"model_id": "1"}}}
    text = {"output_type": "execute_result", "execution_count": 3, "metadata": {}, "data": {"text/plain": "1"}}
    cleared = {"output_type": "stream", "name": "stdout", "text": ["\x1b[2K\r", "\x1b[2K\r"]}
    printed = {"output_type": "stream", "name": "stdout", "text": ["1\r2\n"]}
    nb = {"metadata": {"widgets": {"state": {}}, "kernelspec": {}},
          "cells": [code("x", execution_count=3, outputs=[cleared, widget, text, printed], metadata={"execution": {"total": 1}}),
                    md("m")]}
    out = strip_widget_state(nb)
    assert out["metadata"] == {"kernelspec": {}}
    c = out["cells"][0]
    assert c["execution_count"] is None and c["metadata"] == {} and c["outputs"] == [dict(text, execution_count=None), printed]


def worker(nb: Path, *args, **env):
    return subprocess.run([sys.executable, str(RUNNER), "--worker", str(nb), *args], cwd=nb.parent,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_worker_runs_the_right_cells(tmp_path):
    nb = notebook(tmp_path / "lesson.ipynb", md("# Title"),
                  code("import os\nopen('ran', 'w').write(os.environ.get('IN_TEST', ''))"),
                  code("#| slow\nraise SystemExit('slow cells are skipped')"),
                  code("#| eval: false\nraise SystemExit('eval: false cells are skipped')"),
                  code("#| cuda\nopen('cuda', 'w').write('cuda cells run')"),
                  code("#| hide\nopen('hide', 'w').write('hidden cells run')"))
    r = worker(nb, IN_TEST="1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ran").read_text() == "1" and (tmp_path / "cuda").exists() and (tmp_path / "hide").exists()
    assert json.loads(nb.read_text())["cells"][1]["outputs"] == [], "check mode writes nothing back"


def test_worker_reports_the_failing_cell(tmp_path):
    nb = notebook(tmp_path / "lesson.ipynb", md("# Title"), code("x = 1"),
                  code("open('../images/dashboard.png').read()"), code("open('after', 'w')"))
    r = worker(nb)
    assert r.returncode == 1
    assert "ERROR in cell #3" in r.stderr and "FileNotFoundError" in r.stderr and "images/dashboard.png" in r.stderr
    assert not (tmp_path / "after").exists(), "execution stops at the first error"


def test_worker_refuses_lora_kit_from_elsewhere(tmp_path):
    "The editable install is not the wheel: asked to expect the package in another folder, the worker fails."
    nb = notebook(tmp_path / "lesson.ipynb", md("# Title"), code("import lora_kit"))
    r = worker(nb, "--expect-pkg", str(tmp_path / "venv" / "lora_kit"))
    assert r.returncode == 1 and "outside the installed wheel" in r.stderr and "lora_kit/__init__.py" in r.stderr
    assert worker(nb, "--expect-pkg", str(ROOT / "lora_kit")).returncode == 0


def test_save_stores_outputs_without_widget_state(tmp_path):
    show_widget = ("from IPython.display import display\n"
                   f"display({{'text/plain': 'VBox()', '{WIDGET_MIME}': {{'model_id': 'x', 'version_major': 2}}}}, raw=True)")
    nb = notebook(tmp_path / "lesson.ipynb", md("# Title"),
                  code("import os\nos.environ.get('IN_TEST', 'learner sizes')"),
                  code(show_widget + "\nfrom IPython.display import clear_output\nclear_output()"),
                  code("print('printed')"), code("#| slow\n1 / 0"),
                  metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}})
    r = subprocess.run([sys.executable, str(RUNNER), "--save", str(nb)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "IN_TEST": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "saved" in r.stdout and "lesson.ipynb" in r.stdout and "s\n" in r.stdout  # a time per lesson
    saved = json.loads(nb.read_text())
    cells = saved["cells"]
    assert "widgets" not in saved["metadata"]
    assert cells[1]["outputs"][0]["data"]["text/plain"] == ["'learner sizes'"], "--save runs with IN_TEST unset"
    assert cells[2]["outputs"] == [], "widget views and clear_output's terminal codes are not stored"
    assert cells[3]["outputs"][0]["text"] == ["printed\n"]
    assert cells[4]["outputs"] == []
    assert all(c.get("execution_count") is None for c in cells if c["cell_type"] == "code")
    assert all(o.get("execution_count") is None for c in cells for o in c.get("outputs", []))
    assert all(c["metadata"] == {} for c in cells)
    before = nb.read_bytes()
    from nbdev.clean import nbdev_clean
    nbdev_clean(fname=str(nb))
    assert nb.read_bytes() == before, "what --save writes is already clean"


def test_a_timeout_ends_the_whole_process_group(tmp_path):
    "A lesson that hangs, and anything it started, is killed: the runner reports it and goes on."
    marker = tmp_path / "grandchild.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run(["sh", "-c", f"sleep 60 & echo $! > {marker}; wait"], timeout=1)
    pid = int(marker.read_text())
    for _ in range(50):
        try: os.kill(pid, 0)
        except ProcessLookupError: break
        time.sleep(0.1)
    else: pytest.fail(f"the process the lesson started ({pid}) is still running")
