"""Lab 04, part 1: grouped_attention(q, k, v, causal=True), checked against SDPA with repeated heads."""

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


@pytest.mark.parametrize("b,h,h_kv,tq,tk,d", SHAPES, ids=IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_sdpa_with_repeated_heads(student, gen, close, sdpa_repeated, b, h, h_kv, tq, tk, d, causal):
    q = torch.randn(b, h, tq, d, generator=gen)
    k, v = torch.randn(b, h_kv, tk, d, generator=gen), torch.randn(b, h_kv, tk, d, generator=gen)
    out = student.grouped_attention(q, k, v, causal=causal)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape, f"output shape should be {tuple(q.shape)}"
    assert close(out, sdpa_repeated(q, k, v, causal), 1e-5, 1e-4), (
        f"wrong output for {h} query heads / {h_kv} KV heads, Tq={tq}, Tk={tk}, causal={causal}: "
        f"query head i uses KV head i // {h // h_kv}")


def test_heads_of_a_group_are_adjacent(student, close, sdpa_repeated):
    """KV head j must serve query heads j*G .. j*G+G-1 (not every Hkv-th head)."""
    q = torch.zeros(1, 4, 1, 2)
    k = torch.zeros(1, 2, 2, 2)
    v = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # KV head 0 says (1, 0), head 1 (0, 1)
    out = student.grouped_attention(q, k, v, causal=False)
    assert close(out, sdpa_repeated(q, k, v, False), 1e-6, 0), (
        "query heads 0 and 1 must read KV head 0, heads 2 and 3 KV head 1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(student, gen, close, sdpa_repeated, dtype):
    q = torch.randn(1, 8, 3, 32, generator=gen).to(dtype)
    k, v = torch.randn(1, 2, 7, 32, generator=gen).to(dtype), torch.randn(1, 2, 7, 32, generator=gen).to(dtype)
    out = student.grouped_attention(q, k, v)
    assert out.dtype == dtype, f"return q's dtype ({dtype}), got {describe(out)}"
    assert close(out, sdpa_repeated(q, k, v), 2e-2, 2e-2), f"wrong output in {dtype}: compute the softmax in float32"
