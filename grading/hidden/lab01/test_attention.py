"""Lab 01, part 1: causal_attention(q, k, v) -> (B, H, Tq, D), masking aligned to the end of the keys."""

import math

import pytest
import torch
from trusted import describe



def reference(q, k, v):
    """A slow, obviously correct loop in float64."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for i in range(tq):
        visible = tk - tq + i + 1  # query i sits at position tk - tq + i
        scores = torch.einsum("bhd,bhkd->bhk", q[:, :, i].double(), k[:, :, :visible].double()) / math.sqrt(d)
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), v[:, :, :visible].double())
    return out


@pytest.mark.parametrize("b,h,t,d", [(1, 1, 1, 4), (2, 3, 7, 8), (1, 6, 33, 64)])
def test_prefill_shapes(student, gen, close, b, h, t, d):
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
    out = student.causal_attention(q, k, v)
    assert close(out, reference(q, k, v), 1e-5, 1e-4), f"wrong output for q, k, v of shape {(b, h, t, d)}"


@pytest.mark.parametrize("tq,tk", [(1, 9), (3, 10), (4, 5)])
def test_fewer_queries_than_keys(student, gen, close, tq, tk):
    q = torch.randn(2, 2, tq, 8, generator=gen)
    k, v = torch.randn(2, 2, tk, 8, generator=gen), torch.randn(2, 2, tk, 8, generator=gen)
    out = student.causal_attention(q, k, v)
    assert close(out, reference(q, k, v), 1e-5, 1e-4), (
        f"wrong output with {tq} queries and {tk} keys: the last query sits at the last key's position "
        f"and may see every key"
    )


def test_future_keys_do_not_matter(student, gen, close):
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:] += 100.0
    v2[:, :, 4:] -= 100.0
    a, b = student.causal_attention(q, k, v), student.causal_attention(q, k2, v2)
    assert close(b[:, :, :4], a[:, :, :4], 1e-5, 1e-5), "changing keys 4.. changed the output of queries 0..3"


def test_large_scores_stay_finite(student, gen, close):
    q = 30 * torch.randn(1, 1, 5, 16, generator=gen)
    k = 30 * torch.randn(1, 1, 5, 16, generator=gen)
    v = torch.randn(1, 1, 5, 16, generator=gen)
    out = student.causal_attention(q, k, v)
    assert torch.isfinite(out).all(), "large scores gave inf/NaN: subtract the row maximum before exp"
    assert close(out, reference(q, k, v), 1e-4, 1e-3), "wrong output for large scores"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(student, gen, close, dtype):
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen).to(dtype) for _ in range(3))
    out = student.causal_attention(q, k, v)
    assert out.dtype == dtype, f"output dtype should be the input's ({dtype}), got {describe(out)}"
    assert close(out, reference(q, k, v), 2e-2, 2e-2), f"wrong output for {dtype} inputs"
