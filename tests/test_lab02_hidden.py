"""Lab 02's hidden suites (grading/hidden/lab02) pass the solution and fail realistic mistakes."""

import pytest
import torch

from conftest import assert_part_fails, assert_part_passes, lab_solution

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

PARTS = ["frequencies", "apply_rope", "conversion", "distance", "performance"]


@pytest.fixture(scope="module")
def solution():
    return lab_solution("lab02_rope")


def fails(part, namespace, mistake):
    """The part's hidden tests must reject a submission with ``mistake``."""
    assert_part_fails("lab02", part, namespace, mistake)


@pytest.mark.parametrize("part", PARTS)
def test_solution_passes(part, solution):
    assert_part_passes("lab02", part, dict(solution))


# --- realistic mistakes, each must cost its part -----------------------------------------------

def test_frequency_exponent_without_the_two(solution):
    def rope_frequencies(head_dim, max_positions, theta=10000.0, scaling=None):
        inv_freq = 1.0 / theta ** (torch.arange(head_dim // 2, dtype=torch.float32) / head_dim)  # i/D, not 2i/D
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        return angles.cos(), angles.sin()
    fails("frequencies", dict(solution, rope_frequencies=rope_frequencies), "wrong angles")


@pytest.mark.parametrize("mistake", ["linear multiplies", "ntk scales theta by the factor", "scaling ignored"])
def test_scaling_mistakes(solution, mistake):
    correct = solution["rope_frequencies"]

    def rope_frequencies(head_dim, max_positions, theta=10000.0, scaling=None):
        if scaling is None or mistake == "scaling ignored":
            return correct(head_dim, max_positions, theta)
        if scaling["type"] == "linear":  # positions multiplied, not divided
            cos, sin = correct(head_dim, max_positions * int(scaling["factor"] + 1), theta)
            step = int(scaling["factor"]) if float(scaling["factor"]).is_integer() else 1
            return cos[::step][:max_positions], sin[::step][:max_positions]
        return correct(head_dim, max_positions, theta * scaling["factor"])
    fails("frequencies", dict(solution, rope_frequencies=rope_frequencies), mistake)


def test_pairing_ignored(solution):
    correct = solution["apply_rope"]
    fails("apply_rope", dict(solution, apply_rope=lambda x, cos, sin, positions=None, interleaved=False:
                             correct(x, cos, sin, positions, False)), "always half-split")


def test_positions_ignored(solution):
    correct = solution["apply_rope"]
    fails("apply_rope", dict(solution, apply_rope=lambda x, cos, sin, positions=None, interleaved=False:
                             correct(x, cos, sin, None, interleaved)), "positions ignored")


def test_result_left_in_float32(solution):
    correct = solution["apply_rope"]
    fails("apply_rope", dict(solution, apply_rope=lambda x, cos, sin, positions=None, interleaved=False:
                             correct(x.float(), cos, sin, positions, interleaved)), "float32 out")


def test_conversion_across_heads(solution):
    def interleaved_to_half_split(weight, n_heads):  # one permutation over all rows, ignoring heads
        n = weight.shape[0]
        return weight[torch.cat((torch.arange(0, n, 2), torch.arange(1, n, 2)))]
    fails("conversion", dict(solution, interleaved_to_half_split=interleaved_to_half_split), "across heads")


def test_distance_by_rotating_the_key(solution):
    apply_rope = solution["apply_rope"]

    def score_by_distance(q, k, cos, sin):  # q . R_d k is the score at distance -d
        k_at_d = apply_rope(k.expand(1, 1, cos.shape[0], -1), cos, sin)
        return k_at_d[0, 0].float() @ q.float()
    fails("distance", dict(solution, score_by_distance=score_by_distance), "key rotated")


def test_wrong_or_missing_answer(solution):
    fails("distance", dict(solution, peak_distance=0), "typed 0")
    fails("distance", dict(solution, peak_distance=None), "unanswered")


def test_slow_loop_over_positions(solution):
    correct = solution["apply_rope"]

    def apply_rope(x, cos, sin, positions=None, interleaved=False):
        out = torch.empty_like(x)
        for t in range(x.shape[2]):
            p = torch.tensor([t]) if positions is None else positions[..., t:t + 1]
            out[:, :, t:t + 1] = correct(x[:, :, t:t + 1], cos, sin, p, interleaved)
        return out
    fails("performance", dict(solution, apply_rope=apply_rope), "loop")
