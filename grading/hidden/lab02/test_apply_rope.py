"""Lab 02, part 2: apply_rope(x, cos, sin, positions=None, interleaved=False)."""

import pytest
import torch

from effml_lib.rope import rope_frequencies
from trusted import describe

PAIRINGS = [False, True]
PAIRING_IDS = ["half_split", "interleaved"]


def tables(head_dim, max_positions, theta=10000.0):
    return rope_frequencies(head_dim, max_positions, theta)  # the library's, called by the test itself


@pytest.mark.parametrize("interleaved", PAIRINGS, ids=PAIRING_IDS)
def test_default_positions(student, gen, close, exact, interleaved):
    x = torch.randn(2, 3, 7, 16, generator=gen)
    cos, sin = tables(16, 32)
    out = student.apply_rope(x, cos, sin, interleaved=interleaved)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape, f"output shape should be {tuple(x.shape)}"
    assert close(out, exact(x, torch.arange(7), interleaved=interleaved), 1e-5, 1e-5), (
        f"wrong rotation with positions=None (interleaved={interleaved}): token t is at position t")


@pytest.mark.parametrize("interleaved", PAIRINGS, ids=PAIRING_IDS)
def test_arbitrary_unsorted_positions(student, gen, close, exact, interleaved):
    x = torch.randn(1, 4, 5, 32, generator=gen)
    positions = torch.tensor([100, 3, 57, 57, 0])  # any order, repeats allowed
    cos, sin = tables(32, 128)
    out = student.apply_rope(x, cos, sin, positions, interleaved=interleaved)
    assert close(out, exact(x, positions, interleaved=interleaved), 1e-5, 1e-5), (
        "wrong rotation for positions [100, 3, 57, 57, 0]: token t must use row positions[t] of cos/sin")


@pytest.mark.parametrize("interleaved", PAIRINGS, ids=PAIRING_IDS)
def test_positions_per_sequence(student, gen, close, exact, interleaved):
    x = torch.randn(3, 2, 4, 8, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3], [60, 61, 62, 63], [9, 40, 2, 17]])  # (B, T)
    cos, sin = tables(8, 64)
    out = student.apply_rope(x, cos, sin, positions, interleaved=interleaved)
    assert close(out, exact(x, positions, interleaved=interleaved), 1e-5, 1e-5), (
        "wrong rotation for positions of shape (B, T): sequence b, token t is at positions[b, t], for every head")


def test_decode_step(student, gen, close, exact):
    x = torch.randn(4, 6, 1, 64, generator=gen)  # one new token per sequence
    cache_lengths = torch.tensor([[17], [250], [0], [1023]])  # (B, 1)
    cos, sin = tables(64, 1024)
    out = student.apply_rope(x, cos, sin, cache_lengths)
    assert close(out, exact(x, cache_lengths), 1e-4, 1e-4), "wrong rotation for a decode step (T = 1, positions (B, 1))"


def test_strided_input_and_no_change_in_place(student, gen, close, exact):
    x = torch.randn(2, 5, 3, 16, generator=gen).transpose(1, 2)  # (B, H, T, D) view of (B, T, H, D)
    before = x.clone()
    cos, sin = tables(16, 8)
    out = student.apply_rope(x, cos, sin)
    assert torch.equal(x, before), "apply_rope must not change its input in place"
    assert close(out, exact(before, torch.arange(5)), 1e-5, 1e-5), "wrong rotation of a non-contiguous x"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(student, gen, close, exact, dtype):
    x = (torch.randn(1, 2, 9, 32, generator=gen) * 4).to(dtype)
    positions = torch.arange(1000, 1009)
    cos, sin = tables(32, 2048)
    out = student.apply_rope(x, cos, sin, positions)
    assert out.dtype == dtype, f"output dtype should be {dtype}, got {describe(out)}"
    assert close(out, exact(x.float(), positions), 6e-2, 2e-2), (
        f"wrong rotation in {dtype}: compute in float32 and cast the result back once")
