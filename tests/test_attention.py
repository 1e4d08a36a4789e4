import math

import pytest
import torch
import torch.nn.functional as F

from effml_lib.attention import Attention, attention, attention_reference, causal_mask, repeat_kv
from conftest import assert_close


def naive_attention(q, k, v, causal=True, mask=None):
    """Independent reference: loops over heads and queries in float64, K/V repeated per head."""
    b, h, tq, d = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // h_kv)
            for i in range(tq):
                scores = (k[bi, kv].double() @ q[bi, hi, i].double()) / math.sqrt(d)  # (Tk,)
                allowed = torch.ones(tk, dtype=torch.bool)
                if causal:
                    allowed &= torch.arange(tk) <= (tk - tq + i)
                if mask is not None:
                    allowed &= torch.broadcast_to(mask, (b, h, tq, tk))[bi, hi, i]
                if not allowed.any():
                    continue
                p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=0)
                out[bi, hi, i] = p @ v[bi, kv].double()
    return out


SHAPES = [  # (B, H, Hkv, Tq, Tk, D)
    (2, 4, 4, 7, 7, 16),  # MHA, prefill
    (1, 8, 2, 5, 5, 8),  # GQA
    (2, 6, 1, 3, 3, 8),  # MQA
    (2, 4, 2, 1, 9, 16),  # decode: one query against a cache
    (1, 4, 4, 3, 11, 8),  # several queries fewer than keys
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["torch", "sdpa", "auto"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_naive_loop(shape, impl, causal, gen):
    b, h, h_kv, tq, tk, d = shape
    q = torch.randn(b, h, tq, d, generator=gen)
    k = torch.randn(b, h_kv, tk, d, generator=gen)
    v = torch.randn(b, h_kv, tk, d, generator=gen)
    out = attention(q, k, v, causal=causal, impl=impl)
    assert out.shape == (b, h, tq, d)
    assert_close(out, naive_attention(q, k, v, causal), torch.float32, what=f"attention impl={impl}")


def test_causal_is_end_aligned_when_queries_are_fewer():
    # The last query must see every key; SDPA's is_causal=True (start-aligned) would let it see only one.
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_decode_step_equals_last_row_of_prefill(gen):
    q = torch.randn(1, 4, 6, 8, generator=gen)
    k = torch.randn(1, 2, 6, 8, generator=gen)
    v = torch.randn(1, 2, 6, 8, generator=gen)
    full = attention(q, k, v, impl="torch")
    last = attention(q[:, :, -1:], k, v, impl="torch")
    assert_close(last, full[:, :, -1:], torch.float32, what="decode step vs prefill")


@pytest.mark.parametrize("impl", ["torch", "sdpa", "auto"])
@pytest.mark.parametrize("tq,tk", [(4, 4), (2, 6)])
def test_causal_combined_with_an_explicit_mask(impl, tq, tk, gen):
    q = torch.randn(1, 4, tq, 8, generator=gen)
    k = torch.randn(1, 2, tk, 8, generator=gen)
    v = torch.randn(1, 2, tk, 8, generator=gen)
    mask = torch.rand(1, 4, tq, tk, generator=gen) > 0.3
    mask[..., 0] = True
    got = attention(q, k, v, causal=True, mask=mask, impl=impl)
    assert_close(got, naive_attention(q, k, v, True, mask), torch.float32, what=f"causal + mask, impl={impl}")


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_explicit_mask_and_fully_masked_rows(impl, gen):
    q = torch.randn(2, 4, 3, 8, generator=gen)
    k = torch.randn(2, 2, 5, 8, generator=gen)
    v = torch.randn(2, 2, 5, 8, generator=gen)
    mask = torch.rand(2, 1, 3, 5, generator=gen) > 0.4
    mask[..., 0] = True  # every row keeps a key (SDPA's output on empty rows is undefined)
    assert_close(attention(q, k, v, causal=False, mask=mask, impl=impl), naive_attention(q, k, v, False, mask),
                 torch.float32, what="masked attention")
    empty = mask.clone()
    empty[0, 0, 1] = False
    out = attention(q, k, v, causal=False, mask=empty, impl="torch")
    assert torch.isfinite(out).all() and out[0, :, 1].abs().sum() == 0, "a fully masked row must give zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_pytorch_sdpa_with_repeated_heads(dtype, gen):
    q = torch.randn(2, 8, 16, 32, generator=gen).to(dtype)
    k = torch.randn(2, 2, 16, 32, generator=gen).to(dtype)
    v = torch.randn(2, 2, 16, 32, generator=gen).to(dtype)
    expected = F.scaled_dot_product_attention(q.float(), repeat_kv(k, 4).float(), repeat_kv(v, 4).float(), is_causal=True)
    got = attention_reference(q, k, v)
    assert got.dtype == dtype
    assert_close(got, expected, dtype, what=f"reference attention in {dtype}")


def test_reference_does_not_copy_kv_per_query_head():
    """The grouped reference must not allocate K/V the size of the query heads (32x here)."""
    from effml_lib.measure import peak_memory

    b, h, h_kv, t, d = 1, 32, 1, 1, 128
    q = torch.randn(b, h, t, d)
    k = torch.randn(b, h_kv, 4096, d)
    v = torch.randn(b, h_kv, 4096, d)
    repeated_bytes = 2 * b * h * 4096 * d * 4  # what repeat_kv would allocate: 128 MiB
    peak = peak_memory(attention_reference, q, k, v).peak_bytes
    assert peak < repeated_bytes / 8, f"peak {peak / 2**20:.1f} MiB suggests K/V were copied per query head"


def test_repeat_kv_layout():
    x = torch.arange(2 * 3).float().view(1, 2, 3, 1)
    r = repeat_kv(x, 2)
    assert torch.equal(r[0, :, :, 0], torch.tensor([[0.0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]))


def test_bad_inputs_raise_clear_errors():
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="impl"):
        attention(q, q, q, impl="fast")
    with pytest.raises(TypeError, match="dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        Attention(64, n_heads=6, n_kv_heads=4)
    with pytest.raises(TypeError, match="floating-point"):
        attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention([1.0], q, q)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, q, q, mask=torch.ones(3, 3, dtype=torch.bool))
