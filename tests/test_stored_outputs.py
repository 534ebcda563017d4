"What every lesson stores is evidence a reader can trust: tools/check_outputs.py over every lesson, and the checker itself."
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
import check_outputs
from run_lessons import record_sources


@pytest.mark.parametrize("lesson", [p.name for p in check_outputs.lessons()])
def test_the_stored_outputs_of_every_lesson_are_clean(lesson):
    assert check_outputs.problems(ROOT / "nbs" / lesson) == []


def code(src, *outputs, **metadata):
    return dict(cell_type="code", source=src, metadata=metadata, outputs=list(outputs), execution_count=None)


def stream(text, name="stdout"): return dict(output_type="stream", name=name, text=text)


def result(text): return dict(output_type="execute_result", data={"text/plain": text}, metadata={}, execution_count=None)


def write(tmp_path, *cells) -> Path:
    nb = dict(cells=list(cells), metadata={}, nbformat=4, nbformat_minor=5)
    path = tmp_path / "99_probe.ipynb"
    path.write_text(json.dumps(record_sources(nb)))
    return path


@pytest.mark.parametrize("output, what", [
    (stream("wrote /tmp/tmpab12cd/adapter"), "a temporary folder's path"),
    (stream("cached in /home/ana/.cache/x\n"), "a home folder's path"),
    (result(f"'{ROOT}/lora_kit/assets'"), "the checkout's path"),
    (stream("/usr/lib/python3/site-packages/peft/x.py:3: note\n", "stderr"), "a site-packages path"),
    (dict(output_type="error", ename="ValueError", evalue="bad", traceback=["ValueError: bad"]), "a traceback"),
    (stream("<ipython-input-3>:2: UserWarning: careful\n", "stderr"), "a Python warning"),
    (stream("\rtraining:  40%|####      | 40/100 [00:04<00:06,  9.80it/s]", "stderr"), "a progress bar"),
    (result("'" + "x" * 4001 + "'"), "characters of output"),
    (stream("usage: lora-kit bench [-h]\nlora-kit bench: error: argument --rank: must be an integer >= 1, got '0'\n", "stderr"), "a stderr stream"),
])
def test_the_checker_names_each_kind_of_noise(tmp_path, output, what):
    path = write(tmp_path, code("show()", output))
    found = check_outputs.problems(path)  # a checkout under /tmp (a CI clone) is also a temporary folder's path
    assert any(what in f for f in found) and all(f.startswith("99_probe.ipynb cell 1: ") for f in found), found


def test_clean_outputs_pass_and_a_source_edited_after_storing_is_caught(tmp_path):
    path = write(tmp_path, code("x = 2\nx", result("2")), code("print('ok')", stream("ok\n")),
                 dict(cell_type="markdown", source="![a plot](images/rank_sweep.png)", metadata={}))
    assert check_outputs.problems(path) == []
    nb = json.loads(path.read_text())
    nb["cells"][0]["source"] = "x = 3\nx"  # edited, outputs not stored again
    path.write_text(json.dumps(nb))
    assert check_outputs.problems(path) == [
        "99_probe.ipynb cell 1: its source changed since its outputs were stored (make outputs NB=" + str(path) + ")"]


def test_a_value_without_its_output_and_an_image_from_a_url_are_caught(tmp_path):
    figure = dict(output_type="display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}, metadata={})
    path = write(tmp_path, code("rows = [1, 2]\nrows"), code("total = sum(rows)"), code("plt.plot(rows);"),
                 code("#| slow\nrows"), code("test_eq(rows, [1, 2])"),
                 dict(cell_type="markdown", source="![a plot](https://example.org/p.png)", metadata={}),
                 code("plot_history(rows);"), code("plot_history(rows);", figure), code("#| slow\nplot_history(rows);"))
    found = check_outputs.problems(path)
    assert len(found) == 3, found
    assert "cell 1: ends on a value but has no stored output" in found[0]
    assert "cell 6: an image loaded from a URL" in found[1]
    assert "cell 7: draws a figure but stores no image" in found[2]  # a `;` hides the value, not the figure
