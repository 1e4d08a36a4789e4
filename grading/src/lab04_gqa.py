# %% [markdown] nbgrader={"grade_id": "intro", "locked": true}
# # Lab 04 · Grouped-query attention
#
# You will write attention in which groups of query heads share one key/value head, without ever
# copying K and V per query head, and the conversion the GQA paper used to turn a multi-head model into
# a grouped one: average each group's key and value projection heads. Part 4 checks what grouping is
# for: memory. Notebook `04_gqa` explains each piece; read it first.
#
# How this lab is graded: each part has **visible tests** (run them as often as you like; a failure says
# what is wrong) and a **graded cell** whose hidden tests decide that part's points (10 in all). While
# your code is graded, the library's attention and its conversion (`effml_lib.attention`) are
# unavailable, and so is PyTorch's fused attention. Do not edit or delete the read-only cells.

# %% shared="colab_setup" nbgrader={"grade_id": "colab_setup", "locked": true}

# %% nbgrader={"grade_id": "imports", "locked": true}
import math

import torch
import torch.nn.functional as F

from effml_lib.checkpoints import pretrained

torch.manual_seed(0)


def repeated_heads_attention(q, k, v, causal=True):
    # The definition, for the visible tests: every query head gets its own copy of its group's K/V,
    # then plain attention. This is what you must NOT do: it makes H / Hkv copies of the cache.
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, Tk, D)
    tq, tk = q.shape[2], k.shape[2]
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


# %% [markdown] nbgrader={"grade_id": "p1_intro", "locked": true}
# ## Part 1 · Attention with shared key/value heads (3 points)
#
# `grouped_attention(q, k, v, causal=True)` takes `q` of shape `(B, H, Tq, D)` and `k`, `v` of shape
# `(B, Hkv, Tk, D)`, where `Hkv` divides `H` (MHA: `Hkv = H`; GQA: fewer; MQA: `Hkv = 1`). Query head `h`
# uses key/value head `h // (H // Hkv)`: heads `0 … G−1` share KV head 0, and so on, with `G = H // Hkv`.
# It returns `softmax(q kᵀ / √D + mask) v` of shape `(B, H, Tq, D)` in `q`'s dtype, computing the softmax in
# float32. With `causal=True` the mask is aligned to the **end** of the keys (query `i` sees keys
# `0 … Tk − Tq + i`), so `Tq = 1` is a decode step that sees every key.
#
# **Do not copy K or V per query head** (no `repeat_interleave`, no `expand(...).reshape(...)` of K/V to
# `H` heads): fold the `G` query heads of a group into the query axis, `(B, Hkv, G·Tq, D)`, so one batched
# matrix product serves the whole group. A hidden test measures your function's peak memory on a shape
# where a copy would be 32 times the cache.

# %% nbgrader={"grade_id": "p1_solution", "solution": true}
def grouped_attention(q, k, v, causal=True):
    ### BEGIN SOLUTION
    b, h, tq, d = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    g = h // h_kv
    q_grouped = q.float().reshape(b, h_kv, g * tq, d)  # (B, Hkv, G*Tq, D): a group's heads are adjacent
    scores = q_grouped @ k.float().transpose(-2, -1) / math.sqrt(d)  # (B, Hkv, G*Tq, Tk)
    if causal:
        visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)  # (Tq, Tk)
        scores = scores.view(b, h_kv, g, tq, tk).masked_fill(~visible, float("-inf")).view(b, h_kv, g * tq, tk)
    out = scores.softmax(dim=-1) @ v.float()  # (B, Hkv, G*Tq, D)
    return out.view(b, h, tq, d).to(q.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p1_visible", "locked": true}
# Visible tests for part 1
q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
out = grouped_attention(q, k, v)
assert out.shape == (2, 8, 5, 16), f"output shape should be (2, 8, 5, 16), got {tuple(out.shape)}"
assert torch.allclose(out.double(), repeated_heads_attention(q, k, v).double(), atol=1e-5), (
    "8 query heads, 2 KV heads: query head h must use KV head h // 4")
decode = grouped_attention(q[:, :, -1:], k, v)
assert torch.allclose(decode, out[:, :, -1:], atol=1e-5), "one query against 5 keys is the last row: align the mask to the end"
print("part 1: visible tests passed")


# %% nbgrader={"grade_id": "p1_tests"} graded={"part": "attention"}

# %% [markdown] nbgrader={"grade_id": "p2_intro", "locked": true}
# ## Part 2 · Mean-pooling projection heads (2 points)
#
# A projection `nn.Linear(dim, n_heads · D)` stores its weight as `(n_heads · D, dim)`: rows
# `i·D … (i+1)·D − 1` produce head `i`. `pool_heads(weight, head_dim, n_groups)` returns the weight (or a
# bias, shape `(n_heads · D,)`) of a projection with `n_groups` heads, new head `g` being the **mean** of
# old heads `g·G … (g+1)·G − 1`, with `G = n_heads // n_groups`. Average in float32 and return the input's
# dtype. If `n_groups` does not divide the number of heads, raise a `ValueError` whose message names
# `n_groups`.

# %% nbgrader={"grade_id": "p2_solution", "solution": true}
def pool_heads(weight, head_dim, n_groups):
    ### BEGIN SOLUTION
    n_heads = weight.shape[0] // head_dim
    if n_groups <= 0 or n_heads % n_groups:
        raise ValueError(f"n_groups ({n_groups}) must divide the {n_heads} heads")
    grouped = weight.float().reshape(n_groups, n_heads // n_groups, head_dim, *weight.shape[1:])  # (n_groups, G, D, ...)
    return grouped.mean(dim=1).reshape(n_groups * head_dim, *weight.shape[1:]).to(weight.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p2_visible", "locked": true}
# Visible tests for part 2
w = torch.arange(8.0)[:, None].expand(8, 3)  # 4 heads of head_dim 2; row r holds r
pooled = pool_heads(w, head_dim=2, n_groups=2)
assert pooled.shape == (4, 3), f"2 heads of 2 rows: shape (4, 3), got {tuple(pooled.shape)}"
assert pooled[:, 0].tolist() == [1.0, 2.0, 5.0, 6.0], (
    f"new head 0 = mean of old heads 0 and 1: rows [1, 2], new head 1 of heads 2 and 3: [5, 6]; got {pooled[:, 0].tolist()}")
assert pool_heads(torch.arange(8.0), 2, 1).tolist() == [3.0, 4.0], "a bias pools the same way"
print("part 2: visible tests passed")

# %% nbgrader={"grade_id": "p2_tests"} graded={"part": "pooling"}

# %% [markdown] nbgrader={"grade_id": "p3_intro", "locked": true}
# ## Part 3 · Converting a model (3 points)
#
# `convert_to_gqa(model, n_kv_heads)` returns a **copy** of a course `Transformer` whose every layer has
# `n_kv_heads` key/value heads, by your `pool_heads` applied to each layer's `attention.wk` and `attention.wv`
# (weights, and biases if they have them); the query and output projections and everything else are
# unchanged, and so is `model`. In each layer replace `attention.wk` and `attention.wv` with new
# `torch.nn.Linear` layers holding the pooled weights, set `attention.n_kv_heads`, and give the copy a
# config with the new count: `dataclasses.replace(model.config, n_kv_heads=n_kv_heads)`.
# `copy.deepcopy(model)` makes the copy. The model's own attention then groups the heads for you.

# %% nbgrader={"grade_id": "p3_solution", "solution": true}
import copy
import dataclasses


def convert_to_gqa(model, n_kv_heads):
    ### BEGIN SOLUTION
    converted = copy.deepcopy(model)
    for block in converted.layers:
        attn = block.attention
        for name in ("wk", "wv"):
            old = getattr(attn, name)
            new = torch.nn.Linear(old.in_features, n_kv_heads * attn.head_dim, bias=old.bias is not None,
                                  dtype=old.weight.dtype, device=old.weight.device)
            with torch.no_grad():
                new.weight.copy_(pool_heads(old.weight, attn.head_dim, n_kv_heads))
                if old.bias is not None:
                    new.bias.copy_(pool_heads(old.bias, attn.head_dim, n_kv_heads))
            setattr(attn, name, new)
        attn.n_kv_heads = n_kv_heads
    converted.config = dataclasses.replace(model.config, n_kv_heads=n_kv_heads)
    return converted
    ### END SOLUTION


# %% nbgrader={"grade_id": "p3_visible", "locked": true}
# Visible tests for part 3
tiny = pretrained("effml-tiny")
tokens = torch.randint(0, tiny.config.vocab_size, (1, 16))
converted = convert_to_gqa(tiny, 2)
assert converted is not tiny and tiny.config.n_kv_heads == 6, "return a converted copy; leave the model as it was"
assert converted.config.n_kv_heads == 2 and converted.layers[0].attention.wk.weight.shape == (2 * 64, 384), (
    "every layer's wk must become 2 heads of 64: weight (128, 384)")
with torch.no_grad():
    logits = converted(tokens)
assert logits.shape == (1, 16, tiny.config.vocab_size) and torch.isfinite(logits).all(), "the converted model must run"
same = convert_to_gqa(tiny, 6)
with torch.no_grad():
    assert torch.allclose(same(tokens), tiny(tokens), atol=1e-5), "converting to as many KV heads as it has changes nothing"
print("part 3: visible tests passed")

# %% nbgrader={"grade_id": "p3_tests"} graded={"part": "conversion"}

# %% [markdown] nbgrader={"grade_id": "p4_intro", "locked": true}
# ## Part 4 · What grouping saves (2 points)
#
# Nothing new to write: this part measures your `grouped_attention` from part 1 at a decode step of a
# Llama-3-8B-sized layer with MQA: one query token, 32 query heads, **1** KV head of 128, 16 384 cached
# tokens, float32. K and V take 8 MiB each; a copy per query head would take 256 MiB each.
#
# **The rule:** on the grading machine (CPU), your function must give the right answer, its peak memory
# (tensors alive at once, above the inputs) must be at most 16 MiB, and its time at most 3× the library's
# reference. The cell below measures both on your machine.

# %% nbgrader={"grade_id": "p4_visible", "locked": true}
# Your grouped_attention at an MQA decode step on this machine (not graded)
from effml_lib.attention import attention_reference
from effml_lib.measure import benchmark, peak_memory

q = torch.randn(1, 32, 1, 128)  # (B, H, 1, D): one new token
k, v = torch.randn(1, 1, 16384, 128), torch.randn(1, 1, 16384, 128)  # (B, 1, S, D): the whole cache
_, peak = peak_memory(grouped_attention, q, k, v)
_, copied = peak_memory(repeated_heads_attention, q, k, v)
yours = benchmark(grouped_attention, q, k, v, reps=10).median_ms
reference = benchmark(attention_reference, q, k, v, reps=10).median_ms
print(f"peak memory: yours {peak / 2**20:.1f} MiB, with copied heads {copied / 2**20:.1f} MiB (graded: at most 16 MiB)")
print(f"time: yours {yours:.2f} ms, the library's reference {reference:.2f} ms, {yours / reference:.1f}× (graded: at most 3×)")

# %% nbgrader={"grade_id": "p4_tests"} graded={"part": "memory"}
