# %% [markdown] nbgrader={"grade_id": "intro", "locked": true}
# # Lab 02 · Rotary position embeddings (RoPE)
#
# You will write RoPE as the course library has it: the rotation tables (with the two ways of stretching
# them past the trained context), the rotation itself for both ways of pairing channels, the conversion
# of a checkpoint's projections between pairings, and a use of the property that makes RoPE work: a
# query–key score depends only on the distance between their positions. Part 5 times your rotation.
# Parts 1–3 have the names and argument order of their counterparts in `effml_lib.rope` (less the
# library's `device` and `impl` options). Notebook `02_rope` explains each piece; read it first.
#
# How this lab is graded: each part has **visible tests** (run them as often as you like; a failure says
# what is wrong) and a **graded cell** whose hidden tests decide that part's points (12 in all). While
# your code is graded, the library's own RoPE (`effml_lib.rope`) is unavailable, so call your own
# functions. Do not edit or delete the read-only cells.

# %% shared="colab_setup" nbgrader={"grade_id": "colab_setup", "locked": true}

# %% nbgrader={"grade_id": "imports", "locked": true}
import math

import torch

torch.manual_seed(0)


def complex_rotation(x, positions, theta=10000.0):
    # The definition, for the visible tests: channel pairs (2i, 2i+1) as complex numbers,
    # multiplied by e^{i * position * theta^(-2i/D)}, in float64.
    d = x.shape[-1]
    angles = positions.double()[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (T, D/2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


# %% [markdown] nbgrader={"grade_id": "p1_intro", "locked": true}
# ## Part 1 · The rotation tables (3 points)
#
# `rope_frequencies(head_dim, max_positions, theta=10000.0, scaling=None)` returns `(cos, sin)`, each of
# shape `(max_positions, head_dim // 2)` in float32: row `m`, column `i` holds the cosine and sine of the
# angle `m · θ^(−2i / head_dim)` by which pair `i` of a vector at position `m` is rotated.
#
# `scaling` stretches the tables for contexts longer than the model was trained on:
#
# * `{"type": "linear", "factor": s}`, **position interpolation**: positions are divided by `s`, so
#   position `m` gets the angles of position `m / s`;
# * `{"type": "ntk", "factor": s}`, **NTK-aware scaling**: positions stay, the base grows to
#   `θ' = θ · s^(head_dim / (head_dim − 2))`, which slows the lowest frequency exactly `s` times and
#   leaves the highest one unchanged.
#
# Compute the angles in float32 from integer positions (`torch.arange`), as Hugging Face models do.

# %% nbgrader={"grade_id": "p1_solution", "solution": true}
def rope_frequencies(head_dim, max_positions, theta=10000.0, scaling=None):
    ### BEGIN SOLUTION
    positions = torch.arange(max_positions, dtype=torch.float32)  # (P,)
    if scaling is not None and scaling["type"] == "linear":
        positions = positions / scaling["factor"]
    if scaling is not None and scaling["type"] == "ntk":
        theta = theta * scaling["factor"] ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
    angles = torch.outer(positions, inv_freq)  # (P, D/2)
    return angles.cos(), angles.sin()
    ### END SOLUTION


# %% nbgrader={"grade_id": "p1_visible", "locked": true}
# Visible tests for part 1
cos, sin = rope_frequencies(8, 16)
assert cos.shape == (16, 4) and sin.shape == (16, 4), f"cos, sin should be (16, 4), got {tuple(cos.shape)}, {tuple(sin.shape)}"
assert cos.dtype == torch.float32 and sin.dtype == torch.float32, f"the tables should be float32, got {cos.dtype}, {sin.dtype}"
assert torch.allclose(cos[0], torch.ones(4)) and torch.allclose(sin[0], torch.zeros(4)), "position 0 is not rotated"
assert math.isclose(sin[1, 0].item(), math.sin(1.0), rel_tol=1e-6), "pair 0 turns 1 radian per position"
assert math.isclose(sin[1, 1].item(), math.sin(10000 ** -0.25), rel_tol=1e-5), "pair 1 of 4 turns theta^(-2/8) per position"
assert math.isclose(cos[9, 3].item(), math.cos(9 * 10000 ** -0.75), rel_tol=1e-5), (
    "theta defaults to 10000: position 9, pair 3 of 4 is at angle 9 * 10000^(-6/8)")

cos2, sin2 = rope_frequencies(2, 5)  # head_dim 2: a single pair
assert cos2.shape == (5, 1), f"rope_frequencies(2, 5) should give tables of shape (5, 1), got {tuple(cos2.shape)}"
cos6, sin6 = rope_frequencies(6, 9, theta=100.0)  # head_dim 6: three pairs, another base
assert cos6.shape == (9, 3), f"rope_frequencies(6, 9) should give tables of shape (9, 3), got {tuple(cos6.shape)}"
assert math.isclose(sin6[5, 2].item(), math.sin(5 * 100.0 ** (-4 / 6)), rel_tol=1e-5), (
    "with theta=100, position 5, pair 2 of 3 is at angle 5 * 100^(-4/6): use the theta you are given")
cos_l, sin_l = rope_frequencies(128, 4096, theta=500000.0)  # Llama-3's head size and base, long tables
assert abs(sin_l[4095, 0].item() - math.sin(4095)) < 1e-3 and abs(cos_l[4095, 63].item() - math.cos(4095 * 500000.0 ** (-126 / 128))) < 1e-3, (
    "rope_frequencies(128, 4096, theta=500000.0): wrong angles at position 4095 (compute them in float32)")

cos_pi, sin_pi = rope_frequencies(8, 16, scaling={"type": "linear", "factor": 4})
assert torch.allclose(cos_pi[8], cos[2]) and torch.allclose(sin_pi[8], sin[2]), (
    "with linear scaling by 4, position 8 must get position 2's angles")
cos_pi, sin_pi = rope_frequencies(8, 16, scaling={"type": "linear", "factor": 2.5})
assert torch.allclose(cos_pi[5], cos[2]) and torch.allclose(sin_pi[5], sin[2]), (
    "with linear scaling by 2.5 (factors need not be integers), position 5 must get position 2's angles")

for factor in (4, 8):
    cos_ntk, sin_ntk = rope_frequencies(8, 16, scaling={"type": "ntk", "factor": factor})
    base = 10000.0 * factor ** (8 / 6)  # theta * s^(D / (D - 2))
    assert math.isclose(sin_ntk[3, 1].item(), math.sin(3 * base ** (-2 / 8)), rel_tol=1e-5), (
        f"with NTK scaling by {factor}, position 3, pair 1 is at angle 3 * theta'^(-2/8), theta' = 10000 * {factor}^(8/6)")
    assert torch.allclose(sin_ntk[:, 0], sin[:, 0]), f"NTK scaling by {factor} must leave the fastest pair (i = 0) unchanged"
    assert math.isclose(sin_ntk[1, 3].item(), math.sin(10000 ** -0.75 / factor), rel_tol=1e-5), (
        f"NTK scaling by {factor} must turn the slowest pair {factor} times slower")
print("part 1: visible tests passed")


# %% nbgrader={"grade_id": "p1_tests"} graded={"part": "frequencies"}

# %% [markdown] nbgrader={"grade_id": "p2_intro", "locked": true}
# ## Part 2 · Rotating queries and keys (3 points)
#
# `apply_rope(x, cos, sin, positions=None, interleaved=False)` rotates `x` of shape `(B, H, T, D)` and
# returns the same shape and dtype. Token `t` is at position `positions[t]`, or `t` when `positions` is
# None; `positions` may also be `(B, T)`, one row per sequence (a batch of decode steps, each at its own
# cache length). Positions can be any integers below `cos.shape[0]`, in any order, with repeats. Rotate by
# the rows of the `cos` and `sin` you are given (they may come from any `theta` or scaling), and leave `x`
# as it was: it may be a non-contiguous view, and `x.float()` of a float32 `x` is `x` itself.
#
# Pair `i` is the 2-vector `(x1, x2)`, rotated to `(x1 cos − x2 sin, x2 cos + x1 sin)`, where:
#
# * `interleaved=False` (**half-split**, Hugging Face's Llama): `x1 = x[..., i]`, `x2 = x[..., i + D/2]`;
# * `interleaved=True` (the paper's pairing, Meta's original Llama code): `x1 = x[..., 2i]`, `x2 = x[..., 2i + 1]`.
#
# Compute in float32 and return `x`'s dtype (float32, bfloat16 or float16).

# %% nbgrader={"grade_id": "p2_solution", "solution": true}
def apply_rope(x, cos, sin, positions=None, interleaved=False):
    ### BEGIN SOLUTION
    if positions is None:
        positions = torch.arange(x.shape[2], device=x.device)
    c, s = cos[positions], sin[positions]  # (T, D/2) or (B, T, D/2)
    if positions.dim() == 2:
        c, s = c[:, None], s[:, None]  # (B, 1, T, D/2): broadcast over heads
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return out.to(x.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p2_visible", "locked": true}
# Visible tests for part 2, one per input form the hidden tests use
def expected_rotation(x, positions, interleaved, theta=10000.0):
    # The definition for every input form (float64): positions (T,) or (B, T) (row b: sequence b's
    # positions); half-split pairs (i, i + D/2) are moved side by side, rotated, and moved back.
    if positions.dim() == 2:
        return torch.cat([expected_rotation(x[b:b + 1], positions[b], interleaved, theta) for b in range(x.shape[0])])
    if interleaved:
        return complex_rotation(x, positions, theta)
    side_by_side = torch.stack(x.chunk(2, dim=-1), dim=-1).flatten(-2)  # (i, i + D/2) -> (2i, 2i + 1)
    rotated = complex_rotation(side_by_side, positions, theta)
    return torch.cat((rotated[..., 0::2], rotated[..., 1::2]), dim=-1)  # and back


def check_rotation(what, x, cos, sin, positions=None, interleaved=False, theta=10000.0, atol=1e-5, rtol=0.0):
    # Calls apply_rope(x, cos, sin, positions, interleaved) and compares it with the definition;
    # `what` names the input form and what is expected of it.
    before = x.clone()
    try:
        got = apply_rope(x, cos, sin, positions, interleaved=interleaved)
    except Exception as error:
        raise AssertionError(f"{what}: apply_rope raised {type(error).__name__}: {error}") from error
    assert torch.equal(x, before), f"{what}: apply_rope changed x in place; it must leave x as it was"
    assert isinstance(got, torch.Tensor) and got.shape == x.shape, (
        f"{what}: output shape should be {tuple(x.shape)}, got {tuple(getattr(got, 'shape', ()))}")
    assert got.dtype == x.dtype, f"{what}: return x's dtype ({x.dtype}), got {got.dtype}"
    when = torch.arange(x.shape[2]) if positions is None else positions
    assert torch.allclose(got.double(), expected_rotation(x.double(), when, interleaved, theta), atol=atol, rtol=rtol), what


cos, sin = rope_frequencies(8, 64)  # more rows than any test's T: a token uses the row of its position
x = torch.randn(2, 3, 5, 8)  # (B, H, T, D), with B != H
positions = torch.tensor([40, 3, 63, 3, 0])  # (T,): any order, repeats allowed
check_rotation("interleaved: pairs (2i, 2i+1) rotated as complex numbers; token t at position positions[t] "
               "(unsorted, with repeats)", x, cos, sin, positions, interleaved=True)
check_rotation("half-split (interleaved=False, the default): channel i pairs with channel i + D/2; token t at "
               "position positions[t]", x, cos, sin, positions)
for interleaved in (False, True):
    check_rotation(f"positions=None with interleaved={interleaved}: token t is at position t (rows 0..T-1 of a "
                   "64-row table)", x, cos, sin, None, interleaved)
    per_sequence = torch.tensor([[9, 40, 2, 17, 17], [60, 61, 62, 63, 0]])  # (B, T)
    check_rotation(f"positions of shape (B, T) with interleaved={interleaved}: row b gives sequence b's positions, "
                   "the same for each of its heads", x, cos, sin, per_sequence, interleaved)
check_rotation("a decode step, x (B, H, 1, D) with positions (B, 1): sequence b's one new token is at positions[b, 0]",
               torch.randn(3, 2, 1, 8), cos, sin, torch.tensor([[17], [0], [63]]))

cos_big, sin_big = rope_frequencies(8, 64, theta=500000.0)  # tables of another base
check_rotation("tables made with theta=500000: rotate by the rows of the cos and sin you are given",
               x, cos_big, sin_big, positions, theta=500000.0)
check_rotation("a non-contiguous x (a (B, H, T, D) view of a (B, T, H, D) tensor): the same rotation; and "
               "x.float() of a float32 x is x itself, so do not write into it", torch.randn(2, 5, 3, 8).transpose(1, 2), cos, sin)

cos_long, sin_long = rope_frequencies(32, 2048)
far = torch.arange(1000, 1009)  # (T,) = (9,): late positions, where low precision hurts most
for dtype in (torch.bfloat16, torch.float16):
    check_rotation(f"x in {dtype}: compute in float32 and cast the result back to {dtype} once",
                   (torch.randn(1, 2, 9, 32) * 4).to(dtype), cos_long, sin_long, far, atol=6e-2, rtol=2e-2)
print("part 2: visible tests passed")


# %% nbgrader={"grade_id": "p2_tests"} graded={"part": "apply_rope"}

# %% [markdown] nbgrader={"grade_id": "p3_intro", "locked": true}
# ## Part 3 · Converting a checkpoint between pairings (2 points)
#
# Meta's original Llama weights were trained with the interleaved pairing; Hugging Face's Llama code uses
# half-split. The conversion script does not touch the code: it reorders the **rows** of each query and
# key projection so that, within every head, the channels that formed pair `(2i, 2i+1)` land at
# `(i, i + D/2)`. Because q and k are reordered alike, every score `q · k` stays the same.
#
# `permute_qk_weight(weight, n_heads, to="half_split")` (the library's name and arguments) takes a
# projection weight `(n_heads · D, in_features)`, or a bias `(n_heads · D,)`, and returns it with each
# head's rows reordered for the pairing `to`:
#
# * `to="half_split"` (an interleaved checkpoint for half-split code): new row `j < D/2` of a head is its
#   old row `2j`, new row `D/2 + j` its old row `2j + 1`;
# * `to="interleaved"`, the inverse (a half-split checkpoint for interleaved code): new row `2j` of a head
#   is its old row `j`, new row `2j + 1` its old row `D/2 + j`;
# * any other `to` raises a `ValueError` whose message names `to`, as the library's does.
#
# A model with fewer key heads than query heads converts `wk` with its own head count.

# %% nbgrader={"grade_id": "p3_solution", "solution": true}
def permute_qk_weight(weight, n_heads, to="half_split"):
    ### BEGIN SOLUTION
    if to not in ("half_split", "interleaved"):
        raise ValueError(f"to must be 'half_split' or 'interleaved', got {to!r}")
    head_dim = weight.shape[0] // n_heads
    if to == "half_split":  # rows (2i, 2i+1) of each head: (H, D/2, pair, ...)
        per_head = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
    else:  # rows (i, i + D/2) of each head: (H, half, D/2, ...)
        per_head = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape)  # swap the two row axes within each head
    ### END SOLUTION


# %% nbgrader={"grade_id": "p3_visible", "locked": true}
# Visible tests for part 3
w = torch.arange(12.0)[:, None].expand(12, 3)  # 2 heads of head_dim 6; row r holds r
to_half = [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]  # per head: old rows 2j first, then old rows 2j + 1
to_inter = [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]  # per head: old rows j and D/2 + j side by side
for to, rows in (("half_split", to_half), ("interleaved", to_inter)):
    got = permute_qk_weight(w, 2, to=to)
    assert isinstance(got, torch.Tensor) and got.shape == w.shape, (
        f"to={to!r}: a (12, 3) weight keeps its shape, got {tuple(getattr(got, 'shape', ()))}")
    got_rows = [int(r) for r in got[:, 0].tolist()]
    assert got_rows == rows, f"to={to!r}, 2 heads of head_dim 6: rows should be {rows}, got {got_rows}"
    try:
        bias = permute_qk_weight(torch.arange(12.0), 2, to=to)
    except Exception as error:
        raise AssertionError(f"to={to!r}: a bias, shape (12,), must work too; got {type(error).__name__}: {error}") from error
    assert isinstance(bias, torch.Tensor) and bias.shape == (12,) and [int(r) for r in bias.tolist()] == rows, (
        f"to={to!r}: a bias (12,) keeps its shape and is reordered like a weight's rows, {rows}")
assert permute_qk_weight(w, 2)[:, 0].tolist() == to_half, "to defaults to 'half_split'"
assert permute_qk_weight(w, 1)[:, 0].tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11], (
    "one head of head_dim 12, to='half_split': rows 0, 2, ..., 10, then 1, 3, ..., 11")
w_rand = torch.randn(12, 5)
assert torch.equal(permute_qk_weight(permute_qk_weight(w_rand, 2, to="interleaved"), 2, to="half_split"), w_rand), (
    "to='interleaved' then to='half_split' must give the weight back: the two undo each other")
for bad in ("half-split", None):
    try:
        permute_qk_weight(w, 2, to=bad)
    except ValueError as error:
        assert "to" in str(error), f"the ValueError for to={bad!r} should name `to`, got: {error}"
    else:
        raise AssertionError(f"to={bad!r} (neither 'half_split' nor 'interleaved') must raise a ValueError naming `to`")

x, wq, wk = torch.randn(6, 16), torch.randn(8, 16), torch.randn(4, 16)  # 2 query heads, 1 key head, head_dim 4
cos, sin = rope_frequencies(4, 6)
def scores(wq, wk, interleaved):
    q = (x @ wq.T).view(6, 2, 4).transpose(0, 1)[None]  # (1, H, T, D)
    k = (x @ wk.T).view(6, 1, 4).transpose(0, 1)[None].expand(1, 2, 6, 4)  # the key head serves both query heads
    q, k = apply_rope(q, cos, sin, interleaved=interleaved), apply_rope(k, cos, sin, interleaved=interleaved)
    return q @ k.transpose(-2, -1)
meta = scores(wq, wk, interleaved=True)
hf = scores(permute_qk_weight(wq, 2), permute_qk_weight(wk, 1), interleaved=False)
assert torch.allclose(meta, hf, atol=1e-4), (
    "an interleaved checkpoint converted with to='half_split' (wq with 2 heads, wk with 1) and half-split RoPE "
    "must give the same scores")
back = scores(permute_qk_weight(wq, 2, to="interleaved"), permute_qk_weight(wk, 1, to="interleaved"), interleaved=True)
assert torch.allclose(scores(wq, wk, interleaved=False), back, atol=1e-4), (
    "a half-split checkpoint converted with to='interleaved' and interleaved RoPE must give the same scores")
print("part 3: visible tests passed")


# %% nbgrader={"grade_id": "p3_tests"} graded={"part": "conversion"}

# %% [markdown] nbgrader={"grade_id": "p4_intro", "locked": true}
# ## Part 4 · Scores by distance (2 points)
#
# With RoPE, the score of a query at position `m` against a key at position `n` is
# `(R_m q) · (R_n k) = q · R_{n−m} k`: it depends on the distance `m − n` only. So a head's preference
# for near or far tokens can be read off without trying every pair of positions.
#
# `score_by_distance(q, k, cos, sin)` takes one query vector `q` and one key vector `k` (each `(D,)`,
# half-split pairing, float32 or bfloat16) and returns a float32 tensor `s` of shape `(cos.shape[0],)`
# where `s[d]` is the score of `q` at any position `n + d` against `k` at position `n`. Use your
# `apply_rope`, and the property: one rotation per distance, not one per pair of positions.
#
# Then answer a question about the course model (the cell after the tests sets it up): at which distance
# below 512 does layer 0, head 1 score a `)` against a `(` highest? Set `peak_distance` to that integer,
# computed with your function, not typed.

# %% nbgrader={"grade_id": "p4_solution", "solution": true}
def score_by_distance(q, k, cos, sin):
    ### BEGIN SOLUTION
    n_positions = cos.shape[0]
    q_at_d = apply_rope(q.expand(1, 1, n_positions, -1), cos, sin)  # q at positions 0..P-1: (1, 1, P, D)
    return q_at_d[0, 0].float() @ k.float()  # k at position 0 is not rotated: (P,)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p4_visible", "locked": true}
# Visible tests for part 4
q, k = torch.randn(16), torch.randn(16)
cos, sin = rope_frequencies(16, 100)
s = score_by_distance(q, k, cos, sin)
assert isinstance(s, torch.Tensor) and s.shape == (100,), (
    f"one score per distance: shape (100,), got {tuple(getattr(s, 'shape', ()))}")
assert s.dtype == torch.float32, f"the scores should be float32, got {s.dtype}"
def score_at(q, k, m, n):
    qm = apply_rope(q.view(1, 1, 1, -1), cos, sin, torch.tensor([m]))
    kn = apply_rope(k.view(1, 1, 1, -1), cos, sin, torch.tensor([n]))
    return (qm.float() * kn.float()).sum().item()
assert math.isclose(s[7].item(), score_at(q, k, 30, 23), abs_tol=1e-4), (
    "s[7] must equal the score of q at n + 7 against k at n (half-split pairing)")
assert math.isclose(s[99].item(), score_at(q, k, 99, 0), abs_tol=1e-4), (
    "s[99], the last distance, must equal the score of q at 99 against k at 0")
assert math.isclose(s[0].item(), (q @ k).item(), abs_tol=1e-4), "at distance 0 the rotations cancel: s[0] = q . k"
q_low, k_low = q.bfloat16(), k.bfloat16()
s_low = score_by_distance(q_low, k_low, cos, sin)
assert s_low.dtype == torch.float32, f"bfloat16 q and k: the scores should still be float32, got {s_low.dtype}"
assert math.isclose(s_low[7].item(), score_at(q_low.float(), k_low.float(), 30, 23), abs_tol=0.1, rel_tol=0.05), (
    "bfloat16 q and k: s[7] must be the score of q at n + 7 against k at n")
print("part 4: visible tests passed")

# %% nbgrader={"grade_id": "p4_question", "locked": true}
# The question. In layer 0 of effml-tiny, a token's query and key come from its embedding alone (after
# RMSNorm), so the score of one token against another depends on their distance and nothing else.
# Head 1's query for ")" and key for "(": how far back does a closing bracket look for an opening one?
from effml_lib.checkpoints import pretrained
from effml_lib.tokenizer import load_tokenizer

model, tokenizer = pretrained("effml-tiny"), load_tokenizer()
layer0, head, head_dim = model.layers[0], 1, 64


def head_vector(projection, token):
    # (head_dim,): one head's slice of the projection of the token's normalised embedding
    with torch.no_grad():
        h = layer0.attention_norm(model.tok_embeddings.weight[tokenizer.encode(token)[0]])  # (dim,)
        return (projection.weight @ h)[head * head_dim:(head + 1) * head_dim]


q_head, k_head = head_vector(layer0.attention.wq, ")"), head_vector(layer0.attention.wk, "(")
cos_long, sin_long = rope_frequencies(head_dim, 512)

# %% nbgrader={"grade_id": "p4_answer", "solution": true}
peak_distance = None  # replace with a computation
### BEGIN SOLUTION
peak_distance = int(score_by_distance(q_head, k_head, cos_long, sin_long).argmax())
### END SOLUTION
print("the score peaks at distance", peak_distance)

# %% nbgrader={"grade_id": "p4_tests"} graded={"part": "distance"}

# %% [markdown] nbgrader={"grade_id": "p5_intro", "locked": true}
# ## Part 5 · Speed (2 points)
#
# Nothing new to write: this part times your `apply_rope` from part 2. RoPE does almost no arithmetic, so
# its time goes to moving memory and to per-op overhead: a version that loops over heads, positions or
# pairs in Python pays that overhead once per iteration. Rotate whole tensors at once.
#
# **The rule:** on the grading machine (its CPU, one thread), with `x` of shape `(1, 8, T, 64)` in float32
# and `positions=None`, your `apply_rope` must be correct and take **at most 10×** the time of the library's
# readable reference (`effml_lib.rope.rotate_reference`, with the cos/sin rows already gathered) at
# `T = 512`. A rotation of whole tensors takes about the reference's time, a Python loop over positions
# 40-100× it: the wide line leaves room for a busy grading machine, not for loops. The graded cell shows
# its measurement as a plot. The cell below makes the same comparison on your machine.

# %% nbgrader={"grade_id": "p5_visible", "locked": true}
# Your apply_rope against the reference on this machine (not graded)
import pandas as pd

from effml_lib.measure import benchmark
from effml_lib.plots import latency_vs_size
from effml_lib.rope import rotate_reference

cos, sin = rope_frequencies(64, 512)
rows = []
for t in (128, 256, 512):
    x = torch.randn(1, 8, t, 64)  # (B, H, T, D)
    for name, fn, args in (("your apply_rope", apply_rope, (x, cos, sin)),
                           ("reference", rotate_reference, (x, cos[:t], sin[:t]))):
        rows.append({"seq_len": t, "implementation": name, **benchmark(fn, *args, reps=10).to_dict()})
timings = pd.DataFrame(rows)
latency_vs_size(timings, "seq_len", hue="implementation", xlabel="sequence length T (tokens)",
                title="RoPE on x of shape (1, 8, T, 64), float32")
at_512 = timings[timings.seq_len == 512].set_index("implementation").median_ms
print(f"at T = 512 yours takes {at_512['your apply_rope'] / at_512['reference']:.1f}× the reference's time "
      f"(graded: at most 10×)")

# %% [markdown] nbgrader={"grade_id": "p5_plot_note", "locked": true}
# The plot shows the median latency of each implementation at each length, on log–log axes: a vectorized
# rotation's line lies near the reference's, while a Python loop over positions lies far above it and
# grows with every position it visits.

# %% nbgrader={"grade_id": "p5_tests"} graded={"part": "performance"}
