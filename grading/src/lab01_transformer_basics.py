# %% [markdown] nbgrader={"grade_id": "intro", "locked": true}
# # Lab 01 · Transformer basics
#
# You will write the four pieces of a Llama-style decoder block and check that, with the course model's
# weights, your block reproduces `effml-tiny` exactly; part 5 then times your attention. Notebook
# `01_transformer_basics` explains each piece; read it first.
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
# ## Part 1 · Causal attention (3 points)
#
# `causal_attention(q, k, v)` takes `q` of shape `(B, H, Tq, D)` and `k`, `v` of shape `(B, H, Tk, D)`
# with `Tq <= Tk`, and returns `softmax(q kᵀ / √D + mask) v`, shape `(B, H, Tq, D)`, in `q`'s dtype.
#
# The mask is causal and aligned to the **end** of the keys: query `i` sits at position `Tk - Tq + i`
# and sees keys `0 … Tk - Tq + i`. With `Tq = 1` (a decode step) the query sees every key. Compute the
# softmax in float32 so bf16/fp16 inputs stay accurate.
#
# Write the softmax yourself: while parts 1, 4 and 5 are graded, PyTorch's fused attention
# (`F.scaled_dot_product_attention`, however you import it) is unavailable, and calling it fails the part.

# %% nbgrader={"grade_id": "p1_solution", "solution": true}
def causal_attention(q, k, v):
    ### BEGIN SOLUTION
    tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(d)  # (B, H, Tq, Tk)
    visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p1_visible", "locked": true}
# Visible tests for part 1
q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
out = causal_attention(q, k, v)
assert out.shape == (1, 2, 4, 8), f"output shape should be (1, 2, 4, 8), got {tuple(out.shape)}"
assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-6), "the first query can only see the first key, so it must return v[0]"
last = causal_attention(q[:, :, -1:], k, v)
assert torch.allclose(last, out[:, :, -1:], atol=1e-5), (
    "one query against 4 keys must equal the last row of the full result: align the mask to the end of the keys")
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
print("part 3: visible tests passed")


# %% nbgrader={"grade_id": "p3_tests"} graded={"part": "swiglu"}

# %% [markdown] nbgrader={"grade_id": "p4_intro", "locked": true}
# ## Part 4 · A pre-norm decoder block (3 points)
#
# `decoder_block(x, block, rope_cos, rope_sin)` computes one block of `effml-tiny` with **your** parts
# from above and the weights of `block` (an `effml_lib.model.Block`: `block.attention_norm.weight`,
# `block.attention.wq.weight` … `wo`, `block.ffn_norm.weight`, `block.feed_forward.w1/w2/w3.weight`;
# `block.attention.n_heads` and `.head_dim`):
#
#     h = x + attention(rms_norm(x)) · wo        (q, k rotated by apply_rope(·, rope_cos, rope_sin))
#     out = h + swiglu(rms_norm(h))
#
# `x` is `(B, T, dim)`; `rope_cos`, `rope_sin` are `(T, head_dim / 2)`.

# %% nbgrader={"grade_id": "p4_solution", "solution": true}
def decoder_block(x, block, rope_cos, rope_sin):
    ### BEGIN SOLUTION
    attn, ffn = block.attention, block.feed_forward
    b, t, _ = x.shape
    h = rms_norm(x, block.attention_norm.weight, block.attention_norm.eps)
    q = F.linear(h, attn.wq.weight).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = F.linear(h, attn.wk.weight).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = F.linear(h, attn.wv.weight).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
    out = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)  # (B, T, H*D)
    x = x + F.linear(out, attn.wo.weight)
    h = rms_norm(x, block.ffn_norm.weight, block.ffn_norm.eps)
    return x + swiglu(h, ffn.w1.weight, ffn.w2.weight, ffn.w3.weight)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p4_visible", "locked": true}
# Visible tests for part 4: your block inside effml-tiny must give the model's own logits
model = pretrained("effml-tiny")
tokens = torch.randint(0, model.config.vocab_size, (1, 16))
cos, sin = model.rope_tables("cpu")
with torch.no_grad():
    x = model.tok_embeddings(tokens)
    for block in model.layers:
        x = decoder_block(x, block, cos[:16], sin[:16])
    diff = (model.output(model.norm(x)) - model(tokens)).abs().max().item()
assert diff < 1e-3, f"logits differ from effml-tiny's by up to {diff:.2e}"
print(f"part 4: visible tests passed (max logit difference {diff:.1e})")

# %% nbgrader={"grade_id": "p4_tests"} graded={"part": "block"}

# %% [markdown] nbgrader={"grade_id": "p5_intro", "locked": true}
# ## Part 5 · Speed (2 points)
#
# Nothing new to write: this part times your `causal_attention` from part 1. A correct attention can
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
# Your causal_attention against the reference on this machine (not graded)
import pandas as pd

from effml_lib.attention import attention_reference
from effml_lib.measure import benchmark
from effml_lib.plots import latency_vs_size

rows = []
for t in (32, 64, 128):
    q, k, v = (torch.randn(1, 4, t, 64) for _ in range(3))  # (B, H, T, D)
    for name, fn in (("your causal_attention", causal_attention), ("reference", attention_reference)):
        rows.append({"seq_len": t, "implementation": name, **benchmark(fn, q, k, v, reps=10).to_dict()})
timings = pd.DataFrame(rows)
latency_vs_size(timings, "seq_len", hue="implementation", xlabel="sequence length T (tokens)",
                title="Causal attention, (1, 4, T, 64), float32")
at_128 = timings[timings.seq_len == 128].set_index("implementation").median_ms
print(f"at T = 128 yours takes {at_128['your causal_attention'] / at_128['reference']:.1f}× the reference's time "
      f"(graded: at most 4×)")

# %% [markdown] nbgrader={"grade_id": "p5_plot_note", "locked": true}
# The plot shows the median latency of each implementation at each length, on log–log axes: a vectorized
# attention's line lies near or below the reference's, while a loop over queries lies far above it, most
# of all at short lengths, where its per-op overhead is nearly all of its time.

# %% nbgrader={"grade_id": "p5_tests"} graded={"part": "performance"}
