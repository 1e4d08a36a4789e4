"""Lab 01, part 1: attention(q, k, v, causal=True, mask=None) -> (B, H, Tq, D): the causal mask aligned to
the end of the keys, a boolean mask combined with it, a query with no visible key giving zeros."""

import math

import pytest
import torch
from trusted import describe


def reference(q, k, v, causal=True, mask=None):
    """A slow, obviously correct loop in float64: one query at a time, over the keys it may see."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    allowed = torch.ones(b, h, tq, tk, dtype=torch.bool)
    if mask is not None:
        allowed &= torch.broadcast_to(mask, (b, h, tq, tk))
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                seen = [j for j in range(tk) if allowed[bi, hi, i, j] and (not causal or j <= tk - tq + i)]
                if not seen:
                    continue  # no visible key: zeros
                scores = k[bi, hi, seen].double() @ q[bi, hi, i].double() / math.sqrt(d)  # (len(seen),)
                out[bi, hi, i] = scores.softmax(-1) @ v[bi, hi, seen].double()
    return out


def qkv(gen, b, h, tq, tk, d, dtype=torch.float32):
    q = torch.randn(b, h, tq, d, generator=gen)
    k, v = torch.randn(b, h, tk, d, generator=gen), torch.randn(b, h, tk, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("b,h,t,d", [(1, 1, 1, 4), (2, 3, 7, 8), (1, 6, 33, 64)])
def test_causal_square(student, gen, close, b, h, t, d):
    q, k, v = qkv(gen, b, h, t, t, d)
    out = student.attention(q, k, v)
    assert close(out, reference(q, k, v), 1e-5, 1e-4), f"causal attention: wrong output for q, k, v of shape {(b, h, t, d)}"


@pytest.mark.parametrize("tq,tk", [(1, 9), (3, 10), (4, 5)])
def test_fewer_queries_than_keys(student, gen, close, tq, tk):
    q, k, v = qkv(gen, 2, 2, tq, tk, 8)
    out = student.attention(q, k, v)
    assert close(out, reference(q, k, v), 1e-5, 1e-4), (
        f"wrong output with {tq} queries and {tk} keys: the last query sits at the last key's position "
        f"and may see every key")


@pytest.mark.parametrize("tq,tk", [(5, 5), (2, 7)])
def test_not_causal(student, gen, close, tq, tk):
    q, k, v = qkv(gen, 2, 3, tq, tk, 8)
    out = student.attention(q, k, v, causal=False)
    assert close(out, reference(q, k, v, causal=False), 1e-5, 1e-4), (
        f"causal=False with {tq} queries and {tk} keys: every query sees every key")


# Each broadcast form of the mask the lab names, as a function of (B, H, Tq, Tk)
MASKS = {
    "one pattern (Tq, Tk)": lambda g, b, h, tq, tk: torch.rand(tq, tk, generator=g) < 0.7,
    "keys per sequence (B, 1, 1, Tk)": lambda g, b, h, tq, tk: torch.rand(b, 1, 1, tk, generator=g) < 0.7,
    "full (B, H, Tq, Tk)": lambda g, b, h, tq, tk: torch.rand(b, h, tq, tk, generator=g) < 0.7,
    "keys (Tk,)": lambda g, b, h, tq, tk: torch.rand(tk, generator=g) < 0.7,
}


@pytest.mark.parametrize("form", list(MASKS))
@pytest.mark.parametrize("causal", [False, True])
def test_masks(student, gen, close, form, causal):
    b, h, tq, tk = 2, 2, 4, 6
    q, k, v = qkv(gen, b, h, tq, tk, 8)
    mask = MASKS[form](gen, b, h, tq, tk)
    mask[..., -1] = True  # every query may see the last key: rows with no key are their own test
    out = student.attention(q, k, v, causal=causal, mask=mask)
    assert close(out, reference(q, k, v, causal, mask), 1e-5, 1e-4), (
        f"mask of shape {tuple(mask.shape)} ({form}), causal={causal}, {tq} queries, {tk} keys: a key counts only "
        f"where the mask is True" + (" and the causal mask allows it" if causal else ""))


def test_queries_with_no_visible_key_give_zeros(student, gen, close):
    q, k, v = qkv(gen, 2, 2, 4, 4, 8)
    padding = torch.tensor([[True] * 4, [False, False, False, True]])[:, None, None, :]  # (B, 1, 1, Tk)
    out = student.attention(q, k, v, mask=padding)
    assert torch.isfinite(out).all(), (
        "queries that may see no key (causal and the mask together hide every key) gave inf/NaN: expected zeros")
    assert close(out, reference(q, k, v, True, padding), 1e-5, 1e-4), (
        "a left-padded batch, mask (B, 1, 1, Tk): rows with no visible key must be zeros, the others as usual")


def test_future_keys_do_not_matter(student, gen, close):
    q, k, v = qkv(gen, 1, 2, 6, 6, 8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:] += 100.0
    v2[:, :, 4:] -= 100.0
    a, b = student.attention(q, k, v), student.attention(q, k2, v2)
    assert close(b[:, :, :4], a[:, :, :4], 1e-5, 1e-5), "changing keys 4.. changed the output of queries 0..3"


def test_large_scores_stay_finite(student, gen, close):
    q, k = 30 * torch.randn(1, 1, 5, 16, generator=gen), 30 * torch.randn(1, 1, 5, 16, generator=gen)
    v = torch.randn(1, 1, 5, 16, generator=gen)
    out = student.attention(q, k, v)
    assert torch.isfinite(out).all(), "large scores gave inf/NaN: subtract the row maximum before exp"
    assert close(out, reference(q, k, v), 1e-4, 1e-3), "wrong output for large scores"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(student, gen, close, dtype):
    q, k, v = qkv(gen, 1, 2, 8, 8, 16, dtype)
    out = student.attention(q, k, v)
    assert out.dtype == dtype, f"output dtype should be the input's ({dtype}), got {describe(out)}"
    assert close(out, reference(q, k, v), 2e-2, 2e-2), f"wrong output for {dtype} inputs: compute the softmax in float32"
