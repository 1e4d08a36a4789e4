"""Lab 01's hidden suites (grading/hidden/lab01) pass a correct solution and fail realistic mistakes.

Run in this process (conftest.hidden); that calls of the library or of PyTorch's fused attention fail
is the sandbox's doing, tested in tests/test_sandbox.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_part_fails, assert_part_passes
from effml_lib.rope import apply_rope


# --- a correct solution, written the way the lab asks -----------------------------------------

def causal_attention(q, k, v):
    tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(d)  # (B, H, Tq, Tk)
    visible = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)  # end-aligned
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v.float()).to(q.dtype)


def rms_norm(x, weight, eps=1e-5):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(x, w1, w2, w3):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def decoder_block(x, block, rope_cos, rope_sin):
    attn, ffn = block.attention, block.feed_forward
    b, t, _ = x.shape
    h = rms_norm(x, block.attention_norm.weight, block.attention_norm.eps)
    q = F.linear(h, attn.wq.weight).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = F.linear(h, attn.wk.weight).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = F.linear(h, attn.wv.weight).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
    out = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
    x = x + F.linear(out, attn.wo.weight)
    h = rms_norm(x, block.ffn_norm.weight, block.ffn_norm.eps)
    return x + swiglu(h, ffn.w1.weight, ffn.w2.weight, ffn.w3.weight)


SOLUTION = dict(causal_attention=causal_attention, rms_norm=rms_norm, swiglu=swiglu, decoder_block=decoder_block)


@pytest.mark.parametrize("part", ["attention", "rmsnorm", "swiglu", "block", "performance"])
def test_solution_passes(part):
    assert_part_passes("lab01", part, dict(SOLUTION))


# --- realistic mistakes, each must cost its part -----------------------------------------------

def start_aligned_attention(q, k, v):  # the mask of SDPA's is_causal: aligned to the start of the keys
    tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
    visible = torch.ones(tq, tk, dtype=torch.bool).tril()
    return ((q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~visible, float("-inf")).softmax(-1) @ v)


def unscaled_attention(q, k, v):
    tq, tk = q.shape[2], k.shape[2]
    visible = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    return (q @ k.transpose(-2, -1)).masked_fill(~visible, float("-inf")).softmax(-1) @ v


def layer_norm(x, weight, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], weight, eps=eps)


def swapped_swiglu(x, w1, w2, w3):
    return swiglu(x, w3, w2, w1)


def post_norm_block(x, block, rope_cos, rope_sin):
    attn_out = decoder_block(x, block, rope_cos, rope_sin) - x  # not how a pre-norm block composes
    return rms_norm(x + attn_out, block.ffn_norm.weight)


MISTAKES = [
    ("attention", "causal_attention", start_aligned_attention, "queries and"),
    ("attention", "causal_attention", unscaled_attention, "wrong output"),
    ("rmsnorm", "rms_norm", layer_norm, "LayerNorm"),
    ("swiglu", "swiglu", swapped_swiglu, "gate"),
    ("block", "decoder_block", post_norm_block, "differ"),
]


@pytest.mark.parametrize("part,name,wrong,hint", MISTAKES, ids=[m[2].__name__ for m in MISTAKES])
def test_mistake_fails_with_a_useful_message(part, name, wrong, hint):
    assert hint in assert_part_fails("lab01", part, {**SOLUTION, name: wrong}, wrong.__name__)


# --- part 5: correct and within the factor of the reference --------------------------------------

def loop_attention(q, k, v):  # correct, one query at a time
    tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
    out = torch.empty_like(q)
    for i in range(tq):
        n = tk - tq + i + 1  # query i sees keys 0 .. tk - tq + i
        scores = q[:, :, i:i + 1] @ k[:, :, :n].transpose(-2, -1) / math.sqrt(d)  # (B, H, 1, n)
        out[:, :, i:i + 1] = scores.softmax(-1) @ v[:, :, :n]
    return out


def unmasked_attention(q, k, v):  # fast, but every query sees the future
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def test_loop_over_queries_is_correct_but_too_slow():
    assert_part_passes("lab01", "attention", {**SOLUTION, "causal_attention": loop_attention})  # correct
    out = assert_part_fails("lab01", "performance", {**SOLUTION, "causal_attention": loop_attention}, "loop")
    assert "too slow" in out and "allowed 4×" in out, out


def test_fast_but_wrong_attention_fails_the_speed_part():
    out = assert_part_fails("lab01", "performance", {**SOLUTION, "causal_attention": unmasked_attention}, "unmasked")
    assert "wrong output" in out and "too slow" not in out, out


def test_missing_function_fails():
    out = assert_part_fails("lab01", "swiglu", {}, "nothing defined")
    assert "defines no swiglu" in out, out
