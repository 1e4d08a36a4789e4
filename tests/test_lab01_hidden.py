"""Lab 01's hidden suites (grading/hidden/lab01) pass the solution and fail realistic mistakes; every
mistake that gets an input form wrong fails the visible tests too, before the student submits.

Run in this process (conftest.hidden); that calls of the library or of PyTorch's fused attention fail
is the sandbox's doing, tested in tests/test_sandbox.py."""

import math

import pytest
import torch

from conftest import assert_part_fails, assert_part_passes, assert_visible_fails, lab_solution, visible_failure

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

LAB = "lab01_transformer_basics"
PARTS = ["attention", "rmsnorm", "swiglu", "block", "performance"]


@pytest.fixture(scope="module")
def solution():
    return lab_solution(LAB)


def with_answer(solution, source):
    """The solution's namespace with one answer rewritten: ``source`` runs in a copy of it, as if the
    student had written it in the solution cell."""
    namespace = dict(solution)
    exec(source, namespace)
    return namespace


@pytest.mark.parametrize("part", PARTS)
def test_solution_passes(part, solution):
    assert_part_passes("lab01", part, dict(solution))


def test_solution_passes_the_visible_tests(solution):
    for part in ("attention", "rmsnorm", "swiglu", "block"):
        assert visible_failure(LAB, part, solution) is None, f"{part}: {visible_failure(LAB, part, solution)}"


# --- an input form handled wrong: the hidden tests reject it, and so do the visible tests -----------

ATTENTION = "def attention(q, k, v, causal=True, mask=None):\n"
FORM_MISTAKES = {
    "attention": {
        # the mask of SDPA's is_causal: aligned to the start of the keys
        "start-aligned causal mask": ATTENTION + (
            "    tq, tk = q.shape[2], k.shape[2]\n"
            "    allowed = torch.ones(tq, tk, dtype=torch.bool).tril() if causal else torch.ones(tq, tk, dtype=torch.bool)\n"
            "    if mask is not None:\n        allowed = allowed & mask\n"
            "    probs = (q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float('-inf')).softmax(-1)\n"
            "    return (probs.nan_to_num(0.0) @ v.float()).to(q.dtype)\n"),
        "mask ignored": ATTENTION + "    return SOLVED(q, k, v, causal)\n",
        "causal=False ignored": ATTENTION + "    return SOLVED(q, k, v, True, mask)\n",
        "NaN for a query that sees no key": ATTENTION + (
            "    tq, tk = q.shape[2], k.shape[2]\n"
            "    allowed = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else torch.ones(tq, tk, dtype=torch.bool)\n"
            "    if mask is not None:\n        allowed = allowed & mask\n"
            "    probs = (q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float('-inf')).softmax(-1)\n"
            "    return (probs @ v.float()).to(q.dtype)\n"),
        "float32 returned for bf16/fp16 inputs": ATTENTION + "    return SOLVED(q.float(), k.float(), v.float(), causal, mask)\n",
        "a (B, H, Tq, Tk) mask read as one pattern": ATTENTION + (
            "    if mask is not None and mask.dim() == 4:\n        mask = mask[0, 0]\n"
            "    return SOLVED(q, k, v, causal, mask)\n"),
    },
    "rmsnorm": {
        "squares averaged in float16": "def rms_norm(x, weight, eps=1e-5):\n"
            "    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)\n",
        "only 2-D x": "def rms_norm(x, weight, eps=1e-5):\n"
            "    assert x.dim() == 2, 'made for (tokens, dim)'\n    return SOLVED(x, weight, eps)\n",
        "eps outside the root": "def rms_norm(x, weight, eps=1e-5):\n"
            "    xf = x.float()\n    return weight * (xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(x.dtype)\n",
    },
    "swiglu": {
        "gate and up swapped": "def swiglu(x, w1, w2, w3):\n    return SOLVED(x, w3, w2, w1)\n",
        "only 3-D x": "def swiglu(x, w1, w2, w3):\n    b, t, d = x.shape\n    return SOLVED(x, w1, w2, w3)\n",
    },
    "block": {
        "lengths ignored": "def decoder_block(x, block, rope_cos, rope_sin, lengths=None):\n"
            "    return SOLVED(x, block, rope_cos, rope_sin)\n",
        "padding keys attended": "def decoder_block(x, block, rope_cos, rope_sin, lengths=None):\n"
            "    return SOLVED(x, block, rope_cos, rope_sin, lengths, keep_padding_keys=True)\n",
    },
}
NAMES = {"attention": "attention", "rmsnorm": "rms_norm", "swiglu": "swiglu", "block": "decoder_block"}


def block_variant(solution, keep_padding_keys=False, shift_positions=True):
    """The solution's decoder_block with one of its two padding steps left out. (Not shifting the
    positions is no mistake: RoPE scores depend on distances only; test_positions_need_no_shift.)"""
    import torch.nn.functional as F
    from effml_lib.rope import apply_rope

    attention, rms_norm, swiglu = solution["attention"], solution["rms_norm"], solution["swiglu"]

    def decoder_block(x, block, rope_cos, rope_sin, lengths=None):
        attn, ffn = block.attention, block.feed_forward
        b, t, _ = x.shape
        lengths = torch.full((b,), t) if lengths is None else lengths
        pad = t - lengths[:, None]  # (B, 1)
        positions = (torch.arange(t)[None, :] - pad).clamp(min=0) if shift_positions else torch.arange(t).expand(b, t)
        keys = torch.ones(b, 1, 1, t, dtype=torch.bool) if keep_padding_keys else (torch.arange(t)[None, :] >= pad)[:, None, None, :]
        h = rms_norm(x, block.attention_norm.weight, block.attention_norm.eps)
        q = F.linear(h, attn.wq.weight).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = F.linear(h, attn.wk.weight).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = F.linear(h, attn.wv.weight).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope_cos, rope_sin, positions), apply_rope(k, rope_cos, rope_sin, positions)
        x = x + F.linear(attention(q, k, v, mask=keys).transpose(1, 2).reshape(b, t, -1), attn.wo.weight)
        h = rms_norm(x, block.ffn_norm.weight, block.ffn_norm.eps)
        return x + swiglu(h, ffn.w1.weight, ffn.w2.weight, ffn.w3.weight)

    return decoder_block


def mistaken(solution, part, source):
    solved = solution[NAMES[part]]
    if part == "block":
        def solved(x, block, rope_cos, rope_sin, lengths=None, **variant):  # noqa: F811
            if not variant:
                return solution["decoder_block"](x, block, rope_cos, rope_sin)  # lengths=None
            return block_variant(solution, **variant)(x, block, rope_cos, rope_sin, lengths)
    return with_answer(dict(solution, SOLVED=solved), source)


CASES = [(part, mistake) for part, mistakes in FORM_MISTAKES.items() for mistake in mistakes]


@pytest.mark.parametrize("part,mistake", CASES, ids=[f"{p}: {m}" for p, m in CASES])
def test_input_form_mistake_fails_hidden_and_visible_tests(solution, part, mistake):
    namespace = mistaken(solution, part, FORM_MISTAKES[part][mistake])
    assert_part_fails("lab01", part, namespace, mistake)
    assert_visible_fails(LAB, part, namespace, mistake)


def test_positions_need_no_shift(solution):
    """RoPE's scores depend only on the distance between tokens, so positions that start at the padding
    count, not at 0, give the same block: the hidden tests must not take points for it."""
    namespace = mistaken(solution, "block", "def decoder_block(x, block, rope_cos, rope_sin, lengths=None):\n"
                         "    return SOLVED(x, block, rope_cos, rope_sin, lengths, shift_positions=False)\n")
    assert_part_passes("lab01", "block", namespace)


def test_messages_say_what_was_expected(solution):
    out = assert_part_fails("lab01", "block", mistaken(solution, "block", FORM_MISTAKES["block"]["lengths ignored"]), "")
    assert "left-padded batch" in out and "padding" in out, out
    out = assert_part_fails("lab01", "attention", mistaken(solution, "attention", FORM_MISTAKES["attention"]["mask ignored"]), "")
    assert "mask of shape" in out, out


# --- part 5: correct and within the factor of the reference --------------------------------------

def loop_attention(q, k, v, causal=True, mask=None):  # correct for what part 5 times, one query at a time
    tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
    out = torch.empty_like(q)
    for i in range(tq):
        n = tk - tq + i + 1  # query i sees keys 0 .. tk - tq + i
        scores = q[:, :, i:i + 1] @ k[:, :, :n].transpose(-2, -1) / math.sqrt(d)  # (B, H, 1, n)
        out[:, :, i:i + 1] = scores.softmax(-1) @ v[:, :, :n]
    return out


def unmasked_attention(q, k, v, causal=True, mask=None):  # fast, but every query sees the future
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def test_loop_over_queries_is_too_slow(solution):
    out = assert_part_fails("lab01", "performance", dict(solution, attention=loop_attention), "loop")
    assert "too slow" in out and "allowed 4×" in out, out


def test_fast_but_wrong_attention_fails_the_speed_part(solution):
    out = assert_part_fails("lab01", "performance", dict(solution, attention=unmasked_attention), "unmasked")
    assert "wrong output" in out and "too slow" not in out, out


def test_missing_function_fails():
    out = assert_part_fails("lab01", "swiglu", {}, "nothing defined")
    assert "defines no swiglu" in out, out
