# %% [markdown] nbgrader={"grade_id": "intro", "locked": true}
# # Lab 04 · Grouped-query attention
#
# You will write attention in which groups of query heads share one key/value head, without ever
# copying K and V per query head, and the conversion the GQA paper used to turn a multi-head model into
# a grouped one: average each group's key and value projection heads. Part 4 checks what grouping is
# for: memory. Notebook `04_gqa` explains each piece; read it first.
#
# Each part asks for a function of the library, under the library's name and with its arguments:
# `attention`, `pool_heads` and `mha_to_gqa` of `effml_lib.attention`. How this lab is graded: each
# part has **visible tests** (run them as often as you like; a failure says what is wrong) and a
# **graded cell** whose hidden tests decide that part's points (10 in all). While your code is graded,
# the library's attention, its head pooling and its conversion (`effml_lib.attention`) are unavailable,
# and so is PyTorch's fused attention. Do not edit or delete the read-only cells.

# %% shared="colab_setup" nbgrader={"grade_id": "colab_setup", "locked": true}

# %% nbgrader={"grade_id": "imports", "locked": true}
import math

import torch

from effml_lib.checkpoints import pretrained
from effml_lib.model import ModelConfig, Transformer

torch.manual_seed(0)

# %% [markdown] nbgrader={"grade_id": "p1_intro", "locked": true}
# ## Part 1 · Attention with shared key/value heads (3 points)
#
# `attention(q, k, v, causal=True, mask=None)` is the library's `effml_lib.attention.attention`. Lab 01
# asked it for as many key/value heads as query heads; here the heads are shared. It takes `q` of shape
# `(B, H, Tq, D)` and `k`, `v` of shape `(B, Hkv, Tk, D)`, where `Hkv` divides `H` (MHA: `Hkv = H`; GQA:
# fewer; MQA: `Hkv = 1`). Query head `h` uses key/value head `h // (H // Hkv)`: heads `0 … G−1` share KV
# head 0, and so on, with `G = H // Hkv`. It returns `softmax(q kᵀ / √D + mask) v` of shape
# `(B, H, Tq, D)` in `q`'s dtype, computing the softmax in float32.
#
# - With `causal=True` the causal mask is aligned to the **end** of the keys (query `i` sees keys
#   `0 … Tk − Tq + i`), so `Tq = 1` is a decode step that sees every key. `causal=False`: every key.
# - `mask`, when given, is a boolean tensor that broadcasts to `(B, H, Tq, Tk)` (for example `(Tq, Tk)`,
#   a padding mask `(B, 1, 1, Tk)`, or one per head `(1, H, Tq, Tk)`), `True` where a query may attend to a
#   key. It is combined with the causal mask: a key counts only when both allow it.
# - A query with no allowed key at all returns **zeros** (softmax over nothing would be NaN).
#
# **Do not copy K or V per query head** (no `repeat_interleave`, no `expand(...).reshape(...)` of K/V to
# `H` heads): fold the `G` query heads of a group into the query axis, `(B, Hkv, G·Tq, D)`, so one batched
# matrix product serves the whole group. Part 4 measures your function's peak memory on a shape where a
# copy would be 32 times the cache.
#
# The visible tests compare your function with the library's readable reference,
# `effml_lib.attention.attention_reference`: it works while you run this notebook, and, like the
# library's `attention`, it is unavailable while your code is graded, so your `attention` must compute
# the answer itself.

# %% nbgrader={"grade_id": "p1_solution", "solution": true}
def attention(q, k, v, causal=True, mask=None):
    ### BEGIN SOLUTION
    b, h, tq, d = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    g = h // h_kv
    q_grouped = q.float().reshape(b, h_kv, g * tq, d)  # (B, Hkv, G*Tq, D): a group's heads are adjacent
    scores = q_grouped @ k.float().transpose(-2, -1) / math.sqrt(d)  # (B, Hkv, G*Tq, Tk)
    scores = scores.view(b, h_kv, g, tq, tk)  # one (Tq, Tk) block per query head
    allowed = None
    if causal:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)  # (Tq, Tk), end-aligned
    if mask is not None:
        # (B|1, H|1, Tq|1, Tk|1) -> (B, H, Tq, Tk) -> (B, Hkv, G, Tq, Tk): query head h is member h % G of group h // G
        grouped = torch.broadcast_to(mask, (b, h, tq, tk)).reshape(b, h_kv, g, tq, tk)
        allowed = grouped if allowed is None else allowed & grouped
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num_(0.0)  # a query with no allowed key: zeros, not NaN (in place: no copy)
    out = probs.view(b, h_kv, g * tq, tk) @ v.float()  # (B, Hkv, G*Tq, D)
    return out.view(b, h, tq, d).to(q.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p1_visible", "locked": true}
# Visible tests for part 1: every head ratio, prefill and decode, each kind of mask, low precision
from effml_lib.attention import attention_reference  # the definition to compare with (unavailable while graded)


def check_attention(what, b, h, h_kv, tq, tk, d=16, dtype=torch.float32, causal=True, mask=None):
    q = torch.randn(b, h, tq, d).to(dtype)
    k, v = torch.randn(b, h_kv, tk, d).to(dtype), torch.randn(b, h_kv, tk, d).to(dtype)
    try:
        out = attention(q, k, v, causal=causal, mask=mask)
    except Exception as error:  # noqa: BLE001 - say which input form it was
        raise AssertionError(f"{what}: your attention raised {type(error).__name__}: {error}") from error
    assert isinstance(out, torch.Tensor) and out.shape == q.shape, (
        f"{what}: the output's shape should be q's, {tuple(q.shape)}, got {getattr(out, 'shape', type(out).__name__)}")
    assert out.dtype == dtype, f"{what}: return q's dtype ({dtype}), got {out.dtype}"
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    expected = attention_reference(q, k, v, causal=causal, mask=mask)
    assert torch.allclose(out.double(), expected.double(), atol=tolerance, rtol=tolerance), (
        f"{what}, causal={causal}: wrong output (q {tuple(q.shape)}, k/v {tuple(k.shape)}); "
        f"query head i uses KV head i // {h // h_kv}")
    return q, k, v, out


check_attention("8 query heads, 8 KV heads (MHA)", 2, 8, 8, 5, 5)
_, _, _, out = check_attention("8 query heads, 2 KV heads (GQA): query head h uses KV head h // 4", 2, 8, 2, 5, 5)
check_attention("8 query heads, 2 KV heads, causal=False: every query sees every key", 2, 8, 2, 5, 5, causal=False)
check_attention("6 query heads, 1 KV head (MQA), 3 queries after 4 cached keys: query i sees keys 0 .. 4 + i",
                3, 6, 1, 3, 7, d=8)
check_attention("12 query heads, 3 KV heads, a decode step (1 query, 40 keys): it sees every key", 1, 12, 3, 1, 40, d=32)
q, k, v, _ = check_attention("32 query heads, 8 KV heads (Llama-3-8B's groups), 2 queries, 100 keys", 1, 32, 8, 2, 100, d=64)
for dtype in (torch.bfloat16, torch.float16):
    check_attention(f"8 query heads, 2 KV heads in {dtype}: compute in float32, return q's dtype", 1, 8, 2, 3, 7, d=32, dtype=dtype)

b, h, tq, tk = 2, 8, 3, 7  # 8 query heads over 2 KV heads; 3 new queries after 4 cached keys
masks = {  # every shape that broadcasts to (B, H, Tq, Tk); True = may attend
    "a mask (Tq, Tk)": torch.rand(tq, tk) < 0.7,
    "a padding mask (B, 1, 1, Tk)": torch.rand(b, 1, 1, tk) < 0.7,
    "a mask per sequence (B, 1, Tq, Tk)": torch.rand(b, 1, tq, tk) < 0.7,
    "a mask per head (1, H, Tq, Tk): head h's mask goes with query head h": torch.rand(1, h, tq, tk) < 0.7,
    "a mask per sequence and head (B, H, Tq, Tk)": torch.rand(b, h, tq, tk) < 0.7,
}
for name, mask in masks.items():
    for causal in (True, False):
        check_attention(f"8 query heads, 2 KV heads, with {name}" + (" and the causal mask: both must allow a key"
                        if causal else ""), b, h, 2, tq, tk, causal=causal, mask=mask)

nothing = torch.ones(b, 1, tq, tk, dtype=torch.bool)
nothing[0, :, 1] = False  # sequence 0, query 1: the mask allows no key
nothing[1, :, :, :6] = False  # sequence 1: only key 6, which the causal mask hides from queries 0 and 1
out = attention(torch.randn(b, h, tq, 16), torch.randn(b, 2, tk, 16), torch.randn(b, 2, tk, 16), mask=nothing)
empty = torch.cat([out[0, :, 1].flatten(), out[1, :, :2].flatten()])  # the queries with no allowed key
assert torch.equal(empty, torch.zeros_like(empty)), (
    f"a query with no allowed key (by the mask, or by the mask and the causal mask together) must return zeros, "
    f"got {'NaN' if empty.isnan().any() else f'largest |value| {empty.abs().max():.3g}'}")
check_attention("queries with no allowed key among others", b, h, 2, tq, tk, mask=nothing)

decode = attention(q[:, :, -1:], k, v)
assert torch.allclose(decode, attention(q, k, v)[:, :, -1:], atol=1e-5), (
    "one query against 100 keys is the last row of 2 queries: align the causal mask to the end of the keys")
print("part 1: visible tests passed")


# %% nbgrader={"grade_id": "p1_tests"} graded={"part": "attention"}

# %% [markdown] nbgrader={"grade_id": "p2_intro", "locked": true}
# ## Part 2 · Mean-pooling projection heads (2 points)
#
# A projection `nn.Linear(dim, n_heads · D)` stores its weight as `(n_heads · D, dim)`: rows
# `i·D … (i+1)·D − 1` produce head `i`. `pool_heads(weight, head_dim, n_groups)` (the library's
# `effml_lib.attention.pool_heads`) returns the weight (or a bias, shape `(n_heads · D,)`) of a projection
# with `n_groups` heads, new head `g` being the **mean** of old heads `g·G … (g+1)·G − 1`, with
# `G = n_heads // n_groups`. Average in float32, round once to the input's dtype, and leave the input as
# it was. If `n_groups` does not divide the number of heads, raise a `ValueError` whose message names
# `n_groups`.

# %% nbgrader={"grade_id": "p2_solution", "solution": true}
def pool_heads(weight, head_dim, n_groups):
    ### BEGIN SOLUTION
    n_heads = weight.shape[0] // head_dim
    if n_groups <= 0 or n_heads % n_groups:
        raise ValueError(f"n_groups ({n_groups}) must divide the {n_heads} heads")
    rest = weight.shape[1:]  # (dim,) for a weight, () for a bias
    grouped = weight.float().reshape(n_groups, n_heads // n_groups, head_dim, *rest)  # (n_groups, G, D, ...)
    return grouped.mean(dim=1).reshape(n_groups * head_dim, *rest).to(weight.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p2_visible", "locked": true}
# Visible tests for part 2: weights and biases, every grouping, bfloat16, the input kept, the error
weight = torch.randn(12, 3)
before = weight.clone()
pool_heads(weight, 2, 3)
assert torch.equal(weight, before), "pool_heads must leave its input as it was (6 heads of 2 into 3 groups)"
w = torch.arange(8.0)[:, None].expand(8, 3)  # 4 heads of head_dim 2; row r holds r
pooled = pool_heads(w, head_dim=2, n_groups=2)
assert pooled.shape == (4, 3), f"2 heads of 2 rows: shape (4, 3), got {tuple(pooled.shape)}"
assert pooled[:, 0].tolist() == [1.0, 2.0, 5.0, 6.0], (
    f"new head 0 = mean of old heads 0 and 1: rows [1, 2], new head 1 of heads 2 and 3: [5, 6]; got {pooled[:, 0].tolist()}")
six = torch.arange(12.0)[:, None].expand(12, 3)  # 6 heads of head_dim 2
assert pool_heads(six, 2, 3)[:, 0].tolist() == [1.0, 2.0, 5.0, 6.0, 9.0, 10.0], (
    "6 heads into 3 groups: new head g = mean of old heads 2g and 2g + 1: rows [1, 2, 5, 6, 9, 10]")
assert pool_heads(six, 2, 1)[:, 0].tolist() == [5.0, 6.0], "6 heads into 1 (MQA): the mean of all six, rows [5, 6]"
assert torch.equal(pool_heads(w, 2, 4), w), "4 heads into 4 groups: each head is its own group, the weight comes back as it was"
try:
    bias = pool_heads(torch.arange(8.0), 2, 1)
except Exception as error:  # noqa: BLE001 - say which input form it was
    raise AssertionError(f"a bias (n_heads * D,) of 4 heads of 2 into 1: your pool_heads raised {type(error).__name__}: {error}") from error
assert bias.shape == (2,) and bias.tolist() == [3.0, 4.0], "a bias (n_heads * D,) pools the same way: 4 heads of 2 into 1, [3, 4]"

low = torch.tensor([[1.0], [2**-8], [2**-8]], dtype=torch.bfloat16)  # 3 heads of head_dim 1, in bfloat16
got = pool_heads(low, 1, 1)
assert got.dtype == torch.bfloat16, f"return the input's dtype (bfloat16), got {got.dtype}"
assert got.item() == 0.3359375, (
    f"the mean of 1, 1/256 and 1/256 is 43/128 = 0.3359375, which bfloat16 holds: average in float32 and round "
    f"once (added in bfloat16, 1 + 1/256 rounds to 1 first); got {got.item()}")

for n_groups in (4, 5):
    try:
        pool_heads(weight, 2, n_groups)
        raised = None
    except Exception as error:  # noqa: BLE001 - which exception is the test
        raised = error
    assert isinstance(raised, ValueError) and "n_groups" in str(raised), (
        f"6 heads cannot form {n_groups} groups: raise a ValueError whose message names n_groups, got {raised!r}")
print("part 2: visible tests passed")

# %% nbgrader={"grade_id": "p2_tests"} graded={"part": "pooling"}

# %% [markdown] nbgrader={"grade_id": "p3_intro", "locked": true}
# ## Part 3 · Converting a model (3 points)
#
# `mha_to_gqa(model, n_kv_heads)` (the library's `effml_lib.attention.mha_to_gqa`, which also takes a
# single `Attention` layer; a course `Transformer` is all this lab asks) returns a **copy** of the model
# whose every layer has `n_kv_heads` key/value heads, by your `pool_heads` applied to each layer's
# `attention.wk` and `attention.wv` (weights, and biases if they have them); the query and output
# projections and everything else are unchanged, and so is `model`. It works from an MHA model and from a
# GQA one with a multiple of `n_kv_heads` KV heads. In each layer replace `attention.wk` and
# `attention.wv` with new `torch.nn.Linear` layers holding the pooled weights, set
# `attention.n_kv_heads`, and give the copy a config with the new count:
# `dataclasses.replace(model.config, n_kv_heads=n_kv_heads)`. `copy.deepcopy(model)` makes the copy.
# The model's own attention then groups the heads for you.

# %% nbgrader={"grade_id": "p3_solution", "solution": true}
import copy
import dataclasses


def mha_to_gqa(model, n_kv_heads):
    ### BEGIN SOLUTION
    converted = copy.deepcopy(model)
    for block in converted.layers:
        attn = block.attention
        for name in ("wk", "wv"):
            old = getattr(attn, name)  # (old KV heads * D, dim)
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
# Visible tests for part 3: GQA and MQA, with and without biases, from MHA and from GQA, every layer
def labelled_model(n_kv_heads, qkv_bias):
    """A small course Transformer (6 query heads of 8, 2 layers) whose K and V projections say which
    head each row belongs to: every weight of KV head i is i / 100, every bias i / 10."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, dim=48, n_layers=2, n_heads=6, n_kv_heads=n_kv_heads, hidden_dim=96,
                         max_seq_len=32, qkv_bias=qkv_bias)
    model = Transformer(config).eval()
    label = torch.arange(n_kv_heads).float().repeat_interleave(8)  # (Hkv * D,): row r is head r // 8
    with torch.no_grad():
        for block in model.layers:
            for proj in (block.attention.wk, block.attention.wv):
                proj.weight.copy_(label[:, None].expand(-1, 48) / 100)
                if qkv_bias:
                    proj.bias.copy_(label / 10)
    return model


def check_conversion(n_kv_from, n_kv_to, qkv_bias, means):
    """Convert a labelled model; ``means`` are the new heads' labels: each the mean of its group's old labels."""
    what = f"6 query heads, {n_kv_from} KV heads to {n_kv_to}{' with q/k/v biases' if qkv_bias else ''}"
    model = labelled_model(n_kv_from, qkv_bias)
    before = {n: p.clone() for n, p in model.named_parameters()}
    try:
        converted = mha_to_gqa(model, n_kv_to)
    except Exception as error:  # noqa: BLE001 - say which input form it was
        raise AssertionError(f"{what}: your mha_to_gqa raised {type(error).__name__}: {error}") from error
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and model.config.n_kv_heads == n_kv_from \
        and all(block.attention.n_kv_heads == n_kv_from for block in model.layers), (
            f"{what}: return a converted copy and leave the model you were given as it was")
    assert converted.config.n_kv_heads == n_kv_to, f"{what}: the copy's config must say n_kv_heads={n_kv_to}"
    rows = torch.tensor(means).repeat_interleave(8)  # (n_kv_to * D,): each new head's label on its 8 rows
    for i, block in enumerate(converted.layers):
        assert block.attention.n_kv_heads == n_kv_to, f"{what}: layer {i}'s attention.n_kv_heads must be {n_kv_to}"
        for name in ("wk", "wv"):
            proj = getattr(block.attention, name)
            assert proj.weight.shape == (n_kv_to * 8, 48) and torch.allclose(proj.weight, rows[:, None].expand(-1, 48) / 100), (
                f"{what}: layer {i}'s {name} must have {n_kv_to} heads whose weights are the means {means} / 100 "
                f"of their groups' old heads (old head i holds i / 100)")
            if qkv_bias:
                assert proj.bias is not None and proj.bias.shape == (n_kv_to * 8,) and torch.allclose(proj.bias, rows / 10), (
                    f"{what}: layer {i}'s {name}.bias must be pooled too: {means} / 10 per head")
    for n, p in converted.named_parameters():
        if ".wk." not in n and ".wv." not in n:
            assert torch.equal(p, before[n]), f"{what}: {n} must be copied unchanged"
    with torch.no_grad():
        logits = converted(torch.randint(0, 50, (2, 9)))
    assert logits.shape == (2, 9, 50) and torch.isfinite(logits).all(), f"{what}: the converted model must run"


check_conversion(6, 2, qkv_bias=True, means=[1.0, 4.0])        # GQA: heads 0-2 and 3-5
check_conversion(6, 3, qkv_bias=False, means=[0.5, 2.5, 4.5])  # GQA: pairs of heads
check_conversion(6, 1, qkv_bias=True, means=[2.5])             # MQA: all six heads
check_conversion(2, 1, qkv_bias=False, means=[0.5])            # from a GQA model: its two KV heads

tiny = pretrained("effml-tiny")  # the course model: MHA, 6 heads of 64
tokens = torch.randint(0, tiny.config.vocab_size, (1, 16))
converted = mha_to_gqa(tiny, 2)
assert converted.config.n_kv_heads == 2 and converted.layers[0].attention.wk.weight.shape == (2 * 64, 384), (
    "effml-tiny to 2 KV heads: every layer's wk must become 2 heads of 64, weight (128, 384)")
same = mha_to_gqa(tiny, 6)
with torch.no_grad():
    assert torch.allclose(same(tokens), tiny(tokens), atol=1e-5), "converting to as many KV heads as it has changes nothing"
print("part 3: visible tests passed")

# %% nbgrader={"grade_id": "p3_tests"} graded={"part": "conversion"}

# %% [markdown] nbgrader={"grade_id": "p4_intro", "locked": true}
# ## Part 4 · What grouping saves (2 points)
#
# Nothing new to write: this part measures your `attention` from part 1 at a decode step of a
# Llama-3-8B-sized layer with MQA: one query token, 32 query heads, **1** KV head of 128, 16 384 cached
# tokens, float32. K and V take 8 MiB each; a copy per query head would take 256 MiB each.
#
# **The rule:** on the grading machine (CPU), your function must give the right answer, its peak memory
# (tensors alive at once, above the inputs) must be at most 16 MiB, and its time at most 3× the library's
# reference. The cell below checks the answer and the memory on your machine, and prints the time (which
# is judged on the grading machine, against the reference timed there in turns with yours).

# %% nbgrader={"grade_id": "p4_visible", "locked": true}
# Your attention at an MQA decode step on this machine: the answer and the memory are checked, the time printed
from effml_lib.attention import attention_reference
from effml_lib.measure import benchmark, peak_memory

q = torch.randn(1, 32, 1, 128)  # (B, H, 1, D): one new token
k, v = torch.randn(1, 1, 16384, 128), torch.randn(1, 1, 16384, 128)  # (B, 1, S, D): the whole cache
out, peak = peak_memory(attention, q, k, v)
assert torch.allclose(out.double(), attention_reference(q, k, v).double(), atol=1e-5), (
    "wrong output at an MQA decode step (32 query heads, 1 KV head, 16 384 keys): only a correct attention is measured")
_, copied = peak_memory(lambda k, v: (k.repeat_interleave(32, dim=1), v.repeat_interleave(32, dim=1)), k, v)  # the copies alone
yours = benchmark(attention, q, k, v, reps=10).median_ms
reference = benchmark(attention_reference, q, k, v, reps=10).median_ms
print(f"peak memory: yours {peak / 2**20:.1f} MiB; copying K and V per query head alone takes {copied / 2**20:.0f} MiB "
      f"(graded: at most 16 MiB)")
print(f"time: yours {yours:.2f} ms, the library's reference {reference:.2f} ms, {yours / reference:.1f}× (graded: at most 3×)")
assert peak <= 16 * 2**20, (
    f"peak memory {peak / 2**20:.0f} MiB at 32 query heads, 1 KV head, 16 384 tokens (allowed 16 MiB; K and V are "
    f"8 MiB each): do not copy K/V per query head, fold the group's heads into the query axis")
print("part 4: visible tests passed")

# %% nbgrader={"grade_id": "p4_tests"} graded={"part": "memory"}
