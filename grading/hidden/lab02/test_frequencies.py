"""Lab 02, part 1: rope_frequencies(head_dim, max_positions, theta=10000.0, scaling=None) -> (cos, sin)."""

import pytest
import torch


def exact_tables(head_dim, max_positions, theta=10000.0, position_scale=1.0):
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64) * position_scale, inv_freq)
    return angles.cos(), angles.sin()


def angle_tolerance(max_positions):
    """float32 angles are off by about position x 2^-24 radians: the tables may be too."""
    return 1e-6 + 4 * max_positions * 2.0**-24


def check(student, close, head_dim, max_positions, expected, **kwargs):
    cos, sin = student.rope_frequencies(head_dim, max_positions, **kwargs)
    shape = (max_positions, head_dim // 2)
    assert isinstance(cos, torch.Tensor) and cos.shape == shape and sin.shape == shape, (
        f"rope_frequencies({head_dim}, {max_positions}) should return cos and sin of shape {shape}")
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32, f"the tables should be float32, got {cos.dtype}"
    tol = angle_tolerance(max_positions)
    what = f"rope_frequencies({head_dim}, {max_positions}, {', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    assert close(cos, expected[0], tol, 0) and close(sin, expected[1], tol, 0), f"wrong angles from {what}"


@pytest.mark.parametrize("head_dim,max_positions,theta", [(64, 128, 10000.0), (128, 4096, 500000.0), (2, 5, 10000.0), (6, 9, 100.0)])
def test_angles(student, close, head_dim, max_positions, theta):
    check(student, close, head_dim, max_positions, exact_tables(head_dim, max_positions, theta), theta=theta)


def test_default_theta_is_ten_thousand(student, close):
    cos, sin = student.rope_frequencies(16, 32)
    expected = exact_tables(16, 32, 10000.0)
    assert close(cos, expected[0], 1e-5, 0) and close(sin, expected[1], 1e-5, 0), "theta defaults to 10000"


@pytest.mark.parametrize("factor", [4, 2.5])
def test_linear_scaling_divides_positions(student, close, factor):
    check(student, close, 32, 64, exact_tables(32, 64, position_scale=1 / factor),
          scaling={"type": "linear", "factor": factor})


@pytest.mark.parametrize("factor", [4, 8])
def test_ntk_scaling_raises_the_base(student, close, factor):
    head_dim = 64
    theta = 10000.0 * factor ** (head_dim / (head_dim - 2))
    check(student, close, head_dim, 256, exact_tables(head_dim, 256, theta), scaling={"type": "ntk", "factor": factor})


def test_ntk_keeps_the_fastest_pair_and_slows_the_slowest_by_the_factor(student, close):
    cos, sin = student.rope_frequencies(32, 4, scaling={"type": "ntk", "factor": 4})
    base_cos, base_sin = student.rope_frequencies(32, 4)
    step = torch.atan2(sin[1].double(), cos[1].double())  # radians per position, one per pair
    base_step = torch.atan2(base_sin[1].double(), base_cos[1].double())
    assert abs(step[0] - base_step[0]) < 1e-6, "NTK scaling must leave the fastest pair (i = 0) unchanged"
    assert abs(step[-1] - base_step[-1] / 4) < 1e-7, "NTK scaling by 4 must turn the slowest pair 4 times slower"
