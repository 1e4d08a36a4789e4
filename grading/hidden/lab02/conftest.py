"""Shared pieces of lab 02's hidden tests. Every assertion carries a message: with --assert=plain
(how grading/trusted.py runs these files) the message is all a student sees. The fixtures
student, gen, close, value_error, timing and form come from grading/trusted.py, shared by every lab."""

import pytest
import torch


def exact_rotation(x, positions, theta=10000.0, interleaved=False):
    """RoPE by its definition, in float64: pairs as complex numbers times e^{i * position * theta^(-2i/D)}.
    ``positions``: (T,) or (B, T) integers; x: (B, H, T, D)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (D/2,)
    angles = positions.double()[..., None] * inv_freq  # (T, D/2) or (B, T, D/2)
    if positions.dim() == 2:
        angles = angles[:, None]  # (B, 1, T, D/2)
    xd = x.double()
    first, second = (xd[..., 0::2], xd[..., 1::2]) if interleaved else xd.chunk(2, dim=-1)
    z = torch.complex(first, second) * torch.polar(torch.ones_like(angles), angles)
    if interleaved:
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.fixture
def exact():
    """``exact(x, positions, theta=..., interleaved=...)``: the float64 rotation the tests compare with."""
    return exact_rotation
