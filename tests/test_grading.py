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


# --- the SDPA ban: PyTorch's fused attention is unavailable while the student's functions run -------

ATTEND_SUITE = '''
import torch

def test_attends(student):
    x = torch.randn(2, 4, 8)  # (B, T, D)
    assert student.attend(x).shape == (2, 4, 8), "attend(x) keeps x's shape"
'''

TIMED_SUITE = '''
import torch
from effml_lib.grading import without_sdpa_ban

def test_timed_without_the_ban(student):
    x = torch.randn(2, 4, 8)
    without_sdpa_ban(student.attend)(x)  # what a performance part times
'''


@pytest.fixture
def attend_suites(hidden):
    (hidden / "labX" / "test_attend.py").write_text(ATTEND_SUITE)
    (hidden / "labX" / "test_timed.py").write_text(TIMED_SUITE)
    return hidden


def sdpa_attend(x):
    return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)


def aten_attend(x):
    return torch.ops.aten.scaled_dot_product_attention(x, x, x, is_causal=True)


def math_attend(x):  # the unfused fallback: below the dispatcher it is plain matmuls, so caught by name
    return torch.ops.aten._scaled_dot_product_attention_math(x, x, x, is_causal=True)[0]


def mha_attend(x):  # nn.MultiheadAttention reaches the fused kernel from inside PyTorch
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    return mha(x, x, x, need_weights=False)[0]


class ObjectAttend:
    def __call__(self, x):
        return sdpa_attend(x)


@pytest.mark.parametrize("attend", [sdpa_attend, aten_attend, math_attend, mha_attend, ObjectAttend()],
                         ids=["F", "aten", "math", "MultiheadAttention", "object"])
def test_sdpa_is_unavailable_while_banned(attend_suites, attend, capsys):
    assert grading.run_hidden_tests("labX", "attend", {"attend": attend}) == 1  # not banned: passes
    with pytest.raises(AssertionError):
        grading.run_hidden_tests("labX", "attend", {"attend": attend}, blocked=(grading.TORCH_SDPA,))
    assert grading.SDPA_MESSAGE in capsys.readouterr().out
    attend(torch.randn(2, 4, 8))  # and available again afterwards


def test_a_handwritten_attention_passes_the_ban(attend_suites):
    def attend(x):
        scores = x @ x.transpose(-2, -1) / 8**0.5  # (B, T, T)
        mask = torch.ones(4, 4, dtype=torch.bool).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ x

    assert grading.run_hidden_tests("labX", "attend", {"attend": attend}, blocked=(grading.TORCH_SDPA,)) == 1


def test_timing_runs_without_the_ban_but_with_the_library_blocked(attend_suites, capsys):
    # without_sdpa_ban gives back the function the ban's modes would slow down, so that it can be
    # timed fairly; the library's implementation stays unavailable in it.
    both = (grading.TORCH_SDPA, "ops.attend")
    assert grading.run_hidden_tests("labX", "timed", {"attend": sdpa_attend}, blocked=both) == 1

    def library_attend(x):
        grading.guard("ops.attend")
        return x

    with pytest.raises(AssertionError):
        grading.run_hidden_tests("labX", "timed", {"attend": library_attend}, blocked=both)
    assert "unavailable while this part is graded" in capsys.readouterr().out


def test_callables_that_are_not_functions_are_blocked_too(hidden, capsys):
    import functools

    def library_add(a, b, scale=1):
        grading.guard("ops.add")
        return (a + b) * scale

    with pytest.raises(AssertionError):
        grading.run_hidden_tests("labX", "add", {"add": functools.partial(library_add, scale=1)}, blocked=("ops.add",))
    assert "unavailable while this part is graded" in capsys.readouterr().out


def test_lab01_blocks():
    # what each part of lab 01 bans; the performance part checks and times the student's own attention
    assert set(grading.BLOCKED_DURING[("lab01", "performance")]) == {"attention.attention", grading.TORCH_SDPA}
    for part in ("attention", "block"):
        assert grading.TORCH_SDPA in grading.BLOCKED_DURING[("lab01", part)]
    for part in ("rmsnorm", "swiglu"):
        assert grading.TORCH_SDPA not in grading.BLOCKED_DURING[("lab01", part)]
