"""Shared pieces of lab 04's hidden tests. Every assertion carries a message: with --assert=plain
(how grading/trusted.py runs these files) the message is all a student sees. The fixtures
student, gen, close, value_error and timing come from grading/trusted.py, shared by every lab."""

import pytest
import torch
import torch.nn.functional as F


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
