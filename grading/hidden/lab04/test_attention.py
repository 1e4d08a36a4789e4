"""Lab 04, part 1: attention(q, k, v, causal=True, mask=None) with shared K/V heads, checked against
SDPA with the heads repeated (float64)."""

import pytest
import torch
from trusted import describe

SHAPES = [  # (B, H, Hkv, Tq, Tk, D)
    (2, 8, 8, 6, 6, 16),     # MHA
    (2, 8, 2, 6, 6, 16),     # GQA, prefill
    (1, 12, 3, 1, 40, 32),   # GQA, decode step
    (3, 6, 1, 4, 9, 8),      # MQA, a chunk of queries after a prefix
    (1, 32, 8, 2, 100, 64),  # Llama-3-8B's grouping
]
IDS = ["mha", "gqa_prefill", "gqa_decode", "mqa_chunk", "llama3_groups"]


def qkv(gen, b, h, h_kv, tq, tk, d, dtype=torch.float32):
    q = torch.randn(b, h, tq, d, generator=gen).to(dtype)
    k, v = torch.randn(b, h_kv, tk, d, generator=gen).to(dtype), torch.randn(b, h_kv, tk, d, generator=gen).to(dtype)
    return q, k, v


def is_shaped_like(out, q):
    return type(out) is torch.Tensor and out.shape == q.shape


@pytest.mark.parametrize("b,h,h_kv,tq,tk,d", SHAPES, ids=IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_sdpa_with_repeated_heads(student, gen, close, repeated_heads, b, h, h_kv, tq, tk, d, causal):
    q, k, v = qkv(gen, b, h, h_kv, tq, tk, d)
    out = student.attention(q, k, v, causal=causal)
    assert is_shaped_like(out, q), f"output for q {tuple(q.shape)}, k/v {tuple(k.shape)}: expected q's shape, got {describe(out)}"
    assert close(out, repeated_heads(q, k, v, causal), 1e-5, 1e-4), (
        f"wrong output for {h} query heads / {h_kv} KV heads, Tq={tq}, Tk={tk}, causal={causal}: "
        f"query head i uses KV head i // {h // h_kv}" + (", and query i sees keys 0 .. Tk - Tq + i" if causal else
                                                         ", and every query sees every key"))


def test_heads_of_a_group_are_adjacent(student, close, repeated_heads):
    """KV head j must serve query heads j*G .. j*G+G-1 (not every Hkv-th head)."""
    q = torch.zeros(1, 4, 1, 2)
    k = torch.zeros(1, 2, 2, 2)
    v = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # KV head 0 says (1, 0), head 1 (0, 1)
    out = student.attention(q, k, v, causal=False)
    assert close(out, repeated_heads(q, k, v, False), 1e-6, 0), (
        "4 query heads, 2 KV heads: query heads 0 and 1 must read KV head 0, heads 2 and 3 KV head 1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(student, gen, close, repeated_heads, dtype):
    q, k, v = qkv(gen, 1, 8, 2, 3, 7, 32, dtype)
    out = student.attention(q, k, v)
    assert type(out) is torch.Tensor and out.dtype == dtype, f"q, k, v in {dtype}: return q's dtype, got {describe(out)}"
    assert close(out, repeated_heads(q, k, v), 2e-2, 2e-2), (
        f"wrong output in {dtype} (q {tuple(q.shape)}, k/v {tuple(k.shape)}): compute the softmax in float32")


B, H, H_KV, TQ, TK, D = 2, 8, 2, 3, 7, 16  # 3 new queries after 4 cached keys, 4 query heads per KV head
MASK_SHAPES = {  # every shape that broadcasts to (B, H, Tq, Tk)
    "q_by_k": (TQ, TK),
    "padding": (B, 1, 1, TK),
    "per_sequence": (B, 1, TQ, TK),
    "per_head": (1, H, TQ, TK),
    "per_sequence_and_head": (B, H, TQ, TK),
}


@pytest.mark.parametrize("shape", list(MASK_SHAPES.values()), ids=list(MASK_SHAPES))
@pytest.mark.parametrize("causal", [True, False], ids=["and_causal", "alone"])
def test_masks(student, gen, close, repeated_heads, shape, causal):
    q, k, v = qkv(gen, B, H, H_KV, TQ, TK, D)
    mask = torch.rand(shape, generator=gen) < 0.7
    out = student.attention(q, k, v, causal=causal, mask=mask)
    assert is_shaped_like(out, q), f"with a mask of shape {shape}: expected q's shape {tuple(q.shape)}, got {describe(out)}"
    assert close(out, repeated_heads(q, k, v, causal, mask), 1e-5, 1e-4), (
        f"wrong output with a boolean mask of shape {shape} (True = may attend, broadcast to (B, H, Tq, Tk) = "
        f"{(B, H, TQ, TK)}; its head axis is the query heads'), {H} query heads / {H_KV} KV heads"
        + (", combined with the end-aligned causal mask: a key counts only where both allow it" if causal else ", causal=False"))


@pytest.mark.parametrize("causal", [True, False], ids=["and_causal", "alone"])
def test_a_query_with_no_allowed_key_gets_zeros(student, gen, close, repeated_heads, causal):
    q, k, v = qkv(gen, B, H, H_KV, TQ, TK, D)
    mask = torch.rand(B, H, TQ, TK, generator=gen) < 0.7
    mask[0, :, 0] = False  # sequence 0, query 0: no key, in every head
    mask[1, 3, 2] = False  # sequence 1, head 3, query 2
    if causal:
        mask[1, 5, :, :6] = False  # sequence 1, head 5: only key 6, which the causal mask hides from queries 0 and 1
    expected = repeated_heads(q, k, v, causal, mask)
    allowed = mask & torch.ones(TQ, TK, dtype=torch.bool).tril(TK - TQ) if causal else mask  # (B, H, Tq, Tk)
    empty = ~allowed.any(-1)  # (B, H, Tq): the queries with no allowed key
    out = student.attention(q, k, v, causal=causal, mask=mask)
    assert is_shaped_like(out, q), f"expected q's shape {tuple(q.shape)}, got {describe(out)}"
    rows = out[empty]  # (queries with no key, D)
    assert torch.equal(rows, torch.zeros_like(rows)), (
        f"a query with no allowed key (mask {(B, H, TQ, TK)}" + (" together with the causal mask" if causal else "")
        + ") must return zeros" + (", not NaN" if rows.isnan().any() else ""))
    assert close(out, expected, 1e-5, 1e-4), (
        f"with some queries that have no allowed key, the others must be attention over their allowed keys "
        f"(mask {(B, H, TQ, TK)}, causal={causal})")
