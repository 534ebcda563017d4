"README.md is generated from nbs/index.ipynb and must say what the repository holds."
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import readme
from lessons import lessons


def test_readme_in_step_with_index_notebook():
    assert (ROOT / "README.md").read_text() == readme.readme_text(), "run `python tools/readme.py`"


def test_readme_gives_exactly_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    fenced = re.search(r"## Two commands on a fresh machine.*?```sh\n(.*?)```", text, re.S).group(1)
    assert [l.split("#")[0].strip() for l in fenced.strip().splitlines()] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_lesson_is_listed_with_a_colab_link_and_every_link_exists():
    text = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"colab\.research\.google\.com/github/[^)]*/blob/main/nbs/([\w.-]+\.ipynb)", text))
    assert linked == {p.name for p in lessons()}
