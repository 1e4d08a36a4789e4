"""Where the grader finds the labs' hidden tests, and what it says when they are not there: a plain
`pip install` of the package (Colab, a user's venv) ships none."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from effml_lib import grading

ROOT = Path(__file__).resolve().parents[1]

# Run by the installed copy of the package: where it was imported from, and what hidden_tests_dir says
# without EFFML_HIDDEN_TESTS and with it naming the repository's folder (argv[1]).
PROBE = """
import json, os, sys
import effml_lib
from effml_lib.grading import hidden_tests_dir

def ask():
    try:
        return {"dir": str(hidden_tests_dir())}
    except FileNotFoundError as error:
        return {"error": str(error)}

found = {"module": effml_lib.__file__, "unset": ask()}
os.environ["EFFML_HIDDEN_TESTS"] = sys.argv[1]
found["set"] = ask()
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def installed(installed_package, tmp_path_factory):
    """What the installed copy, run outside the repository, says."""
    environment = {k: v for k, v in os.environ.items() if k not in ("EFFML_HIDDEN_TESTS", "PYTHONPATH")}
    run = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "grading" / "hidden")],
                         cwd=tmp_path_factory.mktemp("elsewhere"), capture_output=True, text=True, timeout=300,
                         env={**environment, "PYTHONPATH": str(installed_package)})
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["module"]).resolve().is_relative_to(installed_package.resolve()), (
        f"the probe imported effml_lib from {found['module']}, not from the installed copy in {installed_package}")
    return found


def test_a_plain_install_says_what_is_missing_and_how_to_set_it(installed, installed_package):
    assert "error" in installed["unset"], f"a plain install found hidden tests at {installed['unset']}: it ships none"
    message = installed["unset"]["error"]
    for needed in ("EFFML_HIDDEN_TESTS", "grading/hidden", str(installed_package / "effml_lib"), "pip install -e"):
        assert needed in message, f"the error should mention {needed!r}: {message}"


def test_a_plain_install_uses_the_folder_the_variable_names(installed):
    assert installed["set"] == {"dir": str(ROOT / "grading" / "hidden")}, installed["set"]


def test_the_variable_naming_no_folder_is_an_error_that_says_so(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("EFFML_HIDDEN_TESTS", str(missing))
    with pytest.raises(FileNotFoundError, match="EFFML_HIDDEN_TESTS") as error:
        grading.hidden_tests_dir()
    assert str(missing) in str(error.value) and "not a folder" in str(error.value)


def test_a_clone_finds_its_own_hidden_tests(monkeypatch):
    monkeypatch.delenv("EFFML_HIDDEN_TESTS", raising=False)
    assert Path(grading.__file__).resolve().parents[1] == ROOT, f"expected this checkout's effml_lib, got {grading.__file__}"
    assert grading.hidden_tests_dir() == ROOT / "grading" / "hidden"
