"""Lab 02, part 2: apply_rope(x, cos, sin, positions=None, interleaved=False).

Each test is one input form, and its message names the form and what was expected of it (never the
values of the inputs): positions None, (T,) unsorted with repeats, (B, T), a decode step's (B, 1);
both pairings; tables of another base; a non-contiguous x left unchanged; bfloat16 and float16."""

import pytest
import torch

from effml_lib.rope import rope_frequencies
from trusted import describe

PAIRINGS = [False, True]
PAIRING_IDS = ["half_split", "interleaved"]


def tables(head_dim, max_positions, theta=10000.0):
    return rope_frequencies(head_dim, max_positions, theta)  # the library's, called by the test itself


def shape_ok(out, x):
    return isinstance(out, torch.Tensor) and out.shape == x.shape


@pytest.mark.parametrize("interleaved", PAIRINGS, ids=PAIRING_IDS)
def test_default_positions(student, gen, close, exact, interleaved):
    x = torch.randn(2, 3, 7, 16, generator=gen)
    cos, sin = tables(16, 32)
    out = student.apply_rope(x, cos, sin, interleaved=interleaved)
    assert shape_ok(out, x), f"output shape should be x's, {tuple(x.shape)}, got {describe(out)}"
    assert close(out, exact(x, torch.arange(7), interleaved=interleaved), 1e-5, 1e-5), (
        f"wrong rotation with positions=None and interleaved={interleaved}: token t is at position t "
        f"(rows 0..T-1 of tables longer than T)")


@pytest.mark.parametrize("interleaved", PAIRINGS, ids=PAIRING_IDS)
def test_arbitrary_unsorted_positions(student, gen, close, exact, interleaved):
    x = torch.randn(1, 4, 5, 32, generator=gen)
    positions = torch.tensor([100, 3, 57, 57, 0])  # any order, repeats allowed
    cos, sin = tables(32, 128)
    out = student.apply_rope(x, cos, sin, positions, interleaved=interleaved)
    assert shape_ok(out, x), f"output shape should be x's, {tuple(x.shape)}, got {describe(out)}"
    assert close(out, exact(x, positions, interleaved=interleaved), 1e-5, 1e-5), (
        f"wrong rotation with positions of shape (T,), unsorted and with repeats, interleaved={interleaved}: "
        f"token t must use row positions[t] of cos and sin")


@pytest.mark.parametrize("interleaved", PAIRINGS, ids=PAIRING_IDS)
def test_positions_per_sequence(student, gen, close, exact, interleaved):
    x = torch.randn(3, 2, 4, 8, generator=gen)  # B != H
    positions = torch.tensor([[0, 1, 2, 3], [60, 61, 62, 63], [9, 40, 2, 17]])  # (B, T)
    cos, sin = tables(8, 64)
    out = student.apply_rope(x, cos, sin, positions, interleaved=interleaved)
    assert shape_ok(out, x), f"output shape should be x's, {tuple(x.shape)}, got {describe(out)}"
    assert close(out, exact(x, positions, interleaved=interleaved), 1e-5, 1e-5), (
        f"wrong rotation with positions of shape (B, T), interleaved={interleaved}: row b gives sequence b's "
        f"positions (token t of sequence b is at positions[b, t]), the same for every head of that sequence")


def test_decode_step(student, gen, close, exact):
    x = torch.randn(4, 6, 1, 64, generator=gen)  # one new token per sequence
    cache_lengths = torch.tensor([[17], [250], [0], [1023]])  # (B, 1)
    cos, sin = tables(64, 1024)
    out = student.apply_rope(x, cos, sin, cache_lengths)
    assert shape_ok(out, x), f"output shape should be x's, {tuple(x.shape)}, got {describe(out)}"
    assert close(out, exact(x, cache_lengths), 1e-4, 1e-4), (
        "wrong rotation for a decode step, x (B, H, 1, D) with positions (B, 1): sequence b's new token is at "
        "positions[b, 0], for every head")


@pytest.mark.parametrize("interleaved", PAIRINGS, ids=PAIRING_IDS)
def test_tables_of_another_base(student, gen, close, exact, interleaved):
    x = torch.randn(2, 2, 6, 16, generator=gen)
    positions = torch.tensor([5, 0, 300, 17, 17, 2])
    cos, sin = tables(16, 512, theta=500000.0)
    out = student.apply_rope(x, cos, sin, positions, interleaved=interleaved)
    assert shape_ok(out, x), f"output shape should be x's, {tuple(x.shape)}, got {describe(out)}"
    assert close(out, exact(x, positions, theta=500000.0, interleaved=interleaved), 1e-5, 1e-5), (
        f"wrong rotation with tables of another base (theta), interleaved={interleaved}: rotate by the rows of "
        f"the cos and sin given, not by angles of your own")


def test_strided_input_and_no_change_in_place(student, gen, close, exact):
    x = torch.randn(2, 5, 3, 16, generator=gen).transpose(1, 2)  # (B, H, T, D) view of (B, T, H, D)
    before = x.clone()
    cos, sin = tables(16, 8)
    out = student.apply_rope(x, cos, sin)
    assert torch.equal(x, before), "apply_rope must not change its input in place"
    assert shape_ok(out, x), f"output shape should be x's, {tuple(x.shape)}, got {describe(out)}"
    assert close(out, exact(before, torch.arange(5)), 1e-5, 1e-5), (
        "wrong rotation of a non-contiguous x (a (B, H, T, D) view of a (B, T, H, D) tensor), positions=None")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(student, gen, close, exact, dtype):
    x = (torch.randn(1, 2, 9, 32, generator=gen) * 4).to(dtype)
    positions = torch.arange(1000, 1009)
    cos, sin = tables(32, 2048)
    out = student.apply_rope(x, cos, sin, positions)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype, f"output dtype should be x's, {dtype}, got {describe(out)}"
    assert shape_ok(out, x), f"output shape should be x's, {tuple(x.shape)}, got {describe(out)}"
    assert close(out, exact(x.float(), positions), 6e-2, 2e-2), (
        f"wrong rotation of x in {dtype} at late positions (T,): compute in float32 and cast the result back once")
