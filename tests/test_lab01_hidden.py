"""Lab 01's hidden suites (grading/hidden/lab01) pass a correct solution and fail realistic mistakes."""

import functools
import math
import sys

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


@pytest.mark.parametrize("part", ["attention", "rmsnorm", "swiglu", "block", "performance"])
def test_solution_passes(part):
    assert run_hidden_tests("lab01", part, dict(SOLUTION)) > 0


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
def test_mistake_fails_with_a_useful_message(part, name, wrong, hint, capsys):
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", part, {**SOLUTION, name: wrong})
    assert hint in capsys.readouterr().out


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


def test_loop_over_queries_is_correct_but_too_slow(capsys):
    run_hidden_tests("lab01", "attention", {**SOLUTION, "causal_attention": loop_attention})  # correct
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", "performance", {**SOLUTION, "causal_attention": loop_attention})
    out = capsys.readouterr().out
    assert "too slow" in out and "allowed 4×" in out, out


def test_fast_but_wrong_attention_fails_the_speed_part(capsys):
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", "performance", {**SOLUTION, "causal_attention": unmasked_attention})
    out = capsys.readouterr().out
    assert "wrong output" in out and "too slow" not in out, out


# --- PyTorch's fused attention is unavailable while attention is graded ---------------------------

def sdpa_attention(q, k, v):  # the right answer, from PyTorch's kernel with an end-aligned mask
    tq, tk = q.shape[2], k.shape[2]
    visible = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


def aten_sdpa_attention(q, k, v):
    tq, tk = q.shape[2], k.shape[2]
    visible = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    return torch.ops.aten.scaled_dot_product_attention(q, k, v, attn_mask=visible)


class SDPAAttention:  # an object with __call__, not a function
    def __call__(self, q, k, v):
        return sdpa_attention(q, k, v)


SDPA_MESSAGE = "F.scaled_dot_product_attention is unavailable while this part is graded"


def test_sdpa_attention_is_otherwise_correct():
    # so that the tests below fail because of the ban and nothing else
    assert run_hidden_tests("lab01", "attention", {**SOLUTION, "causal_attention": sdpa_attention},
                            blocked=("attention.attention",)) > 0


@pytest.mark.parametrize("attend", [sdpa_attention, aten_sdpa_attention, SDPAAttention()], ids=["F", "aten", "object"])
@pytest.mark.parametrize("part", ["attention", "performance"])
def test_calling_sdpa_fails_the_part(part, attend, capsys):
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", part, {**SOLUTION, "causal_attention": attend})
    assert SDPA_MESSAGE in capsys.readouterr().out
    x = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(attend(x, x, x), causal_attention(x, x, x))  # and usable again afterwards


def test_a_block_using_sdpa_fails(monkeypatch, capsys):
    # decoder_block calls the module's causal_attention, as a student's calls the notebook's
    monkeypatch.setattr(sys.modules[__name__], "causal_attention", sdpa_attention)
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", "block", dict(SOLUTION))
    assert SDPA_MESSAGE in capsys.readouterr().out


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


def _library_attention_partial():
    from effml_lib.attention import attention

    return functools.partial(attention, impl="torch")  # not a function: must be blocked all the same


CHEATS = [("attention", "causal_attention", library_attention),
          ("attention", "causal_attention", _library_attention_partial()),
          ("rmsnorm", "rms_norm", library_rms_norm),
          ("block", "decoder_block", library_block),
          ("performance", "causal_attention", library_attention)]


@pytest.mark.parametrize("part,name,cheat", CHEATS,
                         ids=["attention", "attention-partial", "rmsnorm", "block", "performance"])
def test_calling_the_library_fails_the_part(part, name, cheat, capsys):
    with pytest.raises(AssertionError):
        run_hidden_tests("lab01", part, {**SOLUTION, name: cheat})
    assert "unavailable while this part is graded" in capsys.readouterr().out
    # and outside grading the same function works (the block is lifted afterwards)
    x = torch.randn(1, 2, 3, 8)
    if name == "causal_attention":
        torch.testing.assert_close(cheat(x, x, x), causal_attention(x, x, x))
