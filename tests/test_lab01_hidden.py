"""Lab 01's hidden suites (grading/hidden/lab01) pass a correct solution and fail realistic mistakes."""

import math

import pytest
import torch
import torch.nn.functional as F

from effml_lib.grading import run_hidden_tests
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


@pytest.mark.parametrize("part", ["attention", "rmsnorm", "swiglu", "block"])
def test_solution_passes(part):
    assert run_hidden_tests("lab01", part, dict(SOLUTION)) > 0


# --- realistic mistakes, each must cost its part -----------------------------------------------

def start_aligned_attention(q, k, v):  # SDPA's is_causal aligns the mask to the start
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


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
def test_mistake_fails_with_a_useful_message(part, name, wrong, hint, capsys):
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", part, {**SOLUTION, name: wrong})
    assert hint in capsys.readouterr().out


def test_missing_function_fails():
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", "swiglu", {})


# --- calling the library's own implementation: the part scores zero, with a clear reason -----------

def library_attention(q, k, v):
    from effml_lib.attention import attention

    return attention(q, k, v, impl="torch")


def library_rms_norm(x, weight, eps=1e-5):
    from effml_lib.model import RMSNorm

    norm = RMSNorm(x.shape[-1], eps)
    norm.weight.data.copy_(weight)
    return norm(x)


def library_block(x, block, rope_cos, rope_sin):
    return block(x, rope_cos, rope_sin)


CHEATS = [("attention", "causal_attention", library_attention),
          ("rmsnorm", "rms_norm", library_rms_norm),
          ("block", "decoder_block", library_block)]


@pytest.mark.parametrize("part,name,cheat", CHEATS, ids=[c[0] for c in CHEATS])
def test_calling_the_library_fails_the_part(part, name, cheat, capsys):
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", part, {**SOLUTION, name: cheat})
    assert "unavailable while this part is graded" in capsys.readouterr().out
    # and outside grading the same function works (the block is lifted afterwards)
    x = torch.randn(1, 2, 3, 8)
    if part == "attention":
        torch.testing.assert_close(cheat(x, x, x), causal_attention(x, x, x))
