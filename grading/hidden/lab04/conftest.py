"""Shared pieces of lab 04's hidden tests. Every assertion carries a message: with --assert=plain
(how grading/trusted.py runs these files) the message is all a student sees. The fixtures
student, gen, close, value_error, timing and form come from grading/trusted.py, shared by every lab."""

import pytest
import torch
import torch.nn.functional as F


def _repeated_heads(q, k, v, causal=True, mask=None):
    """The definition, in float64, by PyTorch's SDPA with K/V repeated to every query head: the causal
    mask end-aligned (query i sees keys 0 .. Tk - Tq + i), ``mask`` (True = may attend, broadcast to
    (B, H, Tq, Tk)) combined with it, and a query with no allowed key gives zeros."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(n_rep, 1), v.double().repeat_interleave(n_rep, 1)  # (B, H, Tk, D)
    (b, h, tq, _), tk = q.shape, k.shape[2]
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(tk - tq)
    if mask is not None:
        allowed = allowed & mask
    allowed = allowed.expand(b, h, tq, tk)
    out = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=allowed)
    return torch.where(allowed.any(-1, keepdim=True), out, 0.0)  # (B, H, Tq, D); no allowed key: zeros


@pytest.fixture
def repeated_heads():
    return _repeated_heads
