# %% [markdown] nbgrader={"grade_id": "intro", "locked": true}
# # Lab 02 · Rotary position embeddings (RoPE)
#
# You will write RoPE as the course library has it: the rotation tables (with the two ways of stretching
# them past the trained context), the rotation itself for both ways of pairing channels, the conversion
# of a checkpoint's projections between pairings, and a use of the property that makes RoPE work: a
# query–key score depends only on the distance between their positions. Part 5 times your rotation.
# Notebook `02_rope` explains each piece; read it first.
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
assert cos.dtype == torch.float32, f"the tables should be float32, got {cos.dtype}"
assert torch.allclose(cos[0], torch.ones(4)) and torch.allclose(sin[0], torch.zeros(4)), "position 0 is not rotated"
assert math.isclose(sin[1, 0].item(), math.sin(1.0), rel_tol=1e-6), "pair 0 turns 1 radian per position"
assert math.isclose(sin[1, 1].item(), math.sin(10000 ** -0.25), rel_tol=1e-5), "pair 1 of 4 turns theta^(-2/8) per position"
cos_pi, _ = rope_frequencies(8, 16, scaling={"type": "linear", "factor": 4})
assert torch.allclose(cos_pi[8], cos[2]), "with linear scaling by 4, position 8 must get position 2's angles"
print("part 1: visible tests passed")


# %% nbgrader={"grade_id": "p1_tests"} graded={"part": "frequencies"}

# %% [markdown] nbgrader={"grade_id": "p2_intro", "locked": true}
# ## Part 2 · Rotating queries and keys (3 points)
#
# `apply_rope(x, cos, sin, positions=None, interleaved=False)` rotates `x` of shape `(B, H, T, D)` and
# returns the same shape and dtype. Token `t` is at position `positions[t]`, or `t` when `positions` is
# None; `positions` may also be `(B, T)`, one row per sequence (a batch of decode steps, each at its own
# cache length). Positions can be any integers below `cos.shape[0]`, in any order.
#
# Pair `i` is the 2-vector `(x1, x2)`, rotated to `(x1 cos − x2 sin, x2 cos + x1 sin)`, where:
#
# * `interleaved=False` (**half-split**, Hugging Face's Llama): `x1 = x[..., i]`, `x2 = x[..., i + D/2]`;
# * `interleaved=True` (the paper's pairing, Meta's original Llama code): `x1 = x[..., 2i]`, `x2 = x[..., 2i + 1]`.
#
# Compute in float32 and return `x`'s dtype.

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
# Visible tests for part 2
x = torch.randn(1, 2, 5, 8)
cos, sin = rope_frequencies(8, 64)
positions = torch.tensor([0, 3, 4, 40, 63])
expected = complex_rotation(x, positions)  # defined with adjacent pairs: the interleaved convention
got = apply_rope(x, cos, sin, positions, interleaved=True)
assert got.shape == x.shape, f"output shape should be {tuple(x.shape)}, got {tuple(got.shape)}"
assert torch.allclose(got.double(), expected, atol=1e-5), "interleaved: pairs (2i, 2i+1) rotated as complex numbers"
half = apply_rope(x, cos, sin, positions)
half_as_pairs = torch.stack(half.chunk(2, dim=-1), dim=-1).flatten(-2)  # reorder (i, i+D/2) to adjacent pairs
x_as_pairs = torch.stack(x.chunk(2, dim=-1), dim=-1).flatten(-2)
assert torch.allclose(half_as_pairs.double(), complex_rotation(x_as_pairs, positions), atol=1e-5), (
    "half-split: channel i pairs with channel i + D/2")
assert torch.equal(apply_rope(x, cos, sin), apply_rope(x, cos, sin, torch.arange(5))), "positions=None means 0..T-1"
assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16, "return x's dtype"
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
# `interleaved_to_half_split(weight, n_heads)` takes a projection weight `(n_heads · D, in_features)`, or
# a bias `(n_heads · D,)`, and returns it with each head's rows reordered: new row `j < D/2` of a head is
# its old row `2j`, new row `D/2 + j` its old row `2j + 1`.

# %% nbgrader={"grade_id": "p3_solution", "solution": true}
def interleaved_to_half_split(weight, n_heads):
    ### BEGIN SOLUTION
    head_dim = weight.shape[0] // n_heads
    per_head = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])  # (H, D/2, pair, ...)
    return per_head.transpose(1, 2).reshape(weight.shape)  # (H, pair, D/2, ...): evens, then odds
    ### END SOLUTION


# %% nbgrader={"grade_id": "p3_visible", "locked": true}
# Visible tests for part 3
w = torch.arange(8.0)[:, None].expand(8, 3)  # 2 heads of head_dim 4; row r holds r
got = interleaved_to_half_split(w, n_heads=2)
assert got.shape == w.shape, f"shape should stay {tuple(w.shape)}, got {tuple(got.shape)}"
assert got[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7], f"rows should be [0, 2, 1, 3, 4, 6, 5, 7], got {got[:, 0].tolist()}"
x, wq, wk = torch.randn(6, 16), torch.randn(8, 16), torch.randn(8, 16)
cos, sin = rope_frequencies(4, 6)
def scores(wq, wk, interleaved):
    q = (x @ wq.T).view(6, 2, 4).transpose(0, 1)[None]  # (1, H, T, D)
    k = (x @ wk.T).view(6, 2, 4).transpose(0, 1)[None]
    q, k = apply_rope(q, cos, sin, interleaved=interleaved), apply_rope(k, cos, sin, interleaved=interleaved)
    return q @ k.transpose(-2, -1)
meta = scores(wq, wk, interleaved=True)
hf = scores(interleaved_to_half_split(wq, 2), interleaved_to_half_split(wk, 2), interleaved=False)
assert torch.allclose(meta, hf, atol=1e-4), "converted projections with half-split RoPE must give the same scores"
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
# half-split pairing) and returns a float32 tensor `s` of shape `(cos.shape[0],)` where `s[d]` is the
# score of `q` at any position `n + d` against `k` at position `n`. Use your `apply_rope`, and the
# property: one rotation per distance, not one per pair of positions.
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
assert s.shape == (100,), f"one score per distance: shape (100,), got {tuple(s.shape)}"
def score_at(m, n):
    qm = apply_rope(q.view(1, 1, 1, 16), cos, sin, torch.tensor([m]))
    kn = apply_rope(k.view(1, 1, 1, 16), cos, sin, torch.tensor([n]))
    return (qm * kn).sum().item()
assert math.isclose(s[7].item(), score_at(30, 23), abs_tol=1e-4), "s[7] must equal the score of q at n + 7 against k at n"
assert math.isclose(s[0].item(), (q @ k).item(), abs_tol=1e-4), "at distance 0 the rotations cancel: s[0] = q . k"
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
# and `positions=None`, your `apply_rope` must be correct and take **at most 4×** the time of the library's
# readable reference (`effml_lib.rope.rotate_reference`, with the cos/sin rows already gathered) at
# `T = 512`. The graded cell shows its measurement as a plot. The cell below makes the same comparison
# on your machine.

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
      f"(graded: at most 4×)")

# %% [markdown] nbgrader={"grade_id": "p5_plot_note", "locked": true}
# The plot shows the median latency of each implementation at each length, on log–log axes: a vectorized
# rotation's line lies near the reference's, while a Python loop over positions lies far above it and
# grows with every position it visits.

# %% nbgrader={"grade_id": "p5_tests"} graded={"part": "performance"}
