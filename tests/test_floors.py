"""tools/check_floors.py reads the floors it tests from pyproject.toml as declared (the run itself, which builds a
virtual environment and runs the library's tests at those versions, is `python tools/check_floors.py`)."""
import importlib.util, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_floors", ROOT / "tools" / "check_floors.py")
check_floors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_floors)


def pyproject(tmp_path, *deps):
    path = tmp_path / "pyproject.toml"
    path.write_text("[project]\nname = 'x'\ndependencies = [\n" + "".join(f"    {d!r},\n" for d in deps) + "]\n")
    return path


def test_the_floors_are_the_declared_lower_bounds_of_pyproject():
    floors = check_floors.read_floors()
    assert list(floors) == list(check_floors.FLOORED) == ["transformers", "peft", "accelerate", "datasets"]
    text = (ROOT / "pyproject.toml").read_text()
    for name, version in floors.items(): assert f'"{name}>={version}"' in text


def test_floors_are_read_whatever_the_spelling_and_the_rest_is_kept_as_declared(tmp_path):
    path = pyproject(tmp_path, "torch>=2.2", "Transformers >= 5.4, <6", "peft>=0.14", "accelerate>=1.1",
                     "datasets[audio]>=2.18; python_version >= '3.10'", "tqdm>=4.60")
    assert check_floors.read_floors(path) == dict(transformers="5.4", peft="0.14", accelerate="1.1", datasets="2.18")
    assert check_floors.other_requirements(path) == ["torch>=2.2", "tqdm>=4.60"]


@pytest.mark.parametrize("deps, reason", [
    (["peft>=0.14", "accelerate>=1.1", "datasets>=2.18"], "transformers is not in"),
    (["transformers", "peft>=0.14", "accelerate>=1.1", "datasets>=2.18"], "exactly one '>='"),
    (["transformers==5.4", "peft>=0.14", "accelerate>=1.1", "datasets>=2.18"], "exactly one '>='"),
])
def test_a_package_without_a_floor_is_refused_naming_it(tmp_path, deps, reason):
    with pytest.raises(check_floors.FloorError, match=reason): check_floors.read_floors(pyproject(tmp_path, *deps))


def test_pins_override_floors_and_name_the_environment():
    assert check_floors.parse_pins(["transformers==5.3.0", " peft == 0.13.2 "]) == {"transformers": "5.3.0", "peft": "0.13.2"}
    with pytest.raises(check_floors.FloorError, match="name==version"): check_floors.parse_pins(["transformers>=5"])
    a = check_floors.venv_name(dict(transformers="5.4", peft="0.14"))
    assert a == check_floors.venv_name(dict(peft="0.14", transformers="5.4"))  # order does not matter
    assert a != check_floors.venv_name(dict(transformers="5.3.0", peft="0.14"))
    assert a.startswith(f"py{sys.version_info.major}.{sys.version_info.minor}-")


def test_a_floor_brings_the_optional_companions_it_would_import_at_its_own_range():
    "This Python's transformers requires kernels 0.19, which transformers 5.4 imports and breaks on: the floor's extra pins it."
    assert check_floors.requirement("transformers", "5.4") == "transformers[kernels]==5.4"
    assert check_floors.requirement("peft", "0.14") == "peft==0.14"


def test_a_wrong_version_in_the_environment_is_an_error():
    found = {"transformers": dict(version="5.24.0", file="/x/transformers/__init__.py"), "peft": dict(error="ImportError: no")}
    with pytest.raises(check_floors.FloorError, match="transformers: wanted 5.4, imported 5.24.0") as e:
        check_floors.check_pins(found, dict(transformers="5.4", peft="0.14"), Path("/venv"))
    assert "peft: ImportError: no" in str(e.value)
    check_floors.check_pins({"transformers": dict(version="5.4.0", file="f")}, dict(transformers="5.4"), Path("/venv"))  # 5.4 == 5.4.0


def test_the_library_tests_it_runs_exist():
    for test in check_floors.LIBRARY_TESTS: assert (ROOT / test).is_file(), test


def test_print_floors(capsys):
    assert check_floors.main(["--print-floors"]) == 0
    assert capsys.readouterr().out.split() == [f"{n}=={v}" for n, v in check_floors.read_floors().items()]
