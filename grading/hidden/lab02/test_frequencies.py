"""Lab 02, part 1: rope_frequencies(head_dim, max_positions, theta=10000.0, scaling=None) -> (cos, sin)."""

import pytest
import torch

from trusted import describe


def exact_tables(head_dim, max_positions, theta=10000.0, position_scale=1.0):
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64) * position_scale, inv_freq)
    return angles.cos(), angles.sin()


def angle_tolerance(max_positions):
    """float32 angles are off by about position x 2^-24 radians: the tables may be too."""
    return 1e-6 + 4 * max_positions * 2.0**-24


def check(student, close, head_dim, max_positions, expected, form, rule, **kwargs):
    """``form``: the input form in words (never the values); ``rule``: what the angles should be."""
    tables = student.rope_frequencies(head_dim, max_positions, **kwargs)
    shape = (max_positions, head_dim // 2)
    assert isinstance(tables, (tuple, list)) and len(tables) == 2, (
        f"rope_frequencies should return a tuple (cos, sin), got {describe(tables)}")
    cos, sin = tables
    assert isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.shape == shape and sin.shape == shape, (
        f"rope_frequencies(head_dim={head_dim}, max_positions={max_positions}) should return cos and sin of shape "
        f"{shape}, got {describe(cos)} and {describe(sin)}")
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32, (
        f"the tables should be float32, got {cos.dtype} and {sin.dtype}")
    tol = angle_tolerance(max_positions)
    assert close(cos, expected[0], tol, 0) and close(sin, expected[1], tol, 0), (
        f"wrong angles with {form} (head_dim {head_dim}, {max_positions} positions): {rule}")


ANGLE = "row m, column i holds the cosine and sine of m * theta^(-2i / head_dim)"


@pytest.mark.parametrize("head_dim,max_positions,theta", [(64, 128, 10000.0), (128, 4096, 500000.0), (2, 5, 10000.0), (6, 9, 100.0)],
                         ids=["head_dim64", "head_dim128-long-tables-another-theta", "head_dim2-one-pair", "head_dim6-another-theta"])
def test_angles(student, close, head_dim, max_positions, theta):
    check(student, close, head_dim, max_positions, exact_tables(head_dim, max_positions, theta),
          "theta given", f"{ANGLE}, with the theta given, angles computed in float32 or better", theta=theta)


def test_default_theta_is_ten_thousand(student, close):
    check(student, close, 16, 32, exact_tables(16, 32, 10000.0), "no theta given", f"theta defaults to 10000; {ANGLE}")


@pytest.mark.parametrize("factor", [4, 2.5], ids=["integer-factor", "non-integer-factor"])
def test_linear_scaling_divides_positions(student, close, factor):
    form = "linear scaling by " + ("an integer" if float(factor).is_integer() else "a non-integer") + " factor s"
    check(student, close, 32, 64, exact_tables(32, 64, position_scale=1 / factor), form,
          "position m gets the angles of position m / s", scaling={"type": "linear", "factor": factor})


@pytest.mark.parametrize("factor", [4, 8], ids=["smaller-factor", "larger-factor"])
def test_ntk_scaling_raises_the_base(student, close, factor):
    head_dim = 64
    theta = 10000.0 * factor ** (head_dim / (head_dim - 2))
    check(student, close, head_dim, 256, exact_tables(head_dim, 256, theta), "NTK scaling by a factor s",
          "positions stay, the base becomes theta * s^(head_dim / (head_dim - 2))", scaling={"type": "ntk", "factor": factor})


def test_ntk_keeps_the_fastest_pair_and_slows_the_slowest_by_the_factor(student, close):
    cos, sin = student.rope_frequencies(32, 4, scaling={"type": "ntk", "factor": 4})
    base_cos, base_sin = student.rope_frequencies(32, 4)
    step = torch.atan2(sin[1].double(), cos[1].double())  # radians per position, one per pair
    base_step = torch.atan2(base_sin[1].double(), base_cos[1].double())
    assert abs(step[0] - base_step[0]) < 1e-6, "NTK scaling must leave the fastest pair (i = 0) unchanged"
    assert abs(step[-1] - base_step[-1] / 4) < 1e-7, (
        "NTK scaling by a factor s must turn the slowest pair (i = head_dim/2 - 1) s times slower")
