# %% [markdown]
# # 04 · From MHA to GQA and MQA
#
# Module 03 showed that a decode step's attention is paced by reading the KV cache, and that the cache
# holds `2 × layers × n_kv_heads × head_dim` numbers per token. Query heads do not appear in that
# product; only **key/value heads** do. So the cheapest way to shrink the cache is to keep every query
# head but let several of them share one K/V head:
#
# - **MHA** (multi-head attention): every query head has its own K/V head, $H_{kv} = H$;
# - **GQA** (grouped-query attention, Ainslie et al., 2023): groups of $G = H / H_{kv}$ query heads share one;
# - **MQA** (multi-query attention, Shazeer, 2019): all query heads share a single K/V head, $H_{kv} = 1$.
#
# In this notebook we
#
# 1. draw the three, write down their shapes, and compute grouped attention without copying K/V;
# 2. compare the cache of the catalog's real models as they ship with what it would be under MHA;
# 3. convert the course model effml-tiny from MHA to GQA and MQA by mean-pooling heads, measure the
#    damage live, and read how much a short uptraining repairs (precomputed on a GPU);
# 4. time a decode step against the number of KV heads on your device, then on an H200 (precomputed),
#    and explain why the speedup is smaller than the cache ratio.
#
# Runs in about two minutes on a busy 2-core CPU.

# %% shared="colab_setup"

# %% tags=["parameters"]
# parameters: sizes for the measurements (raise them on a GPU)
memory_shape = dict(batch=2, n_heads=32, n_kv_heads=4, q_len=8, context=4096, head_dim=128)  # section 1's peak-memory check
eval_windows = 12             # held-out windows of eval_seq_len tokens for the live losses (section 3)
eval_seq_len = 512            # tokens per window, as in the GPU run's evaluation
layer_dim, layer_heads = 1024, 16   # the attention layer timed in section 4 (head_dim 64)
layer_kv_heads = [16, 4, 1]         # MHA, GQA, MQA
layer_contexts = [512, 1024, 2048, 4096]  # cached tokens per sequence
layer_batches = [1, 4]              # sequences per decode step
reps = 30                           # timed repetitions per point (the fastest is reported in section 4)

# %% shared="notebook_setup"

# %%
import time

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from tqdm import tqdm

from IPython.display import display

from effml_lib.attention import Attention, attention_reference, decode_attention, mha_to_gqa, repeat_kv
from effml_lib.checkpoints import pretrained
from effml_lib.device import describe, get_device
from effml_lib.kvcache import MODEL_SHAPES, MODEL_PARAMS, kv_cache_bytes
from effml_lib.measure import env_info, load_result, peak_memory
from effml_lib.plots import human_bytes
from effml_lib.train import evaluate, load_split_tokens

H200 = "nvidia-h200"                # where bench/ measured what this notebook shows precomputed (shipped results)
KiB, MiB, GiB = 2**10, 2**20, 2**30  # binary units, as memory is allocated
device = get_device()
info = env_info(device)
print(f"device {info['device_name']}, torch {info['torch']}, {info['torch_threads']} thread(s)")

# %% [markdown]
# ## 1 · Pictures and shapes
#
# Eight query heads, and 8, 2 or 1 key/value heads. A line joins each query head to the K/V head it reads:
# query head $h$ reads K/V head $\lfloor h / G \rfloor$, so the $G$ heads of a group are **adjacent**.

# %%
def draw_head_sharing(ax, n_heads, n_kv_heads, title):
    """Query heads on top, KV heads below, a line from each query head to the KV head it reads."""
    group = n_heads // n_kv_heads
    colors = sns.color_palette("tab10", n_kv_heads)
    kv_x = [(g + 0.5) * group - 0.5 for g in range(n_kv_heads)]  # each KV head sits under its group's middle
    for h in range(n_heads):
        g = h // group
        ax.plot([h, kv_x[g]], [1, 0], color=colors[g], lw=1.5, zorder=1)
        ax.add_patch(plt.Rectangle((h - 0.35, 0.9), 0.7, 0.2, color=colors[g], zorder=2))
        ax.text(h, 1.0, f"q{h}", ha="center", va="center", color="white", fontsize=8, zorder=3)
    for g, x in enumerate(kv_x):
        width = max(0.7, group - 0.3)
        ax.add_patch(plt.Rectangle((x - width / 2, -0.1), width, 0.2, color=colors[g], zorder=2))
        ax.text(x, 0.0, f"k{g}, v{g}", ha="center", va="center", color="white", fontsize=8, zorder=3)
    ax.set_xlim(-0.7, n_heads - 0.3)
    ax.set_ylim(-0.3, 1.3)
    ax.set_yticks([0, 1], ["K/V heads", "query heads"])
    ax.set_xticks([])
    ax.grid(False)
    ax.set_title(title, fontsize=11)


fig, axes = plt.subplots(3, 1, figsize=(8, 5.4))
for ax, n_kv, name in zip(axes, (8, 2, 1), ("MHA: 8 KV heads, G = 1", "GQA: 2 KV heads, G = 4", "MQA: 1 KV head, G = 8")):
    draw_head_sharing(ax, 8, n_kv, name)
fig.suptitle("Which K/V head each of 8 query heads reads", fontweight="bold")
fig.tight_layout()
plt.show()

# %% [markdown]
# The figure shows the same 8 query heads reading their keys and values from 8, 2 and 1 K/V heads;
# colours mark the groups. The cache stores only the bottom row, so GQA with 2 KV heads caches a quarter
# of MHA's bytes and MQA an eighth. In tensors, with batch $B$, $T$ tokens and head size $D$:
#
# | tensor | MHA | GQA / MQA |
# |---|---|---|
# | `q` | `(B, H, T, D)` | `(B, H, T, D)` |
# | `k`, `v` (and the cache) | `(B, H, T, D)` | `(B, Hkv, T, D)`, $H_{kv} = H/G$ |
# | scores, per query head | `(B, H, Tq, Tk)` | `(B, H, Tq, Tk)` |
#
# The projection `wk` shrinks from `dim × H·D` to `dim × Hkv·D` (likewise `wv`); `wq` and `wo` stay.
#
# ### Two ways to compute it
#
# The obvious way is to copy each K/V head $G$ times (`repeat_kv`) and run ordinary MHA. That allocates
# the full MHA-sized K and V again, on every step, which is exactly the memory and traffic GQA was
# meant to remove:

# %%
show_source(repeat_kv)

# %% [markdown]
# The better way uses the adjacency above. The $G$ query heads of group $j$ are heads $jG \dots jG+G-1$,
# next to each other in `q`, so a reshape of `q` stacks them into one taller query matrix per K/V head
# (K and V are not touched), and each step below is one batched matmul for all the groups at once:
#
# | step | shape |
# |---|---|
# | `q` | `(B, H, Tq, D)` |
# | a group's $G$ query heads stacked along the query axis | `(B, Hkv, G·Tq, D)`: rows $g·Tq \dots (g+1)·Tq - 1$ of group $j$ are query head $jG + g$ |
# | scores against the group's one K head | `(B, Hkv, G·Tq, D) @ (B, Hkv, D, Tk)` → `(B, Hkv, G·Tq, Tk)` |
# | softmax, then the group's one V head | `(B, Hkv, G·Tq, Tk) @ (B, Hkv, Tk, D)` → `(B, Hkv, G·Tq, D)` |
# | the heads back in place | `(B, H, Tq, D)` |
#
# K and V are read as they lie in the cache. A mask belongs to (query head, query position, key): the
# causal mask is the same `(Tq, Tk)` block for each of the $G$ stacked heads, and a mask given per query
# head goes to that head's block of rows. The library's `attention_reference` computes attention this
# way; we use it below without reading it, since writing it is part 1 of the lab.
#
# Both give the same output. We check it on a decode-like shape (a few new queries against a long
# cache), and measure each one's peak memory with `measure.peak_memory` (on a CPU it replays the
# profiler's allocation and free events; the peak is the most extra memory alive at once):

# %%
s = memory_shape
group = s["n_heads"] // s["n_kv_heads"]
g_mem = torch.Generator().manual_seed(0)
q = torch.randn(s["batch"], s["n_heads"], s["q_len"], s["head_dim"], generator=g_mem)        # (B, H, Tq, D)
k = torch.randn(s["batch"], s["n_kv_heads"], s["context"], s["head_dim"], generator=g_mem)    # (B, Hkv, Tk, D)
v = torch.randn(s["batch"], s["n_kv_heads"], s["context"], s["head_dim"], generator=g_mem)    # (B, Hkv, Tk, D)


def attention_with_copies(q, k, v):
    """MHA after copying each K/V head G times: the copies are (B, H, Tk, D) each."""
    g = q.shape[1] // k.shape[1]
    return attention_reference(q, repeat_kv(k, g), repeat_kv(v, g))


grouped, grouped_peak = peak_memory(attention_reference, q, k, v)   # groups folded into the query axis
copied, copied_peak = peak_memory(attention_with_copies, q, k, v)    # K/V repeated per query head
assert torch.allclose(grouped, copied, atol=1e-5), (grouped - copied).abs().max()

kv_bytes = 2 * k.numel() * k.element_size()
print(f"q {tuple(q.shape)}, k/v {tuple(k.shape)} (G = {group}), float32; the cache K+V itself is {human_bytes(kv_bytes)}")
print(f"  same output: max |difference| = {(grouped - copied).abs().max():.1e}")
print(f"  peak extra memory, grouped:       {human_bytes(grouped_peak)}")
print(f"  peak extra memory, repeat_kv:     {human_bytes(copied_peak)}   "
      f"(the copies alone: {human_bytes(group * kv_bytes)}, G × the cache)")

# %% [markdown]
# The outputs agree (the largest difference is printed above). The grouped version's peak, 24 MiB, is the
# score matrix `(B, H, Tq, Tk)`, 8 MiB in float32 here, held in up to three stages at once (scores,
# probabilities, probabilities with empty rows zeroed); none of it is a copy of the cache. `repeat_kv`
# adds copies of K and V that are $G$ times the size of the cache it started from. In a decode step that
# is also $G$ times more bytes written and read again, every step, every layer.
# (PyTorch's `scaled_dot_product_attention` has taken `enable_gqa=True` since 2.5 for the same reason.)

# %% [markdown]
# ## 2 · What GQA saves on real models
#
# `kvcache.MODEL_SHAPES` holds the published shapes of real models. Most use GQA already; Llama-2-7B and
# 13B are MHA. For each we compute the cache as it ships and what it would be with one K/V head per query
# head (MHA), per token and for a batch of 8 sequences of 32 768 tokens, in bf16 (2 bytes per number):

# %%
batch, context = 8, 32_768  # a stated serving load: 8 sequences of 32k tokens


def cache_bytes(shape, n_kv_heads, batch=1, seq_len=1):
    head_dim = shape.get("head_dim", shape["dim"] // shape["n_heads"])
    return kv_cache_bytes(batch, seq_len, shape["n_layers"], n_kv_heads, head_dim, bytes_per_elem=2)


rows = []
for name, shape in MODEL_SHAPES.items():
    shipped, as_mha = cache_bytes(shape, shape["n_kv_heads"]), cache_bytes(shape, shape["n_heads"])
    rows.append({"model": name, "query heads": shape["n_heads"], "KV heads": shape["n_kv_heads"],
                 "per token, as shipped": shipped, "per token, as MHA": as_mha,
                 f"B={batch}×{context // 1024}k, as shipped (GiB)": shipped * batch * context / GiB,
                 f"B={batch}×{context // 1024}k, as MHA (GiB)": as_mha * batch * context / GiB,
                 "weights (GiB, bf16)": 2 * MODEL_PARAMS[name]["total"] / GiB,
                 "MHA / shipped": as_mha / shipped})
catalog = pd.DataFrame(rows).set_index("model")
catalog.style.format({"per token, as shipped": human_bytes, "per token, as MHA": human_bytes,
                      "MHA / shipped": "{:.0f}×"}, precision=1)

# %%
fig, ax = plt.subplots(figsize=(9, 4.2))
y = np.arange(len(catalog))
ax.barh(y + 0.2, catalog["per token, as MHA"], height=0.4, color="0.7", label="if it were MHA (KV heads = query heads)")
ax.barh(y - 0.2, catalog["per token, as shipped"], height=0.4, color=sns.color_palette()[0], label="as shipped")
ax.set_yticks(y, [f"{n} ({int(r['query heads'])}/{int(r['KV heads'])})" for n, r in catalog.iterrows()])
ax.invert_yaxis()
ax.set_xscale("log", base=2)
ax.xaxis.set_major_formatter(mticker.FuncFormatter(human_bytes))
ax.set_xlabel("KV-cache bytes per token, all layers, bf16 (log scale)")
ax.set_title("KV cache per token: as shipped vs with multi-head attention (query heads / KV heads)", fontsize=11)
ax.legend(loc="lower right", fontsize=9)
plt.show()

# %% [markdown]
# Each pair of bars is one model: grey is its cache per token if every query head had its own K/V head,
# blue is what it ships with. The gap is the group size $G$ (the table's last column): 8× for Llama-2-70B
# and Llama-3-70B (64 query heads over 8 KV heads), 7× for Qwen2.5-7B (28 over 4), and 4× for Llama-3-8B,
# Mistral-7B and Mixtral-8x7B (32 over 8). For Llama-2-70B it is the difference between 2.5 MiB and 320 KiB
# per token: at 8 × 32k tokens, 640 GiB of cache (no GPU holds that) against 80 GiB, less than
# its 128 GiB of weights. The two MHA models, Llama-2-7B and 13B, have no gap; their successors
# (Llama-3-8B, Mistral-7B) cache 4× less per token for a model of the same width.

# %% [markdown]
# ## 3 · Converting a trained MHA model: the paper's experiment at course scale
#
# Training a GQA model from scratch is one way to get one. Ainslie et al. (2023) asked whether an
# existing MHA checkpoint can be converted instead. Their recipe: build each new K (and V) projection
# head as the **mean** of the projection heads of its group, then **uptrain** the converted model for a
# small fraction (5%) of its pre-training steps, so it adapts to the shared heads.
#
# effml-tiny has **6** query heads and 6 K/V heads (MHA). A GQA group must be a whole number of query
# heads, so $H_{kv}$ must divide 6: we can go to **3, 2 or 1** KV heads. Four KV heads is impossible,
# because 4 does not divide 6 (the library raises a `ValueError` if you ask).
#
# The conversion in symbols. A projection `wk = nn.Linear(dim, H·D)` holds one block of $D$ rows per
# head, $W_k = [W_k^{(0)}; W_k^{(1)}; \dots; W_k^{(H-1)}]$, and head $i$'s key is $k^{(i)} = W_k^{(i)} x + b_k^{(i)}$.
# With $G = H / H_{kv}$, new head $j$ is the mean of the $G$ heads whose queries will share it:
#
# $$\tilde W_k^{(j)} = \frac{1}{G} \sum_{i=jG}^{jG+G-1} W_k^{(i)}, \qquad \tilde b_k^{(j)} = \frac{1}{G} \sum_{i=jG}^{jG+G-1} b_k^{(i)},$$
#
# and the same for $W_v$; $W_q$, $W_o$ and everything else are kept. The library's
# `mha_to_gqa(model, n_kv_heads)` returns a copy of the model with every layer's `wk` and `wv` pooled this
# way (by `pool_heads`, which averages one weight or bias) and `n_kv_heads` set to the new count.
#
# Mean-pooling the *projection weights* equals mean-pooling the keys: $k = W_k x$ is linear in $W_k$, and
# RoPE rotates every head of a position by the same angles, so it commutes with the average. We load
# effml-tiny and the held-out split (standard-library files the model never trained on; tokenizing it
# takes about a second the first time, then it is cached on disk). The GPU run below evaluated all
# 136 311 held-out tokens; on a CPU we take `eval_windows` windows of `eval_seq_len` tokens spread
# evenly across the split, and use `train.evaluate` on each.

# %%
model = pretrained("effml-tiny").eval().to(device)
cfg = model.config
heldout = load_split_tokens("heldout", None)  # (N,) token ids; tokenized from this Python's stdlib, cached
starts = torch.linspace(0, heldout.numel() - eval_seq_len - 2, eval_windows).long()
windows = torch.stack([heldout[s : s + eval_seq_len + 1] for s in starts])  # (W, T + 1): inputs and shifted targets
print(f"effml-tiny: {cfg.n_layers} layers, {cfg.n_heads} query heads, {cfg.n_kv_heads} KV heads of {cfg.head_dim}")
print(f"held-out split: {heldout.numel():,} tokens; evaluating {eval_windows} windows of {eval_seq_len} tokens on {describe(device)}")


def heldout_loss(model):
    """Mean next-token loss (nats) over the spread windows; train.evaluate on each (equal lengths: mean of means)."""
    return float(np.mean([evaluate(model, w, eval_seq_len, 1, device) for w in windows]))


try:
    mha_to_gqa(model, 4)
except ValueError as e:
    print(f"mha_to_gqa(model, 4) -> ValueError: {e}")


# %% [markdown]
# For contrast we also try a cruder conversion: keep only the **first** head of each group and drop the
# others, rather than averaging them. A small helper builds it from the mean-pooled copy (right shapes)
# by overwriting its K/V projections. A third variant appears below, once we have seen why it is needed.

# %%
def keep_first_head(model, n_kv_heads):
    """Like mha_to_gqa, but each new K/V head is the group's first old head instead of the mean."""
    converted = mha_to_gqa(model, n_kv_heads)  # a copy with Hkv-sized projections
    group, head_dim = model.config.n_kv_heads // n_kv_heads, model.config.head_dim
    for old, new in zip(model.layers, converted.layers):
        for name in ("wk", "wv"):
            weight = getattr(old.attention, name).weight                       # (H * D, dim)
            heads = weight.view(-1, head_dim, weight.shape[1])                 # (H, D, dim)
            getattr(new.attention, name).weight.copy_(heads[::group].reshape(-1, weight.shape[1]))  # heads 0, G, 2G, ...
    return converted


def mean_pool_rescaled(model, n_kv_heads):
    """mha_to_gqa, then K and V projections multiplied by sqrt(G): the norm the pooled heads lost (see below)."""
    converted = mha_to_gqa(model, n_kv_heads)
    group = model.config.n_kv_heads // n_kv_heads
    for block in converted.layers:
        block.attention.wk.weight.mul_(group**0.5)
        block.attention.wv.weight.mul_(group**0.5)
    return converted


conversions = {"mean-pooled (mha_to_gqa)": mha_to_gqa, "first head of each group": keep_first_head,
               "mean-pooled × √G": mean_pool_rescaled}
jobs = [(n, name) for n in (3, 2, 1) for name in conversions]
start = time.perf_counter()
original_loss = heldout_loss(model)
live = [{"KV heads": n_kv, "conversion": name, "loss": heldout_loss(conversions[name](model, n_kv))}
        for n_kv, name in tqdm(jobs, desc="converted models")]
print(f"{len(live) + 1} models evaluated in {time.perf_counter() - start:.0f} s; "
      f"original MHA model (6 KV heads): {original_loss:.3f} nats on the same windows")
live = pd.DataFrame(live).pivot_table(index="KV heads", columns="conversion", values="loss")
live[list(conversions)].sort_index(ascending=False).round(3)

# %% [markdown]
# Held-out loss in nats per token of each conversion (lower is better; compare with the original's, printed
# above). Every conversion hurts, and more the fewer heads remain: the query heads of a group now read keys
# and values made for other heads' queries, or an average of several.
#
# Surprisingly, plain mean-pooling is *worse* here than keeping one head of each group and throwing the rest
# away. The reason is a scale: the 6 heads of a layer point in nearly unrelated directions, and the mean of
# $G$ unrelated vectors has about $1/\sqrt{G}$ of their length. The cell below measures it on the
# weights:

# %%
for n_kv in (3, 2, 1):
    group, pooled = cfg.n_heads // n_kv, mha_to_gqa(model, n_kv)
    ratios = []
    for old, new in zip(model.layers, pooled.layers):
        old_norms = old.attention.wk.weight.view(cfg.n_heads, cfg.head_dim, -1).norm(dim=(1, 2))  # (H,): one per head
        new_norms = new.attention.wk.weight.view(n_kv, cfg.head_dim, -1).norm(dim=(1, 2))         # (Hkv,)
        ratios.append(new_norms / old_norms.view(n_kv, group).mean(dim=1))  # each pooled head vs its group's mean norm
    print(f"{n_kv} KV heads (G = {group}): pooled wk head norm / its group's mean norm = "
          f"{torch.cat(ratios).mean():.3f}   (1/√G = {group**-0.5:.3f})")

# %% [markdown]
# The pooled heads are shorter by almost exactly $1/\sqrt{G}$. Shorter keys divide every attention score
# by $\sqrt{G}$, which flattens the softmax (as if a temperature were raised), and shorter values shrink the
# layer's output by the same factor. Multiplying the pooled K and V projections by $\sqrt{G}$ (the third
# column) restores the scale, and mean-pooling then beats keeping one head clearly at 3 and 2 KV heads and
# ties with it at 1. The Ainslie et
# al. paper compared the methods *after* uptraining (mean-pooling ahead of first-head and random
# initialisation); a few training steps can relearn a scale easily, which is plausibly part of why
# uptraining recovers so fast. But even the best conversion is far from the original. The question is how
# cheaply that can be repaired.
#
# ### Uptraining (precomputed on an NVIDIA H200)
#
# Training is too slow for a CPU, so `python bench/gqa_uptrain.py --data-dir .traindata` ran on an H200:
# each converted model was trained for 250 more steps (of 32 × 512 tokens: 5% of effml-tiny's 5 000
# pre-training steps), a model of the same GQA shape was trained **from scratch** for the same 250 steps,
# and, as a control, the MHA original got the same 250 extra steps. All were evaluated on the whole
# held-out split.

# %%
saved = load_result(H200, "gqa_uptrain")
uptrain_run, uptrain_env = saved["results"], saved["env"]
uptrain = pd.DataFrame(uptrain_run["results"])
uptrain["variant"] = uptrain["variant"].replace({"original": "original (MHA)"})
uptrain.loc[(uptrain["n_kv_heads"] == cfg.n_heads) & (uptrain["variant"] == "uptrained"), "variant"] = "MHA + 250 steps (control)"
u = uptrain_run["uptraining"]
print(f"precomputed on an {uptrain_env['device_name']} by `python bench/gqa_uptrain.py --data-dir .traindata`, "
      f"torch {uptrain_env['torch']}")
print(f"  uptraining: {u['steps']} steps × {u['batch_size']} × {uptrain_run['seq_len']} tokens = "
      f"{u['fraction_of_pretraining_steps']:.0%} of pre-training; held-out tokens: {uptrain_run['corpus']['heldout_tokens']:,} "
      f"(Python {uptrain_run['corpus']['python']}'s stdlib)")
table = uptrain.pivot_table(index=["n_kv_heads", "cache_bytes_per_token"], columns="variant", values="heldout_loss")
table = table[["original (MHA)", "MHA + 250 steps (control)", "converted", "uptrained", "from scratch"]]
table.sort_index(ascending=False).style.format(precision=3, na_rep="")  # blank: that variant has no such row

# %%
fig, ax = plt.subplots(figsize=(8, 4.6))
styles = {"converted": ("s", "--", sns.color_palette()[3]), "uptrained": ("o", "-", sns.color_palette()[2]),
          "from scratch": ("^", ":", sns.color_palette()[7])}
original = uptrain[uptrain["variant"] == "original (MHA)"].iloc[0]
control = uptrain[uptrain["variant"] == "MHA + 250 steps (control)"].iloc[0]
for variant, (marker, ls, color) in styles.items():
    part = uptrain[uptrain["variant"] == variant].sort_values("cache_bytes_per_token")
    # each GQA line starts from the MHA model it came from (from scratch does not, so it has no such link)
    xs, ys = list(part["cache_bytes_per_token"] / KiB), list(part["heldout_loss"])
    ax.plot(xs, ys, marker=marker, ls=ls, color=color, label=f"{variant} ({u['steps']} steps)" if variant != "converted" else "converted, no training")
ax.scatter([original["cache_bytes_per_token"] / KiB], [original["heldout_loss"]], marker="*", s=260, facecolor="none",
           edgecolor="black", zorder=3, label="original MHA")
ax.scatter([control["cache_bytes_per_token"] / KiB], [control["heldout_loss"]], marker="x", s=50, color="black",
           zorder=4, label=f"MHA + {u['steps']} steps (control)")
ax.annotate(f"MHA: {original['heldout_loss']:.3f}\n+ {u['steps']} steps: {control['heldout_loss']:.3f}",
            (original["cache_bytes_per_token"] / KiB, original["heldout_loss"]), textcoords="offset points",
            xytext=(-12, 14), ha="right", fontsize=9)
for _, r in uptrain[uptrain["variant"] == "uptrained"].iterrows():
    ax.annotate(f"{r['n_kv_heads']} KV", (r["cache_bytes_per_token"] / KiB, r["heldout_loss"]),
                textcoords="offset points", xytext=(6, -12), fontsize=9)
ax.set_xscale("log", base=2)
ax.set_xticks([2, 4, 6, 12], ["2 KiB", "4 KiB", "6 KiB", "12 KiB"])
ax.xaxis.set_minor_formatter(mticker.NullFormatter())
ax.set_xlabel("KV-cache bytes per token (fp16, all 8 layers; log scale)")
ax.set_ylabel("held-out loss (nats per token)")
ax.set_ylim(1.8, None)
ax.set_title(f"effml-tiny converted to GQA/MQA, precomputed on an {uptrain_env['device_name']}", fontsize=11)
ax.legend(fontsize=9, loc="upper right")
plt.show()


# %% [markdown]
# The plot puts each model's quality (held-out loss, lower is better) against what it costs at decode time
# (cache bytes per token, halving from right to left). Read it from the right: the star is the MHA
# original at 12 KiB per token. Converting to 3, 2 or 1 KV heads saves half to five sixths of the cache,
# and the dashed line shows the immediate price: 1.5 to 3.5 nats worse. With 250 steps of uptraining
# (green), most of that comes back: at 3 KV heads the loss returns to within about 0.3 nats of the
# original, recovering four fifths of what conversion lost; at 2 heads about three quarters; even MQA
# recovers more than half. A model of the same shape trained **from scratch** for the same 250 steps (grey)
# is stuck near 4.5 nats, worse than every uptrained model and, at 3 KV heads, worse even than the
# unrepaired conversion: the converted weights carry almost everything pre-training learned, and 250 steps
# only have to teach them to share heads.
#
# Two caveats at this scale. The control (the MHA model trained 250 more steps, the cross, under the star) barely moves,
# so the uptrained models' gains come from adapting to the new heads, not from extra training as such.
# And effml-tiny has only 6 heads of 64: going to 3 KV heads halves a cache that is already small, and the
# paper's large models (64 query heads, 8 KV heads) lose far less than this tiny one. The shape of the
# result is the paper's: mean-pool, uptrain briefly, keep most of the quality at a fraction of the cache.

# %% [markdown]
# ## 4 · Decode latency and memory against the number of KV heads
#
# Fewer K/V heads means fewer bytes to read per decode step, so a step should get faster. By how much?
# We time one decode step of an attention layer on your device: a model width of `layer_dim` with
# `layer_heads` query heads, and `layer_kv_heads` K/V heads, over a cache of `layer_contexts` tokens for
# `layer_batches` sequences (float32). The step is what an attention layer does for one new token per
# sequence: the q/k/v projections, attention over the cache (`decode_attention`, the PyTorch reference
# on a CPU) and the output projection. RoPE and the cache write are left out; they are small.

# %% shared="fastest_in_turns"

# %%
from functools import partial


def decode_layer_step(layer, x, k_cache, v_cache):
    """One new token per sequence through `layer`, attending to a full cache. x (B, 1, dim) -> (B, 1, dim)."""
    b, h, hkv, d = x.shape[0], layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = layer.wq(x).view(b, 1, h, d).transpose(1, 2)  # (B, H, 1, D)
    k_new = layer.wk(x).view(b, 1, hkv, d)             # (B, 1, Hkv, D): computed as in a real step,
    v_new = layer.wv(x).view(b, 1, hkv, d)             # not written, so every repetition sees the same cache
    out = decode_attention(q, k_cache, v_cache, impl="torch")  # (B, H, 1, D)
    return layer.wo(out.transpose(1, 2).reshape(b, 1, h * d))


layers = {n_kv: Attention(layer_dim, layer_heads, n_kv).eval().to(device) for n_kv in layer_kv_heads}
rows = []
for batch, context in tqdm([(b, c) for b in layer_batches for c in layer_contexts], desc="shapes"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, layer_dim, generator=g).to(device)  # (B, 1, dim)
    caches = {n_kv: torch.randn(2, batch, n_kv, context, layer.head_dim, generator=g).to(device)  # K and V: (B, Hkv, S, D) each
              for n_kv, layer in layers.items()}
    # the KV-head variants of a shape take turns, so a busy moment of the machine slows them alike
    steps = fastest_in_turns({n_kv: partial(decode_layer_step, layers[n_kv], x, *caches[n_kv]) for n_kv in layers},
                             rounds=reps)
    for n_kv, layer in layers.items():
        cache = caches[n_kv].numel() * caches[n_kv].element_size()
        weights = sum(p.numel() * p.element_size() for p in layer.parameters())
        rows.append({"KV heads": n_kv, "batch": batch, "context": context, "step (ms)": steps[n_kv],
                     "cache bytes": cache, "all bytes read": cache + weights})
cpu_steps = pd.DataFrame(rows)
print(f"measured on {describe(device)}, float32, dim {layer_dim}, {layer_heads} query heads of {layer_dim // layer_heads}")

# %%
fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.4))
biggest_batch = max(layer_batches)
part = cpu_steps[cpu_steps["batch"] == biggest_batch]
palette = sns.color_palette("viridis", len(layer_contexts))
for color, context in zip(palette, layer_contexts):
    line = part[part["context"] == context].sort_values("KV heads")
    ax_t.plot(line["KV heads"], line["step (ms)"], marker="o", color=color, label=f"{context} tokens")
    ax_b.plot(line["KV heads"], line["cache bytes"], marker="o", color=color, label=f"{context} tokens")
for ax in (ax_t, ax_b):
    ax.set_xscale("log", base=2)
    ax.set_xticks(layer_kv_heads, [str(n) for n in layer_kv_heads])
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    ax.set_xlabel("KV heads (of 16 query heads)")
    ax.set_yscale("log", base=2)
ax_t.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
ax_t.set_ylabel("step time (ms, log scale)")
ax_t.set_title(f"time, batch {biggest_batch}", fontsize=11)
ax_b.yaxis.set_major_formatter(mticker.FuncFormatter(human_bytes))
ax_b.set_ylabel("KV cache, float32 (log scale)")
ax_b.set_title(f"cache, batch {biggest_batch}", fontsize=11)
ax_b.legend(title="context", fontsize=9)
fig.suptitle(f"One attention layer's decode step vs KV heads, on {describe(device)}", fontweight="bold")
fig.tight_layout()
plt.show()


# %% [markdown]
# Right: the cache falls exactly in proportion to the KV heads (16 → 4 → 1 is 4× and then 4× again).
# Left: the step's time falls too, but less steeply, and less at short contexts, where the lines flatten.
# The table puts each speedup next to two ratios: of cache bytes (what GQA divides) and of *all* bytes
# the step reads (the cache plus the layer's weights, which every step reads whatever the heads):

# %%
def speedups(df, time_col):
    """Each variant's speedup over the most KV heads at the same batch and context, beside the byte ratios."""
    out = []
    for (batch, context), part in df.groupby(["batch", "context"]):
        base = part.loc[part["KV heads"].idxmax()]
        for _, r in part[part["KV heads"] < base["KV heads"]].iterrows():
            out.append({"batch": batch, "context": context, "KV heads": f"{int(base['KV heads'])} → {int(r['KV heads'])}",
                        "speedup": base[time_col] / r[time_col],
                        "cache-bytes ratio": base["cache bytes"] / r["cache bytes"],
                        "all-bytes ratio": base["all bytes read"] / r["all bytes read"]})
    return pd.DataFrame(out).set_index(["batch", "context", "KV heads"])


cpu_speedups = speedups(cpu_steps, "step (ms)")
share = cpu_speedups["speedup"] / cpu_speedups["all-bytes ratio"]
mqa = cpu_speedups.xs(f"{max(layer_kv_heads)} → 1", level="KV heads")["speedup"]
by_context = share.groupby(level="context").mean()
print(f"speedup / cache-bytes ratio: {(cpu_speedups['speedup'] / cpu_speedups['cache-bytes ratio']).max():.2f} at most; "
      f"MQA's speedup: {mqa.min():.1f}× to {mqa.max():.1f}×")
print(f"speedup / all-bytes ratio: {share.min():.2f} to {share.max():.2f}; on average {by_context.iloc[0]:.2f} at "
      f"{by_context.index[0]} tokens, {by_context.iloc[-1]:.2f} at {by_context.index[-1]}")
cpu_speedups.round(2)

# %% [markdown]
# On this CPU every speedup is below the cache ratio, and for MQA far below it (its range is printed above,
# against 16×): the weights, 16 MiB in float32 for the MHA layer, are read on every step whatever the heads,
# and the MHA cache here is only 4 to 128 MiB. The all-bytes ratio, which counts those weights, is the
# better guide, and the speedups fall further behind it as the context grows (the second line above),
# because a CPU step is not only a stream of bytes: the scores and the softmax are computed for every
# query head, the same arithmetic whatever the number of KV heads, and on a CPU that arithmetic takes time.
# CPU timings vary from run to run and are for relative comparisons only; the numbers that matter for serving come from a GPU.
#
# ### On an NVIDIA H200 (precomputed by `bench/gqa.py`)
#
# `python bench/gqa.py` timed the same kind of step for one attention layer of **Llama-3-8B's shape**
# (width 4096, 32 query heads of 128) with 32 (MHA), 8 (its real GQA) and 1 (MQA) KV heads, in bf16,
# at 4k to 64k tokens and batch 1 and 8, as CUDA-graph replays, with the course's Triton decode-attention
# kernel and with PyTorch's SDPA:

# %%
saved = load_result(H200, "gqa")
gqa_run, gqa_env = saved["results"], saved["env"]
gpu = pd.DataFrame(gqa_run["rows"])
print(f"precomputed on an {gqa_env['device_name']} by `python bench/gqa.py`, torch {gqa_env['torch']}, "
      f"triton {gqa_env['triton']}, {gqa_run['dtype'].removeprefix('torch.')}")
gpu_table = gpu[gpu["n_kv_heads"] < 32].pivot_table(
    index=["batch", "context", "n_kv_heads"], columns="impl",
    values=["speedup_vs_most_kv_heads", "cache_bytes_ratio", "total_bytes_ratio"])
gpu_table = pd.DataFrame({
    "triton speedup": gpu_table[("speedup_vs_most_kv_heads", "triton")],
    "sdpa speedup": gpu_table[("speedup_vs_most_kv_heads", "sdpa")],
    "cache-bytes ratio": gpu_table[("cache_bytes_ratio", "triton")],
    "all-bytes ratio": gpu_table[("total_bytes_ratio", "triton")]})
gpu_table.index = gpu_table.index.set_names(["batch", "context", "KV heads (vs 32)"])
gpu_table.sort_index(level=[0, 1, 2], ascending=[True, True, False]).round(2)

# %%
triton_rows = gpu[gpu["impl"] == "triton"]
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
for ax, batch in zip(axes, sorted(triton_rows["batch"].unique())):
    part = triton_rows[triton_rows["batch"] == batch]
    for color, n_kv in zip(sns.color_palette(), (8, 1)):
        line = part[part["n_kv_heads"] == n_kv].sort_values("context")
        ax.plot(line["context"], line["speedup_vs_most_kv_heads"], marker="o", color=color, lw=2,
                label=f"32 → {n_kv} KV heads: measured")
        ax.plot(line["context"], line["total_bytes_ratio"], ls="--", color=color, label="ratio of all bytes read")
        ax.axhline(32 / n_kv, ls=":", color=color, label=f"ratio of cache bytes ({32 // n_kv}×)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1024:g}k")
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}×")
    ax.set_xlabel("context (cached tokens per sequence)")
    ax.set_title(f"batch {batch}", fontsize=11)
axes[0].set_ylabel("speedup over 32 KV heads (×, log scale)")
axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels, not over the data
fig.suptitle(f"Llama-3-8B attention layer, decode step, bf16, Triton kernel: {gqa_env['device_name']} (precomputed)",
             fontweight="bold", fontsize=12)
fig.tight_layout()
plt.show()

# %% [markdown]
# Each panel is one batch size; solid lines are the measured speedups over MHA (32 KV heads), dashed lines
# the ratio of all bytes the step reads, dotted lines the ratio of cache bytes alone. The measured speedup
# always sits at or below the all-bytes line, and only approaches the cache ratio where the cache is most
# of the bytes:
#
# - The layer's weights are read on every step whatever the heads: 80 MiB for Llama-3-8B's 8-KV-head layer
#   in bf16 (`wq` and `wo` are 32 MiB each). At batch 1 and 4k tokens the MHA cache is only 64 MiB, so
#   even MQA reads 68 MiB per step against MHA's 192 MiB, and the measured speedup is 1.4×, not 32×.
# - At batch 8 and 64k tokens the MHA cache is 8 GiB and the weights are noise: 32 → 8 KV heads gives
#   **3.57×** against a cache ratio of 4× (an all-bytes ratio of 3.91×). MQA gives **13.6×** against 32×:
#   its cache is down to 256 MiB, and now the 66 MiB of weights and the fixed costs of a step (kernel
#   launches, the projections, a few microseconds each) are a large share of its 147 µs.
#
# So GQA's decode speedup is bounded by the ratio of *all* bytes read, which tends to the ratio of KV heads
# only at long contexts and large batches. That is exactly where serving needs it: at 64k tokens the 8 GiB
# MHA cache of one layer for 8 sequences would, over 32 layers, be 256 GiB; Llama-3-8B's 8 KV heads make
# it 64 GiB.

# %% [markdown]
# ## What we found, and what the lab asks
#
# - GQA lets $G = H/H_{kv}$ query heads share one K/V head; the cache, and the bytes a decode step reads
#   from it, shrink by $G$. MQA is the extreme $H_{kv} = 1$.
# - Grouped attention needs no copies: fold a group's $G$ query heads into the query-length axis,
#   `(B, H, Tq, D) → (B, Hkv, G·Tq, D)`, and one batched matmul serves the group. `repeat_kv` computes the
#   same thing but allocates $G$ times the cache in copies.
# - Real models ship with GQA: Llama-2-70B and Llama-3-70B cache 8× less than MHA would, Qwen2.5-7B 7×,
#   Llama-3-8B, Mistral-7B and Mixtral-8x7B 4×, which decides whether long contexts fit at all.
# - An MHA checkpoint converts to GQA by mean-pooling each group's K/V projection heads. The mean of
#   unrelated heads is $\sqrt{G}$ times shorter; restoring that scale makes it the best conversion we tried
#   before any training. Conversion alone still costs a lot on effml-tiny; 5% of pre-training as uptraining recovers most of
#   it, and the same budget from scratch is far worse.
# - The decode speedup is bounded by the ratio of all bytes read, weights included: on an H200, 32 → 8 KV
#   heads gives 3.57× (cache ratio 4×) and 32 → 1 gives 13.6× (32×) at batch 8 and 64k tokens, much less at
#   short contexts.
#
# **Lab 04** ([`labs/lab04_gqa/lab04_gqa.ipynb`](../labs/lab04_gqa/lab04_gqa.ipynb), 10 points) has you
# build the pieces, each part graded by hidden tests:
#
# 1. **`attention(q, k, v, causal=True, mask=None)` with shared K/V heads, without copying them**
#    (3 points): the library's `attention`, which lab 01 asked for MHA, now for $H_{kv} < H$; it must match
#    attention on repeated heads for MHA, GQA and MQA, prefill and decode shapes, with boolean masks of
#    every shape that broadcasts to `(B, H, Tq, Tk)` combined with the causal one, and zeros for a query
#    that may see no key;
# 2. **`pool_heads(weight, head_dim, n_groups)`** (2 points): a K or V projection's weight or bias with its
#    heads averaged in adjacent groups of $G$, the formula of section 3;
# 3. **`mha_to_gqa(model, n_kv_heads)`** (3 points): a copy of a course `Transformer` (from MHA or GQA) with
#    every layer pooled to $H_{kv}$ KV heads by your `pool_heads`, the original left unchanged;
# 4. **what grouping saves** (2 points): your `attention` at an MQA decode step of a Llama-3-8B-sized
#    layer (16 384 cached tokens) must keep its peak memory within 16 MiB, where copying K/V per query
#    head would take 256 MiB each, and its time within 3× the library's reference.
#
# While the hidden tests run, the library's own `attention`, `pool_heads` and `mha_to_gqa` are
# unavailable, so the notebook above is the explanation, not the answer key.
