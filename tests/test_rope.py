import math

import pytest
import torch

from effml_lib.rope import apply_rope, rope_frequencies


def complex_rope(x, positions, theta=10000.0, interleaved=False):
    """Independent reference: pairs as complex numbers multiplied by e^{i * pos * freq}, in float64."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (D/2,)
    angles = positions.double()[..., None] * freqs  # (..., T, D/2)
    xd = x.double()
    if interleaved:
        z = torch.complex(xd[..., 0::2], xd[..., 1::2])
    else:
        z = torch.complex(xd[..., : d // 2], xd[..., d // 2 :])
    z = z * torch.polar(torch.ones_like(angles), angles)
    if interleaved:
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_complex_multiplication(interleaved, gen):
    x = torch.randn(2, 3, 10, 16, generator=gen)
    cos, sin = rope_frequencies(16, 64)
    got = apply_rope(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(got.double(), complex_rope(x, torch.arange(10), interleaved=interleaved), atol=1e-5, rtol=1e-5)


def test_arbitrary_positions_per_batch(gen):
    x = torch.randn(2, 2, 3, 8, generator=gen)
    positions = torch.tensor([[5, 9, 40], [0, 1, 63]])
    cos, sin = rope_frequencies(8, 64)
    got = apply_rope(x, cos, sin, positions=positions)
    expected = torch.stack([complex_rope(x[b], positions[b]) for b in range(2)])
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_scores_depend_only_on_relative_position(gen):
    q = torch.randn(1, 1, 1, 32, generator=gen)
    k = torch.randn(1, 1, 1, 32, generator=gen)
    cos, sin = rope_frequencies(32, 256)
    def score(m, n):
        qm = apply_rope(q, cos, sin, positions=torch.tensor([m]))
        kn = apply_rope(k, cos, sin, positions=torch.tensor([n]))
        return (qm * kn).sum().item()
    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_scaling_variants():
    cos, _ = rope_frequencies(8, 32, scaling={"type": "linear", "factor": 4})
    cos_ref, _ = rope_frequencies(8, 32)
    torch.testing.assert_close(cos[8], cos_ref[2])  # position 8 interpolated to 2
    # NTK-aware scaling: the fastest rotation is untouched, the slowest one turns exactly `factor` times slower
    cos_ntk, sin_ntk = rope_frequencies(8, 32, theta=10000.0, scaling={"type": "ntk", "factor": 4})
    cos_ref, sin_ref = rope_frequencies(8, 32, theta=10000.0)
    angle_ntk = torch.atan2(sin_ntk[1], cos_ntk[1])  # radians per position, one per pair
    angle_ref = torch.atan2(sin_ref[1], cos_ref[1])
    torch.testing.assert_close(angle_ntk[0], angle_ref[0])
    torch.testing.assert_close(angle_ntk[-1], angle_ref[-1] / 4)
    assert (angle_ntk[1:-1] < angle_ref[1:-1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_rotate_in_float32(dtype, gen):
    x = torch.randn(1, 2, 5, 16, generator=gen).to(dtype)
    cos, sin = rope_frequencies(16, 8)
    got = apply_rope(x, cos, sin)
    assert got.dtype == dtype
    expected = complex_rope(x.float(), torch.arange(5)).to(dtype)
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(7, 10)
    cos, sin = rope_frequencies(8, 4)
    with pytest.raises(ValueError, match="exceeds"):
        apply_rope(torch.randn(1, 1, 5, 8), cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(torch.randn(1, 1, 2, 16), cos, sin)
    with pytest.raises(TypeError, match="positions"):
        apply_rope(torch.randn(1, 1, 2, 8), cos, sin, positions=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="scaling"):
        rope_frequencies(8, 4, scaling={"type": "yarn", "factor": 2})
    with pytest.raises(TypeError, match="scaling must be a dict"):
        rope_frequencies(8, 4, scaling="linear")
    with pytest.raises(ValueError, match="head_dim > 2"):
        rope_frequencies(2, 4, scaling={"type": "ntk", "factor": 2})
    with pytest.raises(TypeError, match="floating-point"):
        apply_rope(torch.ones(1, 1, 2, 8, dtype=torch.long), cos, sin)
    with pytest.raises(ValueError, match="batch size"):
        apply_rope(torch.randn(2, 1, 2, 8), cos, sin, positions=torch.zeros(3, 2, dtype=torch.long))
