"""run_hidden_tests: grades what the student defined, hides test code, blocks the library's answer."""

import pytest
import torch

from effml_lib import grading

SUITE = '''
import torch

def test_adds(student):
    assert torch.equal(student.add(torch.tensor([1, 2]), torch.tensor([3, 4])), torch.tensor([4, 6])), "add([1,2],[3,4]) should be [4,6]"

def test_adds_floats(student):
    SECRET_EXPECTED = torch.tensor([0.5])
    assert torch.allclose(student.add(torch.tensor([0.25]), torch.tensor([0.25])), SECRET_EXPECTED), "floats must add too"
'''


@pytest.fixture
def hidden(tmp_path, monkeypatch):
    (tmp_path / "labX").mkdir()
    (tmp_path / "labX" / "test_add.py").write_text(SUITE)
    monkeypatch.setenv("EFFML_HIDDEN_TESTS", str(tmp_path))
    return tmp_path


def test_correct_submission_passes(hidden, capsys):
    assert grading.run_hidden_tests("labX", "add", {"add": lambda a, b: a + b}) == 2
    assert "2 of 2 hidden tests passed" in capsys.readouterr().out


def test_wrong_submission_fails_with_messages_but_no_test_code(hidden, capsys):
    with pytest.raises(AssertionError, match="1 hidden test"):
        grading.run_hidden_tests("labX", "add", {"add": lambda a, b: a - b if a.is_floating_point() else a + b})
    out = capsys.readouterr().out
    assert "FAILED test_adds_floats" in out and "floats must add too" in out
    assert "SECRET_EXPECTED" not in out and "allclose" not in out, "test code leaked into the output"


def test_missing_definition_fails(hidden, capsys):
    with pytest.raises(AssertionError):
        grading.run_hidden_tests("labX", "add", {})
    assert "add" in capsys.readouterr().out


def test_library_function_is_unavailable_while_graded(hidden, capsys):
    def library_add(a, b):
        grading.guard("ops.add")
        return a + b

    assert grading.run_hidden_tests("labX", "add", {"add": library_add}) == 2  # not blocked: passes
    with pytest.raises(AssertionError):
        grading.run_hidden_tests("labX", "add", {"add": library_add}, blocked=("ops.add",))
    out = capsys.readouterr().out
    assert "unavailable while this part is graded" in out
    library_add(torch.ones(1), torch.ones(1))  # and available again afterwards


def test_unknown_part(hidden):
    with pytest.raises(FileNotFoundError, match="test_nope.py"):
        grading.run_hidden_tests("labX", "nope", {})
