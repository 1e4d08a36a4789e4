"""Lab 02's hidden suites (grading/hidden/lab02) pass the solution and fail realistic mistakes; a mistake
that ignores an input form (positions (B, T), a pairing, a scaling, a direction...) fails the part's
visible tests too, so a student finds it before submitting."""

import pytest
import torch

from conftest import assert_part_fails, assert_part_passes, assert_visible_fails, lab_solution, visible_failure

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

LAB = "lab02_rope"
PARTS = ["frequencies", "apply_rope", "conversion", "distance", "performance"]


@pytest.fixture(scope="module")
def solution():
    return lab_solution(LAB)


def fails(part, namespace, mistake):
    """The part's hidden tests must reject a submission with ``mistake``."""
    return assert_part_fails("lab02", part, namespace, mistake)


def fails_both(part, namespace, mistake):
    """An input form handled wrong: the hidden tests reject it, and so do the part's visible tests."""
    fails(part, namespace, mistake)
    return assert_visible_fails(LAB, part, namespace, mistake)


@pytest.mark.parametrize("part", PARTS)
def test_solution_passes(part, solution):
    assert_part_passes("lab02", part, dict(solution))


@pytest.mark.parametrize("part", PARTS[:4])
def test_solution_passes_the_visible_tests(part, solution):
    assert visible_failure(LAB, part, dict(solution)) is None


# --- part 1: rope_frequencies ---------------------------------------------------------------------

def test_frequency_exponent_without_the_two(solution):
    def rope_frequencies(head_dim, max_positions, theta=10000.0, scaling=None):
        inv_freq = 1.0 / theta ** (torch.arange(head_dim // 2, dtype=torch.float32) / head_dim)  # i/D, not 2i/D
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        return angles.cos(), angles.sin()
    fails_both("frequencies", dict(solution, rope_frequencies=rope_frequencies), "wrong angles")


FREQUENCY_MISTAKES = ["linear multiplies", "ntk scales theta by the factor", "scaling ignored", "ntk ignored",
                      "linear factor truncated to an int", "theta ignored", "angles in bfloat16"]


@pytest.mark.parametrize("mistake", FREQUENCY_MISTAKES)
def test_frequency_input_forms(solution, mistake):
    correct = solution["rope_frequencies"]

    def rope_frequencies(head_dim, max_positions, theta=10000.0, scaling=None):
        kind = None if scaling is None else scaling["type"]
        if mistake == "theta ignored":
            return correct(head_dim, max_positions, 10000.0, scaling)
        if mistake == "angles in bfloat16":
            positions = torch.arange(max_positions, dtype=torch.bfloat16)
            inv_freq = (1.0 / theta ** (torch.arange(0, head_dim, 2) / head_dim)).bfloat16()
            angles = torch.outer(positions, inv_freq).float()
            return angles.cos(), angles.sin()
        if kind is None or mistake == "scaling ignored" or (kind == "ntk" and mistake == "ntk ignored"):
            return correct(head_dim, max_positions, theta)
        factor = scaling["factor"]
        if kind == "linear" and mistake == "linear multiplies":  # positions multiplied, not divided
            cos, sin = correct(head_dim, max_positions * int(factor + 1), theta)
            step = int(factor) if float(factor).is_integer() else 1
            return cos[::step][:max_positions], sin[::step][:max_positions]
        if kind == "linear" and mistake == "linear factor truncated to an int":
            return correct(head_dim, max_positions, theta, {"type": "linear", "factor": int(factor)})
        if kind == "ntk" and mistake == "ntk scales theta by the factor":
            return correct(head_dim, max_positions, theta * factor)
        return correct(head_dim, max_positions, theta, scaling)
    fails_both("frequencies", dict(solution, rope_frequencies=rope_frequencies), mistake)


# --- part 2: apply_rope ------------------------------------------------------------------------------

ROPE_MISTAKES = [
    "pairing ignored (always half-split)",
    "positions ignored",
    "positions (B, T) ignored: sequence 0's row for every sequence",
    "positions (B, T) broadcast over the heads axis instead of the batch axis",
    "positions=None takes the whole table",
    "cos/sin ignored: angles recomputed with theta 10000",
    "rotates x in place",
    "result left in float32",
    "always returns bfloat16 for low precision",
]


@pytest.mark.parametrize("mistake", ROPE_MISTAKES)
def test_apply_rope_input_forms(solution, mistake):
    correct = solution["apply_rope"]
    frequencies = solution["rope_frequencies"]

    def apply_rope(x, cos, sin, positions=None, interleaved=False):
        if mistake.startswith("pairing ignored"):
            return correct(x, cos, sin, positions, False)
        if mistake == "positions ignored":
            return correct(x, cos, sin, None, interleaved)
        if mistake.startswith("positions (B, T) ignored") and positions is not None and positions.dim() == 2:
            return correct(x, cos, sin, positions[0], interleaved)
        if mistake.startswith("positions (B, T) broadcast") and positions is not None and positions.dim() == 2:
            c, s = cos[positions][None], sin[positions][None]  # (1, B, T, D/2): B lines up with the heads
            return _rotate_with(x, c, s, interleaved)
        if mistake == "positions=None takes the whole table" and positions is None:
            return _rotate_with(x, cos, sin, interleaved)
        if mistake.startswith("cos/sin ignored"):
            table_cos, table_sin = frequencies(x.shape[-1], max(cos.shape[0], 1))
            return correct(x, table_cos, table_sin, positions, interleaved)
        if mistake == "rotates x in place":
            out = correct(x, cos, sin, positions, interleaved)
            return x.copy_(out) if x.dtype == torch.float32 else out  # x.float() of a float32 x is x itself
        if mistake == "result left in float32":
            return correct(x.float(), cos, sin, positions, interleaved)
        if mistake == "always returns bfloat16 for low precision" and x.dtype != torch.float32:
            return correct(x, cos, sin, positions, interleaved).bfloat16()
        return correct(x, cos, sin, positions, interleaved)
    fails_both("apply_rope", dict(solution, apply_rope=apply_rope), mistake)


def _rotate_with(x, c, s, interleaved):
    """The rotation with cos/sin rows ``c``, ``s`` as given, broadcast however they broadcast."""
    xf = x.float()
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
    r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return out.to(x.dtype)


def test_demo_class_wrong_answer_fails_the_visible_tests_first_on_the_pairing(solution):
    """tests/test_labs.py's student loop expects this message from the demo class's wrong answer."""
    correct = solution["apply_rope"]
    namespace = dict(solution, apply_rope=lambda x, cos, sin, positions=None, interleaved=False:
                     correct(x, cos, sin, positions, False))
    assert "interleaved: pairs (2i, 2i+1)" in assert_visible_fails(LAB, "apply_rope", namespace, "always half-split")


# --- part 3: permute_qk_weight -------------------------------------------------------------------------

CONVERSION_MISTAKES = [
    "only to='half_split' implemented (to ignored)",
    "only to='interleaved' implemented (to ignored)",
    "the inverse returned for each `to`",
    "permutation applied across heads instead of within each head",
    "a bias (1-D) not handled",
    "any other `to` treated as 'interleaved'",
]


@pytest.mark.parametrize("mistake", CONVERSION_MISTAKES)
def test_conversion_input_forms(solution, mistake):
    correct = solution["permute_qk_weight"]

    def permute_qk_weight(weight, n_heads, to="half_split"):
        if mistake.startswith("only to='half_split'"):
            return correct(weight, n_heads, "half_split")
        if mistake.startswith("only to='interleaved'"):
            return correct(weight, n_heads, "interleaved")
        if mistake.startswith("the inverse"):
            return correct(weight, n_heads, {"half_split": "interleaved", "interleaved": "half_split"}.get(to, to))
        if mistake.startswith("permutation applied across heads"):  # one permutation over all rows
            return correct(weight, 1, to)
        if mistake.startswith("a bias"):
            in_features = weight.shape[1]  # IndexError for a bias
            return correct(weight.reshape(-1, in_features), n_heads, to)
        if mistake.startswith("any other `to`"):
            return correct(weight, n_heads, "half_split" if to == "half_split" else "interleaved")
        return correct(weight, n_heads, to)
    fails_both("conversion", dict(solution, permute_qk_weight=permute_qk_weight), mistake)


# --- part 4: score_by_distance ---------------------------------------------------------------------------

def test_distance_by_rotating_the_key(solution):
    apply_rope = solution["apply_rope"]

    def score_by_distance(q, k, cos, sin):  # q . R_d k is the score at distance -d
        k_at_d = apply_rope(k.expand(1, 1, cos.shape[0], -1), cos, sin)
        return k_at_d[0, 0].float() @ q.float()
    fails_both("distance", dict(solution, score_by_distance=score_by_distance), "key rotated")


def test_distance_scores_left_in_the_inputs_dtype(solution):
    apply_rope = solution["apply_rope"]

    def score_by_distance(q, k, cos, sin):  # bfloat16 q and k give bfloat16 scores
        return apply_rope(q.expand(1, 1, cos.shape[0], -1), cos, sin)[0, 0] @ k
    fails_both("distance", dict(solution, score_by_distance=score_by_distance), "bfloat16 scores")


def test_wrong_or_missing_answer(solution):
    fails("distance", dict(solution, peak_distance=0), "typed 0")
    fails("distance", dict(solution, peak_distance=None), "unanswered")


# --- part 5: speed --------------------------------------------------------------------------------------

def test_slow_loop_over_positions(solution):
    correct = solution["apply_rope"]

    def apply_rope(x, cos, sin, positions=None, interleaved=False):
        out = torch.empty_like(x)
        for t in range(x.shape[2]):
            p = torch.tensor([t]) if positions is None else positions[..., t:t + 1]
            out[:, :, t:t + 1] = correct(x[:, :, t:t + 1], cos, sin, p, interleaved)
        return out
    fails("performance", dict(solution, apply_rope=apply_rope), "loop")


# --- the check itself ------------------------------------------------------------------------------------

def test_a_visible_test_that_misses_a_form_is_caught(solution, monkeypatch):
    """Break the visible tests on purpose (drop part 2's (B, T) checks): the (B, T) mistake then passes
    them, and assert_visible_fails says so."""
    helpers = visible_failure.__globals__  # tests/conftest.py's, as imported above (a later import may be another copy)
    cells = helpers["_lab_cells"](LAB)
    cell = next(c for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == "p2_visible")
    for checked in ('check_rotation(f"positions of shape (B, T)', 'check_rotation("a decode step'):
        assert checked in cell.source, f"part 2's visible cell no longer has {checked!r}: update this test"
        cell.source = cell.source.replace(checked, checked.replace("check_rotation(", "(lambda *args: None)("))
    monkeypatch.setitem(helpers, "_lab_cells", lambda name: cells)
    correct = solution["apply_rope"]
    namespace = dict(solution, apply_rope=lambda x, cos, sin, positions=None, interleaved=False: correct(
        x, cos, sin, positions[0] if positions is not None and positions.dim() == 2 else positions, interleaved))
    with pytest.raises(pytest.fail.Exception, match="visible tests pass an answer"):
        assert_visible_fails(LAB, "apply_rope", namespace, "positions (B, T) ignored")
