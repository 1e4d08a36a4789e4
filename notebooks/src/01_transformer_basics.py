# %% [markdown]
# # 01 · Transformer basics: what one forward pass computes, and what it costs
#
# Every later module of the course makes some part of a decoder's forward pass cheaper: the KV cache
# (03) avoids recomputing it, GQA (04) shrinks its keys and values, quantization (05) its weights,
# FlashAttention its memory traffic. To know what they save, we first take the pass apart.
#
# We open **effml-tiny** (17.3 M parameters, 8 layers, 6 heads of 64) and follow everything it does —
# tokens, embeddings, attention, RMSNorm, SwiGLU, the residual block — recomputing attention with a few
# lines of PyTorch and checking the other pieces against their formulas. Then we count its parameters
# and FLOPs by formula, check the counts against the model and a FLOP counter, and measure how
# attention's time and memory grow with the sequence length on your device.
#
# Runs in well under a minute on a 2-core laptop CPU.

# %% shared="colab_setup"

# %% tags=["parameters"]
# parameters: sizes for the measurements (raise them on a GPU)
seq_lens = [128, 256, 512, 1024, 2048]  # sequence lengths (tokens) of the attention sweep
reps = 5                                # timed repetitions per point (the fastest is reported)
flop_tokens = 256                       # sequence length of the forward pass whose FLOPs we count
census_tokens = 512                     # tokens of real code used to classify the attention heads

# %% shared="notebook_setup"

# %%
import inspect
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F

# %% [markdown]
# ## The problem in numbers
#
# Attention compares every token with every earlier token. The reference implementation writes those
# comparisons down as a matrix of scores, one `T × T` matrix per head and layer. Here is how big one
# layer's score matrices are for effml-tiny (6 heads, float32) and for Llama-2-7B (32 heads, bf16):

# %%
from effml_lib.kvcache import MODEL_SHAPES
from effml_lib.plots import human_bytes

llama_heads = MODEL_SHAPES["llama-2-7b"]["n_heads"]
rows = [{"sequence length T": T,
         "effml-tiny: 6·T²·4 B": human_bytes(6 * T * T * 4),
         f"Llama-2-7B: {llama_heads}·T²·2 B": human_bytes(llama_heads * T * T * 2)}
        for T in (512, 2048, 8192, 32768, 131072)]
pd.DataFrame(rows).set_index("sequence length T")

# %% [markdown]
# The size grows with the square of the context: at 32 k tokens the scores of *one* layer of a 7B model
# take 64 GiB, most of an 80 GB GPU, and at 128 k a tebibyte. Long contexts are only possible because
# fused kernels never store this matrix. To see why that is allowed, we first need to see exactly what
# attention computes.

# %% [markdown]
# ## 1 · Tokens → embeddings
#
# The model reads integers. The course tokenizer is a byte-level BPE with 4096 tokens trained on the
# Python standard library, so common pieces of code (` return` with its leading space, a run of
# indentation) are one token each.

# %%
from effml_lib.checkpoints import pretrained
from effml_lib.tokenizer import load_tokenizer

tok = load_tokenizer()
model = pretrained("effml-tiny").eval()  # float32, on the CPU: every step below is easy to inspect
cfg = model.config

line = "    return (w * h) / (w + h)\n"
ids = tok.encode(line)
print(f"{len(line)} characters -> {len(ids)} tokens")
print("ids:   ", ids)
print("pieces:", [tok.decode([i]) for i in ids])

# %% [markdown]
# An embedding is a lookup: token id `i` selects row `i` of a `(V, d)` table of learned vectors.
# No arithmetic happens, so the layer costs memory but no FLOPs.

# %%
E = model.tok_embeddings.weight  # (V, d)
print(f"embedding table {tuple(E.shape)}: {E.numel():,} parameters, "
      f"{human_bytes(E.numel() * E.element_size())} in float32 "
      f"({E.numel() / model.num_parameters():.1%} of the model)")

x = model.tok_embeddings(torch.tensor([ids]))  # (B=1, T, d)
torch.testing.assert_close(x[0], E[ids])       # the same thing as indexing rows of the table
print("embedded line:", tuple(x.shape), "(batch, tokens, dim)")

# %% [markdown]
# The vectors say *which* token stands at each place but not *where*: effml-tiny adds positions
# inside attention, by rotating queries and keys (RoPE, module 02).

# %% [markdown]
# ## 2 · Attention, step by step
#
# For one head with queries $Q$, keys $K$ and values $V$ (each `T × D`, one row per token):
#
# $$
# S = \frac{Q K^\top}{\sqrt{D}}, \qquad
# P = \operatorname{softmax}_{\text{row}}\big(S + M\big), \qquad
# O = P V, \qquad
# M_{ij} = \begin{cases} 0 & j \le i \\ -\infty & j > i \end{cases}
# $$
#
# $S_{ij}$ says how well query $i$ matches key $j$; dividing by $\sqrt{D}$ keeps the scores' spread
# independent of the head size, so the softmax does not saturate. The causal mask $M$ stops a token from
# seeing later tokens (it has to predict them). Each row of $P$ is a probability distribution over
# the keys, and the output of token $i$ is the average of the values weighted by it.
#
# We compute this on real activations: the input of block 5 of effml-tiny, for a short function.

# %%
LAYER, HEAD = 5, 0  # the head we will look at (why this one: see the census in section 3)
snippet = "def area(w, h):\n    return (w * h) / (w + h)\n"
tokens = torch.tensor([tok.encode(snippet)])  # (B, T)
B, T = tokens.shape
H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

positions = torch.arange(T)
cos, sin = model.rope_tables("cpu")                  # (max_seq_len, D/2) each
rope_cos, rope_sin = cos[positions], sin[positions]  # (T, D/2): the rows for our positions

x = model.tok_embeddings(tokens)                     # (B, T, d)
for block in model.layers[:LAYER]:
    x = block(x, rope_cos, rope_sin)                 # the residual stream entering block LAYER
print(f"{T} tokens; input of block {LAYER}: {tuple(x.shape)}")

# %% [markdown]
# Queries, keys and values are three linear maps of the normalised input, split into heads; RoPE then
# rotates queries and keys by their positions.

# %%
from effml_lib.rope import apply_rope

block = model.layers[LAYER]
h = block.attention_norm(x)                                    # (B, T, d)
q = block.attention.wq(h).view(B, T, H, D).transpose(1, 2)     # (B, H, T, D)
k = block.attention.wk(h).view(B, T, Hkv, D).transpose(1, 2)   # (B, Hkv, T, D); Hkv == H in effml-tiny
v = block.attention.wv(h).view(B, T, Hkv, D).transpose(1, 2)   # (B, Hkv, T, D)
q = apply_rope(q, cos, sin, positions=positions)
k = apply_rope(k, cos, sin, positions=positions)
print("q", tuple(q.shape), " k", tuple(k.shape), " v", tuple(v.shape))

# %%
scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, T): query i · key j
print("scores", tuple(scores.shape), f"std {scores.std():.2f}")

# %%
allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))  # (T, T): query i may see keys 0..i
masked = scores.masked_fill(~allowed, float("-inf"))      # broadcasts over (B, H)
print(allowed[:6, :6].int())

# %% [markdown]
# During generation the queries are often fewer than the keys: a decode step with a KV cache (module 03)
# has **one** new query and all earlier keys. The mask must then be aligned to the *end* of the keys:
# query $i$ of $T_q$ sits at absolute position $T_k - T_q + i$. The library's `causal_mask` does this;
# `torch.tril` of a non-square matrix aligns to the start and would hide most of the cache.

# %%
from effml_lib.attention import attention, causal_mask

torch.testing.assert_close(causal_mask(T, T), allowed)  # square: the same as tril
print("causal_mask(3, 6): 3 new queries, 6 keys\n", causal_mask(3, 6).int())
print("tril of a 3×6 matrix (wrong for a cache)\n", torch.tril(torch.ones(3, 6, dtype=torch.int64)))

# %%
probs = torch.softmax(masked, dim=-1)  # (B, H, T, T): each row is a distribution over keys
out = probs @ v                        # (B, H, T, D): weighted average of the values

torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, T))
assert (probs[..., ~allowed] == 0).all(), "no weight on future tokens"
torch.testing.assert_close(out, attention(q, k, v, impl="torch"))  # the library's reference
torch.testing.assert_close(out, attention(q, k, v, impl="sdpa"))   # PyTorch's fused kernel
print("our four lines == attention(q, k, v) for impl='torch' and impl='sdpa'")

# %% [markdown]
# The library's `attention` computes the same function in general: any number of queries `Tq <= Tk`
# with the mask aligned to the end, an optional boolean mask of its own (to hide the padding of a
# batch), `causal=False`, and query heads that share key/value heads (module 04). Our four lines are the
# square case; writing the general one is part 1 of the lab.


# %% [markdown]
# ### What one head looks at
#
# Each row below is one query token; the colours are its attention weights over the tokens before it
# (`·` marks a space, `\n` a newline). The upper triangle is blank: the mask forbids it.

# %%
def show(piece: str) -> str:
    """A token as a readable tick label."""
    return piece.replace("\n", "\\n").replace(" ", "·")


labels = [show(tok.decode([i])) for i in tokens[0].tolist()]
fig, ax = plt.subplots(figsize=(8.5, 7.5))
sns.heatmap(probs[0, HEAD].numpy(), mask=~allowed.numpy(), cmap="viridis", vmin=0, vmax=1, square=True,
            xticklabels=labels, yticklabels=labels, cbar_kws={"label": "attention weight"}, ax=ax)
ax.grid(False)
ax.set_xlabel("key token (attended to)")
ax.set_ylabel("query token (attending)")
ax.set_title(f"effml-tiny, layer {LAYER}, head {HEAD}: attention weights")
plt.show()


# %% [markdown]
# Layer 5, head 0 tracks brackets: from the first `(` on, almost every token puts nearly all its weight on the most recent
# bracket before it. While a group is open that is the opening bracket — `w`, ` *` and ` h` inside
# `(w * h)` all look at its ` (`, and the tokens of the signature `(w, h)` at its `(`; once a group has
# closed, the following tokens look at the closing bracket (` return` at `):`, ` /` at `)`). That is a
# pointer to "where am I in the bracket structure", which a model writing Python needs to close brackets
# in the right order. Nobody programmed it; training on code produced it.

# %% [markdown]
# ## 3 · Many heads
#
# effml-tiny splits its `d = 384` channels into `H = 6` heads of `D = 64` rather than running one
# head of 384. The projections cost the same either way (`wq` is `384 × 384` in both cases); what
# changes is that every head computes its own softmax, so each can attend to a different place. One
# head gives each token a single weighted average; six heads give six, concatenated and mixed by the
# output projection `wo`. The price is one `T × T` score matrix per head.
#
# In code, "splitting into heads" is a `view` and a `transpose`; merging them is the reverse:

# %%
def attention_by_hand(attn, h, positions):
    """Section 2 as a function: attention layer `attn` on normalised input h (B, T, d).

    Uses the RoPE tables cos, sin of section 2. Returns the layer's output (B, T, d) and its
    attention weights (B, H, T, T).
    """
    B, T, _ = h.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.wq(h).view(B, T, H, D).transpose(1, 2)      # (B, T, H*D) -> (B, T, H, D) -> (B, H, T, D)
    k = attn.wk(h).view(B, T, Hkv, D).transpose(1, 2)    # (B, Hkv, T, D)
    v = attn.wv(h).view(B, T, Hkv, D).transpose(1, 2)    # (B, Hkv, T, D)
    q = apply_rope(q, cos, sin, positions=positions)
    k = apply_rope(k, cos, sin, positions=positions)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)      # (B, H, T, T)  (H == Hkv in effml-tiny)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = probs @ v                                      # (B, H, T, D)
    out = out.transpose(1, 2).reshape(B, T, H * D)       # (B, T, H, D) -> (B, T, H*D): heads side by side
    return attn.wo(out), probs                           # (B, T, d): wo mixes the heads


ours, _ = attention_by_hand(block.attention, h, positions)
torch.testing.assert_close(ours, block.attention(h, rope_cos, rope_sin))
print("attention_by_hand == the library's Attention module:", tuple(ours.shape))

# %%
from effml_lib.attention import Attention

show_source(Attention.forward)

# %% [markdown]
# ### A census of the 48 heads
#
# Do the heads really specialise? We run 512 tokens of real code (the standard library's `colorsys`
# module) through the model and score every head of every layer on two behaviours:
#
# - **previous token**: the mean weight a token puts on the token just before it;
# - **enclosing bracket**: for tokens inside `(…)`, `[…]` or `{…}`, the mean weight on the innermost
#   bracket still open.

# %%
import colorsys

census_ids = tok.encode(inspect.getsource(colorsys))[:census_tokens]
pieces = [tok.decode([i]) for i in census_ids]
innermost, still_open = [], []  # innermost[i]: position of the bracket enclosing token i, or None
for i, piece in enumerate(pieces):
    innermost.append(still_open[-1] if still_open else None)
    for ch in piece:
        if ch in "([{":
            still_open.append(i)
        elif ch in ")]}" and still_open:
            still_open.pop()
inside = [i for i, j in enumerate(innermost) if j is not None]
print(f"{len(pieces)} tokens, {len(inside)} of them inside brackets")

# %%
Tc = len(census_ids)
pos_c = torch.arange(Tc)
xc = model.tok_embeddings(torch.tensor([census_ids]))  # (1, Tc, d)
prev_score = np.zeros((cfg.n_layers, H))
bracket_score = np.zeros((cfg.n_layers, H))
for li, blk in enumerate(model.layers):
    _, p = attention_by_hand(blk.attention, blk.attention_norm(xc), pos_c)
    p = p[0]                                                                    # (H, Tc, Tc)
    prev_score[li] = p[:, torch.arange(1, Tc), torch.arange(Tc - 1)].mean(-1).numpy()
    bracket_score[li] = p[:, inside, [innermost[i] for i in inside]].mean(-1).numpy()
    xc = blk(xc, cos[pos_c], sin[pos_c])

# what a head spreading its weight evenly over the visible tokens would score
even_prev = np.mean([1 / (i + 1) for i in range(1, Tc)])
even_bracket = np.mean([1 / (i + 1) for i in inside])
print(f"an evenly spread head would score {even_prev:.3f} (previous token), {even_bracket:.3f} (bracket)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
for ax, score, name in ((axes[0], prev_score, "on the previous token"),
                        (axes[1], bracket_score, "on the enclosing bracket")):
    sns.heatmap(score, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax,
                cbar_kws={"label": "mean attention weight"})
    ax.grid(False)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"Mean weight {name}")
fig.suptitle(f"effml-tiny's 48 heads on {Tc} tokens of colorsys.py", fontweight="bold")
fig.tight_layout()
plt.show()

# %% [markdown]
# Most heads spread their attention in ways these two scores do not capture, but a few are specialists.
# Layer 4, head 4 is a pure previous-token head: about 0.99 of its weight goes to the token just
# before, where an evenly spread head would put about 0.01 (layer 3, head 1 and layer 6, head 0 do the
# same part of the time). Layer 5, head 0 — the head of the heat map above — is the strongest bracket
# head, with more than half of its weight on the enclosing bracket; layer 7, head 4 does a weaker
# version of the same job. Different heads, different jobs: that is what splitting into heads buys.

# %% [markdown]
# ## 4 · RMSNorm instead of LayerNorm
#
# Before each attention and feed-forward layer the input is normalised. The original transformer used
# LayerNorm; Llama-style models use RMSNorm:
#
# $$
# \operatorname{LayerNorm}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + \varepsilon}} \odot \gamma + \beta,
# \qquad
# \operatorname{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac{1}{d}\sum_i x_i^2 + \varepsilon}} \odot \gamma
# $$
#
# with $\mu$ and $\sigma^2$ the mean and variance of the $d$ entries of $x$. RMSNorm drops the
# centring (no mean to compute or subtract) and the bias $\beta$: one reduction instead of two and
# `d` parameters instead of `2d`. When $x$ already has zero mean the two are identical.

# %%
from effml_lib.model import RMSNorm

unit_rms_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)  # γ = 1: the bare normalisation
normed = unit_rms_norm(x)
print(f"after RMSNorm every token's vector has RMS {normed.pow(2).mean(-1).sqrt().min():.4f} … "
      f"{normed.pow(2).mean(-1).sqrt().max():.4f}")

layer_norm = torch.nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
centred = x - x.mean(-1, keepdim=True)
torch.testing.assert_close(layer_norm(centred), unit_rms_norm(centred))  # zero mean: the same function
print("on zero-mean input, LayerNorm == RMSNorm")

ratio = x.mean(-1).abs() / x.pow(2).mean(-1).sqrt()
print(f"residual stream entering block {LAYER}: |mean| / RMS per token = {ratio.mean():.3f} on average, "
      f"{ratio.max():.3f} at most")

# %% [markdown]
# On effml-tiny's real activations the mean of a token's vector is a few percent of its RMS, so the
# centring that RMSNorm skips would change little. Does skipping it also save time? We time the
# library's RMSNorm, PyTorch's LayerNorm and PyTorch's own RMSNorm on one long sequence:

# %% shared="fastest_in_turns"

# %%
from functools import partial

xn = torch.randn(1, max(seq_lens), cfg.dim)
norms = {"RMSNorm (effml_lib, 5 ops)": RMSNorm(cfg.dim), "torch.nn.LayerNorm (fused)": torch.nn.LayerNorm(cfg.dim)}
if hasattr(torch.nn, "RMSNorm"):  # torch >= 2.4
    norms["torch.nn.RMSNorm"] = torch.nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
fastest_ms = fastest_in_turns({name: partial(norm, xn) for name, norm in norms.items()}, rounds=10 * reps, warmup=10)
norm_times = pd.DataFrame({"parameters": {name: sum(p.numel() for p in norm.parameters()) for name, norm in norms.items()},
                           "fastest (µs)": {name: ms * 1e3 for name, ms in fastest_ms.items()}}).rename_axis("norm")
ours, layer_norm_us = norm_times["fastest (µs)"].iloc[0], norm_times.loc["torch.nn.LayerNorm (fused)", "fastest (µs)"]
print(f"input {tuple(xn.shape)}; our RMSNorm takes {ours / layer_norm_us:.2f}× the time of the fused LayerNorm")
norm_times.round(1)

# %% [markdown]
# The norms are timed in turns, so a busy moment of the machine slows all three alike. Skipping the mean
# did not make our RMSNorm faster: LayerNorm, which does *more* arithmetic, was about as fast or faster
# (the line above gives the ratio in the run saved with this notebook). LayerNorm is one fused kernel that
# reads `x` once and writes the result once, while our RMSNorm is five ops that each read and write the
# whole tensor. For operations this simple the arithmetic is nearly free; what costs is the passes over
# memory and the calls that make them.
# The saving from skipping the mean is real only inside a fused kernel, which is how production stacks
# run RMSNorm.

# %% [markdown]
# ## 5 · SwiGLU instead of a ReLU/GELU MLP
#
# After attention, every token passes through the same two-layer network, on its own. The classic
# version widens to `4d`, applies a non-linearity and projects back:
# $\;\operatorname{MLP}(x) = W_2\, \phi(W_1 x)$, with $\phi$ = ReLU or GELU.
#
# Llama-style models use a *gated* variant, SwiGLU: a second projection $W_3 x$ multiplies the
# activated one element by element,
#
# $$
# \operatorname{SwiGLU}(x) = W_2\big(\operatorname{silu}(W_1 x) \odot W_3 x\big),
# \qquad \operatorname{silu}(z) = z\,\sigma(z) = \frac{z}{1 + e^{-z}} .
# $$
#
# Three matrices instead of two: to keep the parameter count, the hidden size shrinks from `4d` to
# `⅔ · 4d`.

# %%
z = torch.linspace(-5, 5, 401)
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, fn in (("ReLU", F.relu), ("GELU", F.gelu), ("SiLU (used by SwiGLU)", F.silu)):
    ax.plot(z, fn(z), label=name)
ax.axhline(0, color="0.5", lw=0.8)
ax.set_xlabel("pre-activation z (dimensionless)")
ax.set_ylabel("activation φ(z) (dimensionless)")
ax.set_title("Activation functions of the feed-forward layer")
ax.legend()
plt.show()

# %% [markdown]
# For large positive inputs all three are the identity, for large negative inputs all three are zero.
# They differ near zero: ReLU has a kink and passes nothing below 0, while GELU and SiLU are smooth and
# let small negative values through (SiLU's minimum is about −0.28 at z ≈ −1.28), which gives useful
# gradients everywhere. In SwiGLU the gate $\operatorname{silu}(W_1x)$ decides, per hidden unit, how
# much of the linear signal $W_3x$ passes.

# %%
ff = block.feed_forward  # effml_lib.model.FeedForward: three nn.Linear layers, w1 (gate), w3 (up), w2 (down)
hf = block.ffn_norm(x)   # (B, T, d) the normalised input of a feed-forward layer
gate = F.silu(ff.w1(hf))  # (B, T, hidden)
print(f"w1, w3: {tuple(ff.w1.weight.shape)}, w2: {tuple(ff.w2.weight.shape)}; "
      f"share of hidden units the gate nearly shuts (|silu| < 0.05): {(gate.abs() < 0.05).float().mean():.0%}")

# %%
d, hidden = cfg.dim, cfg.hidden_dim
rule = 64 * math.ceil(int(2 * 4 * d / 3) / 64)  # ModelConfig's default: ⅔·4d rounded up to a multiple of 64
swiglu_params = 3 * d * hidden
mlp_params = 2 * d * (4 * d)
assert swiglu_params == sum(p.numel() for p in ff.parameters())
print(f"d = {d}: SwiGLU hidden = {hidden} (rule gives {rule}), 4d MLP hidden = {4 * d}")
print(f"SwiGLU 3·d·hidden = {swiglu_params:,} parameters;  4d MLP 2·d·4d = {mlp_params:,}")

# %% [markdown]
# At `d = 384`, `⅔ · 4d = 1024` exactly, so SwiGLU has *exactly* as many parameters (and FLOPs) as the
# 4d MLP it replaces; Llama-2-7B rounds `⅔ · 4 · 4096 ≈ 10923` up to 11008. The gate is a better use of
# the same budget, not a larger one.

# %% [markdown]
# ## 6 · The pre-norm residual block, and the whole model by hand
#
# A block adds the output of each sub-layer to its input, normalising only the sub-layer's input:
#
# $$
# h = x + \operatorname{Attn}(\operatorname{RMSNorm}(x)), \qquad
# x' = h + \operatorname{SwiGLU}(\operatorname{RMSNorm}(h)).
# $$
#
# The sum $x$ running through all layers (the *residual stream*) is never normalised itself, so each
# layer adds a correction to it and gradients reach early layers through the identity path. One last
# RMSNorm and the LM head (a `d × V` matrix) turn the final stream into next-token logits.

# %%
from effml_lib.model import Block

show_source(Block.forward)


# %% [markdown]
# Now the whole model: the embedding lookup, our `attention_by_hand` in every block, the library's norm
# and feed-forward modules, and the residual sums. (The lab has you write the norm and the feed-forward
# yourself, and a block that serves a batch of sequences of different lengths.)

# %%
def forward_by_hand(model, tokens):
    """tokens (B, T) -> logits (B, T, V): our attention, the library's norms and feed-forward layers."""
    positions = torch.arange(tokens.shape[1])
    x = model.tok_embeddings.weight[tokens]                                    # (B, T, d)
    for blk in model.layers:
        attn_out, _ = attention_by_hand(blk.attention, blk.attention_norm(x), positions)
        x = x + attn_out                                                       # residual 1
        x = x + blk.feed_forward(blk.ffn_norm(x))                              # residual 2
    return model.output(model.norm(x))                                         # (B, T, V)


logits_ours = forward_by_hand(model, tokens)
logits_lib = model(tokens)
torch.testing.assert_close(logits_ours, logits_lib)
print(f"logits {tuple(logits_lib.shape)}; largest difference {(logits_ours - logits_lib).abs().max():.1e}")

# %%
next_probs = torch.softmax(logits_lib[0, -1], dim=-1)  # the distribution of the token after the snippet
top = torch.topk(next_probs, 5)
pd.DataFrame({"next token": [repr(tok.decode([i])) for i in top.indices.tolist()],
              "probability": top.values.numpy().round(3)})

# %% [markdown]
# Our re-derivation and the library agree to float32 rounding on all 4096 logits of every position.
# After a complete one-line function and a newline, the model's clear favourite is `<|endoftext|>`,
# the separator placed between files in training: it guesses that the file ends here. Its other
# guesses (indentation, `try`, `else`) would carry on with more code.

# %% [markdown]
# ## 7 · The decoder writes text
#
# Generation repeats one step: run the model, take the logits of the last position, choose a token,
# append it. Greedy decoding chooses the most likely token; sampling draws from the softmax, sharpened
# by a temperature below 1 and restricted to the `k` most likely tokens. Here is the loop written out,
# checked against `effml_lib.decoding.generate` (which keeps a KV cache so each step processes only
# the new token; module 03 measures what that saves):

# %%
from effml_lib.decoding import generate

prompt = tok.encode("class Point:\n    def __init__(self, x, y):\n")
seq = torch.tensor([prompt])
for _ in range(12):                                 # greedy, no cache: the whole sequence every step
    next_id = model(seq)[:, -1].argmax(-1, keepdim=True)
    seq = torch.cat([seq, next_id], dim=1)
assert torch.equal(seq, generate(model, prompt, max_new_tokens=12))
print("12-step loop == generate(..., max_new_tokens=12)")

# %%
greedy = generate(model, prompt, max_new_tokens=48)
sampled = generate(model, prompt, max_new_tokens=48, temperature=0.8, top_k=40, seed=0)
print("--- greedy ---\n" + tok.decode(greedy[0].tolist()))
print("--- sampled (temperature 0.8, top-k 40, seed 0) ---\n" + tok.decode(sampled[0].tolist()))

# %% [markdown]
# Greedy decoding finds a plausible line and then repeats it: once a line is likely, repeating it makes
# it even likelier, and argmax never escapes. Sampling breaks the loop at the cost of some nonsense;
# a 17 M-parameter model knows Python's shape better than its meaning.

# %% [markdown]
# ## 8 · Counting parameters and FLOPs by formula
#
# With vocabulary `V`, width `d`, `L` layers, `H` query heads and `Hkv` key/value heads of size `hd`,
# and SwiGLU hidden size `hidden`:
#
# | part | parameters |
# |---|---|
# | token embedding | `V·d` |
# | attention, per layer | `d·(H + 2·Hkv)·hd` (wq, wk, wv) `+ H·hd·d` (wo) |
# | feed-forward, per layer | `3·d·hidden` |
# | RMSNorm weights | `2·d` per layer, `d` for the final norm |
# | LM head | `V·d` (0 if tied to the embedding) |
#
# A matrix–vector product with an `m × n` matrix costs `2mn` FLOPs (a multiply and an add per weight),
# so a forward pass costs about **2 FLOPs per matmul weight per token** — every weight except the
# embedding table, which is only indexed. Attention adds work that no weight accounts for: for a token
# among `T`, `q·kᵀ` and `P·v` cost `2·T·hd` FLOPs each per head, **`4·T·H·hd` per layer** (the reference
# computes the full `T × T` matrices, masked half included).

# %%
V, d, L = cfg.vocab_size, cfg.dim, cfg.n_layers
H, Hkv, hd, hidden = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
attn_per_layer = d * (H + 2 * Hkv) * hd + H * hd * d
ffn_per_layer = 3 * d * hidden
lm_head = V * d

params = pd.DataFrame([
    ("token embedding", "V·d", V * d),
    ("attention", "L·[d·(H+2Hkv)·hd + H·hd·d]", L * attn_per_layer),
    ("feed-forward (SwiGLU)", "L·3·d·hidden", L * ffn_per_layer),
    ("RMSNorm weights", "(2L+1)·d", (2 * L + 1) * d),
    ("LM head", "V·d" if not cfg.tie_embeddings else "tied: 0", 0 if cfg.tie_embeddings else lm_head),
], columns=["part", "formula", "parameters"]).set_index("part")
params["share"] = (params["parameters"] / params["parameters"].sum()).map("{:.1%}".format)

total = int(params["parameters"].sum())
assert total == model.num_parameters(), (total, model.num_parameters())
print(f"formula {total:,} == model.num_parameters() {model.num_parameters():,}")
params

# %%
from torch.utils.flop_counter import FlopCounterMode

T_f = flop_tokens
matmul_weights = L * (attn_per_layer + ffn_per_layer) + lm_head  # every weight used in a matmul
formula = {"weights: 2 · matmul params": 2 * matmul_weights,
           "attention: L · 4·T·H·hd": L * 4 * T_f * H * hd}

tokens_f = torch.randint(0, V, (1, T_f), generator=torch.Generator().manual_seed(0))
counts = {}
for impl in ("sdpa", "torch"):
    for blk in model.layers:
        blk.attention.impl = impl  # which attention path the model runs (normally "auto")
    with FlopCounterMode(display=False) as counter:
        model(tokens_f)
    counts[impl] = counter.get_total_flops() / T_f
for blk in model.layers:
    blk.attention.impl = "auto"

predicted = sum(formula.values())
for name, value in formula.items():
    print(f"{name:28s} {value / 1e6:8.2f} MFLOP/token")
print(f"{'formula, total':28s} {predicted / 1e6:8.2f} MFLOP/token  (T = {T_f})")
print(f"{'measured, reference attention':28s} {counts['torch'] / 1e6:8.2f} MFLOP/token  "
      f"ratio measured/formula = {counts['torch'] / predicted:.4f}")
print(f"{'measured, fused SDPA':28s} {counts['sdpa'] / 1e6:8.2f} MFLOP/token  (the counter may not see a fused kernel)")


# %% [markdown]
# `FlopCounterMode` counts matrix multiplications only, as our formula does (norms, softmax and SiLU
# add well under 1% that neither side includes), and with the reference attention the two agree
# exactly. On a CPU the fused SDPA kernel is invisible to the counter, so its count lacks the attention
# term: a reminder to know what a tool measures before trusting its number.
#
# The attention term grows with `T`, the weight term does not. Per layer, the weights cost
# `2·(attention + feed-forward params)` FLOPs per token and attention `4·T·H·hd`, so attention costs as
# much as all of the layer's matmuls at

# %%
def crossover_T(dim, n_heads, n_kv_heads, head_dim, hidden_dim):
    per_layer = dim * (n_heads + 2 * n_kv_heads) * head_dim + n_heads * head_dim * dim + 3 * dim * hidden_dim
    return 2 * per_layer / (4 * n_heads * head_dim)


llama = MODEL_SHAPES["llama-2-7b"]
llama_head_dim = llama["dim"] // llama["n_heads"]
print(f"effml-tiny: T = {crossover_T(d, H, Hkv, hd, hidden):,.0f} tokens")
print(f"Llama-2-7B: T = {crossover_T(llama['dim'], llama['n_heads'], llama['n_kv_heads'], llama_head_dim, llama['hidden_dim']):,.0f} tokens")

# %% [markdown]
# For a standard layer (`12·d²` weights) that point is `T = 6d`: a small model's FLOPs are dominated by
# attention at short contexts, a large model's only at long ones. Below it, most of the work is
# multiplying activations by weights, and a decode step is limited by reading those weights (the
# bandwidth bound of notebook 00) — what quantization (05) shrinks. Above it, attention itself has to
# get cheaper.

# %% [markdown]
# ## 9 · Measurement: attention's time and memory against sequence length
#
# Time and peak memory of one attention call (batch 1, 6 heads of 64 like effml-tiny, causal) at
# growing `T`, for the two paths of `effml_lib.attention.attention`:
#
# - `impl="torch"`, the reference: materialises the `(B, H, T, T)` scores, then the masked scores,
#   then the probabilities;
# - `impl="sdpa"`, PyTorch's fused `scaled_dot_product_attention`: the same function computed
#   block by block, never holding a full `T × T` matrix.

# %%
from effml_lib.device import get_device
from effml_lib.measure import benchmark, env_info, peak_memory

device = get_device()
info = env_info(device)
for key in ("device_name", "python", "torch", "triton", "cuda", "torch_threads"):
    print(f"{key:14s} {info[key]}")

# %%
from tqdm import tqdm

IMPLS = {"torch": "reference (impl='torch')", "sdpa": "fused (impl='sdpa')"}
gen = torch.Generator().manual_seed(0)
rows = []
for T_s in tqdm(seq_lens, desc="sequence lengths"):
    q_s, k_s, v_s = (torch.randn(1, H, T_s, hd, generator=gen).to(device) for _ in range(3))
    for impl, label in IMPLS.items():
        timing = benchmark(attention, q_s, k_s, v_s, impl=impl, warmup=2, reps=reps)
        try:
            peak = peak_memory(attention, q_s, k_s, v_s, impl=impl).peak_bytes
        except NotImplementedError:  # e.g. Apple MPS: no allocator statistics
            peak = float("nan")
        rows.append({"seq_len": T_s, "implementation": label, **timing.to_dict(), "peak_bytes": peak})
sweep = pd.DataFrame(rows)
sweep["GFLOP/s"] = 4 * sweep["seq_len"] ** 2 * H * hd / sweep["min_s"] / 1e9  # full T×T counted, fastest run
sweep[["seq_len", "implementation", "min_ms", "GFLOP/s", "peak_bytes"]].assign(
    peak=sweep["peak_bytes"].map(human_bytes)).drop(columns="peak_bytes").round(2)

# %%
from effml_lib.plots import latency_vs_size, memory_vs_size

ax = latency_vs_size(sweep, x="seq_len", y="min_ms", hue="implementation",
                     xlabel="sequence length T (tokens)", ylabel="time per call (ms, fastest of the repetitions)",
                     title=f"Causal attention, B=1, H={H}, D={hd}, float32, on {info['device_name']}")
plt.show()

# %% [markdown]
# Both paths do `4·T²·H·hd` FLOPs (the fused kernel can skip the tiles above the diagonal, a constant
# factor), so for long enough sequences both lines must reach slope 2 on these log–log axes: doubling
# `T` quadruples the time. Before that, a line's slope also shows how the speed in FLOP/s (table
# above) changes with `T`: a kernel that gets more efficient as the work grows has a flatter line, one
# whose tensors outgrow a cache and slow down has a line steeper than 2 (the table after the next plot
# fits the slopes). On a GPU both lines stay flat for longer, because a GPU needs large problems to
# keep busy; raise `seq_lens` to see the slopes appear. The fused kernel is faster not because it does
# less arithmetic but because it never writes the three `T × T` tensors out to memory and reads them
# back (6 MiB each at `T = 512`, larger than a CPU core's L2 cache). Each point is the fastest of `reps`
# runs, the one least disturbed by whatever else the machine was doing.

# %%
ax = memory_vs_size(sweep, x="seq_len", y="peak_bytes", hue="implementation",
                    xlabel="sequence length T (tokens)",
                    title=f"Peak memory of one attention call, B=1, H={H}, D={hd}, float32")
T_grid = np.array(seq_lens)
ax.plot(T_grid, H * T_grid**2 * 4, color="0.4", ls="--", label="one score matrix: H·T²·4 bytes")
ax.legend()
plt.show()


# %%
def loglog_slope(df, y):
    """Slope of log(y) against log(T) over the three largest T of each implementation."""
    out = {}
    for label, g in df.sort_values("seq_len").groupby("implementation", sort=False):
        g = g.tail(3)
        out[label] = np.polyfit(np.log(g["seq_len"]), np.log(g[y]), 1)[0]
    return pd.Series(out)


largest = sweep[sweep["seq_len"] == max(seq_lens)].set_index("implementation")
pd.DataFrame({"latency slope": loglog_slope(sweep, "min_ms"),
              "memory slope": loglog_slope(sweep, "peak_bytes"),
              f"peak memory at T={max(seq_lens)}": largest["peak_bytes"].map(human_bytes),
              f"latency at T={max(seq_lens)} (ms)": largest["min_ms"].round(1)}).round(2)

# %% [markdown]
# The reference's memory follows the dashed line at about three times its height, with slope 2: it
# holds the scores, the masked scores and the probabilities, each `H·T²·4` bytes (96 MiB per tensor at
# `T = 2048`). The fused kernel's memory grows with slope 1: it keeps only the output and one number
# per query row, `O(T·H·D)`, and works through the scores in tiles that stay in cache. That is
# FlashAttention's idea, and it is what makes the 32 k-token contexts of the first table possible: the
# FLOPs are still quadratic, the memory no longer is.

# %% [markdown]
# ## What the lab asks
#
# Lab 01 ([`labs/lab01_transformer_basics/lab01_transformer_basics.ipynb`](../labs/lab01_transformer_basics/lab01_transformer_basics.ipynb),
# 12 points) has you write the pieces of this notebook yourself, in general form, graded by hidden tests:
#
# 1. **`attention(q, k, v, causal=True, mask=None)`** (3 points), the library's signature: any number of
#    queries with the causal mask aligned to the end of the keys (a decode step, `Tq = 1`, is the case
#    `torch.tril` gets wrong), `causal=False`, a boolean mask of any broadcast shape, zeros for a query
#    that may see no key, float32 softmax for bf16/fp16 inputs.
# 2. **`rms_norm`** (2 points), computed in float32 whatever the input's dtype.
# 3. **`swiglu`** (2 points), the feed-forward layer from its three weight matrices.
# 4. **`decoder_block`** (3 points) from your pieces and a block's weights: stacked, it reproduces
#    effml-tiny's logits, for one sequence and for a left-padded batch of sequences of different
#    lengths, each of which must come out as if it ran alone.
# 5. **Speed** (2 points): your attention must stay within 4× the library's reference on the grading
#    machine; the graded cell plots both.
#
# While the hidden tests run, the library's own versions of these functions are unavailable, so the
# notebook above is the explanation, not the answer key.
