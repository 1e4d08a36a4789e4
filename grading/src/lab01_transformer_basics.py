# %% [markdown] nbgrader={"grade_id": "intro", "locked": true}
# # Lab 01 · Transformer basics
#
# You will write the four pieces of a Llama-style decoder block and check that, with the course model's
# weights, your block reproduces `effml-tiny` exactly, for one sequence and for a padded batch of
# sequences of different lengths; part 5 then times your attention. Notebook `01_transformer_basics`
# explains each piece on one sequence; read it first. Here you generalise them: attention with any
# number of queries and a mask, and a block that serves a batch.
#
# How this lab is graded: each part has **visible tests** (run them as often as you like; a failure says
# what is wrong) and a **graded cell** whose hidden tests decide that part's points (12 in all). While
# your code is graded, the library's own versions of what you implement are unavailable, so call your
# own functions, not `effml_lib`'s. Do not edit or delete the read-only cells.

# %% shared="colab_setup" nbgrader={"grade_id": "colab_setup", "locked": true}

# %% nbgrader={"grade_id": "imports", "locked": true}
import math

import torch
import torch.nn.functional as F

from effml_lib.checkpoints import pretrained
from effml_lib.rope import apply_rope  # RoPE is module 02's lab: here you may use the library's

torch.manual_seed(0)


# %% [markdown] nbgrader={"grade_id": "p1_intro", "locked": true}
# ## Part 1 · Attention, causal and masked (3 points)
#
# `attention(q, k, v, causal=True, mask=None)` is the library's attention, for `H` query heads and as
# many key/value heads (lab 04 lets heads share): `q` has shape `(B, H, Tq, D)`, `k` and `v` have
# shape `(B, H, Tk, D)`, and it returns `softmax(q kᵀ / √D + mask) v`, shape `(B, H, Tq, D)`, in `q`'s
# dtype. The notebook computes the square case, `Tq = Tk` with a causal mask; yours is general:
#
# * **causal=True** aligns the mask to the **end** of the keys: query `i` sits at position `Tk - Tq + i`
#   and sees keys `0 … Tk - Tq + i` (so `Tq = 1`, a decode step, sees every key). It needs `Tq <= Tk`.
#   **causal=False** lets every query see every key.
# * **mask**, when given, is a boolean tensor broadcastable to `(B, H, Tq, Tk)`, `True` where a query may
#   attend to a key: `(B, 1, 1, Tk)` hides padding keys per sequence, `(Tq, Tk)` is one pattern for all.
#   With `causal=True` a key must be allowed by both.
# * A query that may attend to **no** key (every key masked) returns **zeros**, not NaN: padding rows
#   of a batch (part 4) are such queries, and a NaN there would spread to every later layer.
# * Compute the softmax in float32, so bf16/fp16 inputs stay accurate.
#
# Write the softmax yourself: while parts 1, 4 and 5 are graded, PyTorch's fused attention
# (`F.scaled_dot_product_attention`, however you import it) is unavailable, and calling it fails the part.

# %% nbgrader={"grade_id": "p1_solution", "solution": true}
def attention(q, k, v, causal=True, mask=None):
    ### BEGIN SOLUTION
    b, h, tq, d = q.shape
    tk = k.shape[2]
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(d)  # (B, H, Tq, Tk)
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=tk - tq)  # query i sees keys 0 .. Tk - Tq + i
    if mask is not None:
        allowed = allowed & mask  # broadcasts to (B, H, Tq, Tk)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    probs = probs.nan_to_num(0.0)  # a row with no allowed key: softmax of all -inf is NaN; make it zeros
    return (probs @ v.float()).to(q.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p1_visible", "locked": true}
# Visible tests for part 1
q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)  # (B, H, T, D)
out = attention(q, k, v)
assert out.shape == (2, 2, 4, 8), f"output shape should be (2, 2, 4, 8), got {tuple(out.shape)}"
assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-6), "the first query can only see the first key, so it must return v[0]"
last = attention(q[:, :, -1:], k, v)
assert torch.allclose(last, out[:, :, -1:], atol=1e-5), (
    "one query against 4 keys must equal the last row of the full result: align the causal mask to the end of the keys")
assert torch.allclose(attention(q[:, :, 2:], k, v), out[:, :, 2:], atol=1e-5), (
    "the last 2 queries against 4 keys (Tq = 2, Tk = 4) sit at positions 2 and 3: they must equal rows 2 and 3 "
    "of the full result")
everything = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
assert torch.allclose(attention(q, k, v, causal=False), everything, atol=1e-5), "causal=False: every query sees every key"
keys_kept = torch.tensor([True, True, False, True])  # one pattern (Tk,), broadcast over B, H and Tq
assert torch.allclose(attention(q, k, v, causal=False, mask=keys_kept),
                      attention(q, k[:, :, [0, 1, 3]], v[:, :, [0, 1, 3]], causal=False), atol=1e-5), (
    "mask=False on key 2 must give the same result as deleting key 2")
padding = torch.tensor([[True] * 4, [False, False, True, True]])[:, None, None, :]  # (B, 1, 1, Tk): sequence 1's keys 0, 1 are padding
padded = attention(q, k, v, mask=padding)
assert torch.allclose(padded[0], out[0], atol=1e-5), "sequence 0 has no padding: its result must not change"
assert torch.equal(padded[1, :, :2], torch.zeros(2, 2, 8)), (
    "queries 0 and 1 of sequence 1 may see no key (causal and padding together hide keys 0..3 from them): "
    "expected zeros, not NaN")
assert torch.allclose(padded[1, :, 2:], attention(q[1:, :, 2:], k[1:, :, 2:], v[1:, :, 2:])[0], atol=1e-5), (
    "with keys 0, 1 masked out, sequence 1's queries 2, 3 must attend only to keys 2, 3")
pattern = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)  # (Tq, Tk)
assert torch.allclose(attention(q, k, v, causal=False, mask=pattern), attention(q, k, v, mask=pattern), atol=1e-5), (
    "this (Tq, Tk) pattern is inside the causal mask: with and without causal=True the result must be the same")
even = attention(torch.zeros_like(q), k, v, causal=False, mask=pattern)  # a zero query scores every key alike
assert torch.allclose(even[:, :, 3], (v[:, :, 2] + v[:, :, 3]) / 2, atol=1e-5), (
    "mask (Tq, Tk): query 3 may see keys 2 and 3 only, so a zero query must return their mean")
per_head = torch.rand(2, 2, 4, 4) < 0.5  # (B, H, Tq, Tk): its own pattern for every sequence, head and query
per_head[..., 0] = True
expected = torch.stack([torch.stack([attention(q[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1],
                                               causal=False, mask=per_head[b, h])[0, 0] for h in range(2)]) for b in range(2)])
assert torch.allclose(attention(q, k, v, causal=False, mask=per_head), expected, atol=1e-5), (
    "a full (B, H, Tq, Tk) mask: sequence b, head h uses its own pattern mask[b, h]")
wide = attention(q[:, :, :2], k, v, causal=False)  # Tq = 2 < Tk = 4, not causal
assert torch.allclose(wide, everything[:, :, :2], atol=1e-5), "causal=False with 2 queries and 4 keys: both see all 4 keys"
large = attention(40 * q, 40 * k, v)
assert torch.isfinite(large).all(), "scores in the thousands gave inf/NaN: subtract each row's maximum before exp"
for dtype in (torch.bfloat16, torch.float16):
    half = attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert half.dtype == dtype, f"return q's dtype: expected {dtype}, got {half.dtype}"
    assert torch.allclose(half.float(), out, atol=3e-2), f"{dtype} inputs: compute the softmax in float32"
print("part 1: visible tests passed")


# %% nbgrader={"grade_id": "p1_tests"} graded={"part": "attention"}

# %% [markdown] nbgrader={"grade_id": "p2_intro", "locked": true}
# ## Part 2 · RMSNorm (2 points)
#
# `rms_norm(x, weight, eps=1e-5)` normalises over the last dimension, `x / sqrt(mean(x²) + eps)`, and
# scales by `weight`. Unlike LayerNorm it subtracts no mean and adds no bias. Compute in float32 and
# return `x`'s dtype.

# %% nbgrader={"grade_id": "p2_solution", "solution": true}
def rms_norm(x, weight, eps=1e-5):
    ### BEGIN SOLUTION
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p2_visible", "locked": true}
# Visible tests for part 2
x = torch.tensor([[3.0, 4.0]])
out = rms_norm(x, torch.ones(2), eps=0.0)
assert torch.allclose(out, x / math.sqrt(12.5)), f"rms of [3, 4] is sqrt(12.5); expected {x / math.sqrt(12.5)}, got {out}"
assert torch.allclose(rms_norm(x, torch.tensor([2.0, 0.5]), eps=0.0), out * torch.tensor([2.0, 0.5])), "scale by weight last"
tiny = torch.full((4,), 1e-3)  # 1-D x; its mean square (1e-6) is far below eps = 1
assert torch.allclose(rms_norm(tiny, torch.ones(4), eps=1.0), tiny / math.sqrt(1 + 1e-6)), "eps goes inside the square root"
shifted = torch.randn(2, 5, 16) + 5.0  # 3-D x, far from zero mean
normed = rms_norm(shifted, torch.ones(16))
assert normed.shape == (2, 5, 16), f"output shape should be x's, (2, 5, 16), got {tuple(normed.shape)}"
assert normed.mean(-1).abs().min() > 0.5, "the output is centred: that is LayerNorm; RMSNorm keeps the mean"
for dtype in (torch.bfloat16, torch.float16):
    big = torch.full((3, 64), 300.0)  # 300² = 90 000 is past float16's largest number, 65 504
    low = rms_norm(big.to(dtype), torch.ones(64, dtype=dtype))
    assert low.dtype == dtype, f"return x's dtype: expected {dtype}, got {low.dtype}"
    assert torch.allclose(low.float(), torch.ones(3, 64), atol=1e-2), (
        f"{dtype}, every entry 300: expected all ones, got values like {low[0, 0].item()}; square and average in float32")
print("part 2: visible tests passed")


# %% nbgrader={"grade_id": "p2_tests"} graded={"part": "rmsnorm"}

# %% [markdown] nbgrader={"grade_id": "p3_intro", "locked": true}
# ## Part 3 · SwiGLU feed-forward (2 points)
#
# `swiglu(x, w1, w2, w3)` computes `(silu(x w1ᵀ) * (x w3ᵀ)) w2ᵀ`, with weights stored like
# `nn.Linear`'s: `w1` and `w3` are `(hidden, dim)`, `w2` is `(dim, hidden)`. `w1` is the gate.

# %% nbgrader={"grade_id": "p3_solution", "solution": true}
def swiglu(x, w1, w2, w3):
    ### BEGIN SOLUTION
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p3_visible", "locked": true}
# Visible tests for part 3
x = torch.randn(2, 3, 4)
w1, w3, w2 = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
out = swiglu(x, w1, w2, w3)
assert out.shape == (2, 3, 4), f"output shape should be (2, 3, 4), got {tuple(out.shape)}"
assert torch.allclose(swiglu(x, torch.zeros(6, 4), w2, w3), torch.zeros(2, 3, 4)), "silu(0) = 0: a zero gate must give zeros"
# 2-D x (tokens, dim) = (1, 2), one hidden unit: gate x·w1 = 1, up x·w3 = 2, w2 copies it to output 0
got = swiglu(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0, 1.0]]))
assert torch.allclose(got, torch.tensor([[2 * F.silu(torch.tensor(1.0)).item(), 0.0]])), (
    f"expected [[silu(1)·2, 0]] = [[1.462, 0]], got {got.tolist()}; silu on the up projection instead "
    f"of the gate would give silu(2)·1 = 1.762")
print("part 3: visible tests passed")


# %% nbgrader={"grade_id": "p3_tests"} graded={"part": "swiglu"}

# %% [markdown] nbgrader={"grade_id": "p4_intro", "locked": true}
# ## Part 4 · A pre-norm decoder block, for a padded batch (3 points)
#
# `decoder_block(x, block, rope_cos, rope_sin, lengths=None)` computes one block of `effml-tiny` with
# **your** parts from above and the weights of `block` (an `effml_lib.model.Block`:
# `block.attention_norm.weight`, `block.attention.wq.weight` … `wo`, `block.ffn_norm.weight`,
# `block.feed_forward.w1/w2/w3.weight`; `block.attention.n_heads` and `.head_dim`; the norms' `.eps`):
#
#     h = x + attention(rms_norm(x)) · wo        (q, k rotated by apply_rope(·, rope_cos, rope_sin, positions))
#     out = h + swiglu(rms_norm(h))
#
# `x` is `(B, T, dim)`; `rope_cos`, `rope_sin` are the model's tables, `(max_positions, head_dim / 2)`.
#
# * **lengths=None**: every row of `x` is one sequence of `T` tokens at positions `0 … T-1`.
# * **lengths** given, an integer tensor `(B,)`: the batch is **left-padded**, as a server batches
#   prompts of different lengths. Row `b` holds `T - lengths[b]` padding vectors, then its `lengths[b]`
#   real tokens. The block must compute, for the real tokens, exactly what it computes for the sequence
#   alone: no query attends to a padding key (your `attention`'s `mask`), and the real tokens take RoPE
#   positions `0, 1, …` as they would alone (`apply_rope` takes `positions` of shape `(B, T)`). What
#   the padding rows hold does not matter, but it must be finite: the next block reads it.
#
#   (Try leaving the positions unshifted, `0 … T-1` in every row: the visible tests still pass. Why?
#   Module 02 shows that RoPE's scores depend only on the distance between two tokens.)
#
# The notebook runs a block on one sequence; the padded batch is new here.

# %% nbgrader={"grade_id": "p4_solution", "solution": true}
def decoder_block(x, block, rope_cos, rope_sin, lengths=None):
    ### BEGIN SOLUTION
    attn, ffn = block.attention, block.feed_forward
    b, t, _ = x.shape
    if lengths is None:
        lengths = torch.full((b,), t)
    pad = t - lengths[:, None]  # (B, 1): padding vectors before each row's first real token
    positions = (torch.arange(t)[None, :] - pad).clamp(min=0)  # (B, T): real tokens at 0, 1, ...
    real_keys = (torch.arange(t)[None, :] >= pad)[:, None, None, :]  # (B, 1, 1, T)
    h = rms_norm(x, block.attention_norm.weight, block.attention_norm.eps)
    q = F.linear(h, attn.wq.weight).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = F.linear(h, attn.wk.weight).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = F.linear(h, attn.wv.weight).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, rope_cos, rope_sin, positions), apply_rope(k, rope_cos, rope_sin, positions)
    out = attention(q, k, v, mask=real_keys).transpose(1, 2).reshape(b, t, -1)  # (B, T, H*D)
    x = x + F.linear(out, attn.wo.weight)
    h = rms_norm(x, block.ffn_norm.weight, block.ffn_norm.eps)
    return x + swiglu(h, ffn.w1.weight, ffn.w2.weight, ffn.w3.weight)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p4_visible", "locked": true}
# Visible tests for part 4: your block inside effml-tiny must give the model's own logits
model = pretrained("effml-tiny")
cos, sin = model.rope_tables("cpu")


def logits_with_your_block(tokens, lengths=None):
    with torch.no_grad():
        x = model.tok_embeddings(tokens)  # (B, T, dim)
        for block in model.layers:
            x = decoder_block(x, block, cos, sin, lengths)
        return model.output(model.norm(x))  # (B, T, vocab)


tokens = torch.randint(0, model.config.vocab_size, (1, 16))
with torch.no_grad():
    diff = (logits_with_your_block(tokens) - model(tokens)).abs().max().item()
assert diff < 1e-3, f"one sequence, lengths=None: logits differ from effml-tiny's by up to {diff:.2e} (allowed 1e-3)"

# A left-padded batch: 16 and 9 real tokens; row 1 starts with 7 padding tokens (id 0, say)
long, short = torch.randint(0, model.config.vocab_size, (2, 16))
batch = torch.stack((long, torch.cat((torch.zeros(7, dtype=torch.long), short[:9]))))  # (2, 16)
padded = logits_with_your_block(batch, torch.tensor([16, 9]))
assert torch.isfinite(padded).all(), "padding rows must stay finite (a query with no visible key gives zeros)"
with torch.no_grad():
    for row, seq in ((0, long), (1, short[:9])):
        diff = (padded[row, -len(seq):] - model(seq[None])[0]).abs().max().item()
        assert diff < 1e-3, (f"row {row} ({len(seq)} real tokens after {16 - len(seq)} padding): its logits differ "
                             f"from the sequence run alone by up to {diff:.2e}: no query may attend to a padding key")
print("part 4: visible tests passed")

# %% nbgrader={"grade_id": "p4_tests"} graded={"part": "block"}

# %% [markdown] nbgrader={"grade_id": "p5_intro", "locked": true}
# ## Part 5 · Speed (2 points)
#
# Nothing new to write: this part times your `attention` from part 1. A correct attention can
# still be slow. The natural first version loops over queries (`for i in range(Tq)`), and each pass
# launches a handful of small ops: every op costs microseconds of Python and dispatch overhead however
# little it computes, so the loop pays that overhead `Tq` times, and its matrix–vector products leave the
# fast matrix–matrix kernels unused. Computing all queries at once (one `q @ kᵀ`, one mask, one softmax,
# one `@ v`) pays it once.
#
# **The rule:** on the grading machine (its CPU, one thread), with `q`, `k`, `v` of shape `(1, 4, T, 64)` in
# float32, your attention must be correct and take **at most 4×** the time of the library's readable
# reference, `effml_lib.attention.attention_reference`, at `T = 128`. The graded cell shows its
# measurement as a plot. The cell below makes the same comparison on your machine.

# %% nbgrader={"grade_id": "p5_visible", "locked": true}
# Your attention against the reference on this machine (not graded)
import pandas as pd

from effml_lib.attention import attention_reference
from effml_lib.measure import benchmark
from effml_lib.plots import latency_vs_size

rows = []
for t in (32, 64, 128):
    q, k, v = (torch.randn(1, 4, t, 64) for _ in range(3))  # (B, H, T, D)
    for name, fn in (("your attention", attention), ("reference", attention_reference)):
        rows.append({"seq_len": t, "implementation": name, **benchmark(fn, q, k, v, reps=10).to_dict()})
timings = pd.DataFrame(rows)
latency_vs_size(timings, "seq_len", hue="implementation", xlabel="sequence length T (tokens)",
                title="Causal attention, (1, 4, T, 64), float32")
at_128 = timings[timings.seq_len == 128].set_index("implementation").median_ms
print(f"at T = 128 yours takes {at_128['your attention'] / at_128['reference']:.1f}× the reference's time "
      f"(graded: at most 4×)")

# %% [markdown] nbgrader={"grade_id": "p5_plot_note", "locked": true}
# The plot shows the median latency of each implementation at each length, on log–log axes: a vectorized
# attention's line lies near or below the reference's, while a loop over queries lies far above it, most
# of all at short lengths, where its per-op overhead is nearly all of its time.

# %% nbgrader={"grade_id": "p5_tests"} graded={"part": "performance"}
