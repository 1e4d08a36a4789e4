"""Shared pieces of lab 04's hidden tests. Every assertion carries a message: with --assert=plain
(how effml_lib.grading runs these files) the message is all a student sees."""

import pytest
import torch
import torch.nn.functional as F


def _close(actual, expected, atol, rtol):
    """True when the shapes match and every element is within atol + rtol * |expected|."""
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    return bool(torch.isclose(actual.double(), expected.double(), atol=atol, rtol=rtol).all())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2026)


@pytest.fixture
def close():
    """``close(actual, expected, atol, rtol)``: a fixture, so test files need no import path."""
    return _close


def _sdpa_repeated(q, k, v, causal=True):
    """PyTorch's SDPA with K/V repeated to every query head, in float64; the causal mask end-aligned."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(n_rep, 1), v.double().repeat_interleave(n_rep, 1)
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask)


@pytest.fixture
def sdpa_repeated():
    return _sdpa_repeated
