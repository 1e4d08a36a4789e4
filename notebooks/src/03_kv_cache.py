# %% [markdown]
# # 03 · KV-cache sizing and cached decoding
#
# A language model writes one token at a time. To choose token $t+1$ it needs, in every layer, the
# keys and values of all $t$ tokens before it. There are two ways to get them: compute them again at
# every step (the work per step grows with $t$, the work of a whole generation with $t^2$), or keep
# them from the steps that already computed them: the **KV cache**. Every serving system does the
# second. The price is memory, and at long contexts or large batches it is a lot of memory: more than
# the model's weights.
#
# In this notebook we
#
# 1. compute why a decode step is limited by memory traffic and not by arithmetic, unlike the prefill
#    of a prompt;
# 2. write down the cache's size in bytes, check it on published model shapes, and find the context at
#    which one sequence's cache outweighs the model;
# 3. build a calculator of cache + weights against the memory of real GPUs;
# 4. measure on your device, with the course model effml-tiny, decoding with and without a cache:
#    identical tokens, time per token, and peak memory against the formula;
# 5. measure where a decode step's time goes as the context grows: attention against the matrix
#    multiplies;
# 6. look at how a GPU kernel for decode attention splits the keys across programs and merges the
#    pieces exactly (flash-decoding), checked on the CPU in plain PyTorch.
#
# Runs in about two minutes on a busy 2-core CPU.

# %% shared="colab_setup"

# %% tags=["parameters"]
# parameters: sizes for the measurements (raise them on a GPU)
contexts = [128, 256, 512, 1024, 2048]  # tokens attended by one decode step in the latency sweep (effml-tiny stops at 2048)
reps = 5                                # timed repetitions per point (the fastest is reported)
uncached_reps = 3                       # fewer for the uncached steps: at 2048 tokens each takes seconds on a CPU
check_new_tokens = 48                   # tokens generated greedily with and without the cache, then compared
memory_batches = [1, 4, 16]             # sequences per batch in the peak-memory sweep
memory_contexts = [256, 512, 1024, 2048]  # cached tokens per sequence in the peak-memory sweep
split_batches = [1, 4]                  # batch sizes of the attention-vs-matmul split (section 5)
split_contexts = [128, 512, 1024, 2048]  # cached tokens at which that split is measured
lse_context, lse_chunks = 4096, 8       # keys and chunks of the split-softmax check (section 6)

# %% shared="notebook_setup"

# %%
import ast
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from tqdm import tqdm

from IPython.display import display

import effml_lib
from effml_lib.measure import load_result  # benchmark results (bench/results/), shipped with the package
from effml_lib.plots import human_bytes

H100, H200 = "nvidia-h100-80gb-hbm3", "nvidia-h200"  # where bench/ measured what this notebook shows precomputed
KiB, MiB, GiB = 2**10, 2**20, 2**30                  # binary units, as memory is allocated


# %% [markdown]
# ## The problem in numbers
#
# `bench/decode.py` generated 256 tokens with a Llama-2-7B-shaped model (bf16, batch 1) on an NVIDIA
# H100, using the library's compiled decoder. Each new token needs every weight once, so we can count
# the bytes each step reads and the arithmetic it does:

# %%
decode_run = load_result(H100, "decode")["results"]
compiled = decode_run["decoders"]["ours-compiled"]
tokens_per_s = compiled["tokens_per_s"]
flops_per_token = 2 * decode_run["parameters"]  # one multiply and one add per weight (the embedding lookup does none: an overestimate)
print(f"precomputed on an NVIDIA H100 by bench/decode.py: {decode_run['model']}, {decode_run['dtype']}, batch {decode_run['batch_size']}")
print(f"  {tokens_per_s:.0f} tokens/s; each step reads {compiled['bytes_per_token'] / 1e9:.2f} GB "
      f"(weights {compiled['weight_bytes'] / 1e9:.2f} GB + KV cache)")
print(f"  memory traffic:  {compiled['implied_bytes_per_s'] / 1e12:.2f} TB/s = "
      f"{compiled['fraction_of_copy_bandwidth']:.0%} of the copy bandwidth measured in the same run "
      f"({decode_run['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s)")
print(f"  arithmetic:     {flops_per_token * tokens_per_s / 1e12:.1f} TFLOP/s = "
      f"{flops_per_token * tokens_per_s / 989e12:.2%} of the H100's 989 TFLOP/s of bf16 matrix math")

# %% [markdown]
# The GPU moves bytes at three quarters of the fastest rate it can, and its tensor cores sit idle more
# than 99% of the time. Decoding one sequence is a memory problem. The KV cache adds to the bytes each
# step must read, and to the memory that must hold them: for this model, half a mebibyte per token. The
# rest of the notebook puts numbers on both.

# %% [markdown]
# ## 1 · Why decode is memory-bound: arithmetic intensity
#
# A kernel's **arithmetic intensity** is the FLOPs it performs per byte it moves to or from memory.
# A GPU does both at once, so a kernel takes at least
# $\max\left(\frac{\text{FLOPs}}{\text{peak FLOP/s}},\ \frac{\text{bytes}}{\text{peak bytes/s}}\right)$.
# Which term wins depends on whether the intensity is above or below the GPU's own ratio, its *ridge point*.
# NVIDIA's H100 SXM datasheet gives **989 TFLOP/s** of dense bf16 tensor-core math (the 1 979 it prints
# assumes 2:4 sparsity) and **3.35 TB/s** of HBM3 bandwidth: a ridge at $989/3.35 \approx 295$ FLOP/byte.
# The H200 has the same chip with 4.8 TB/s, so its ridge is lower, at 206. (Measured on the course's H100, a copy
# runs at about 3.0 TB/s and a large bf16 matrix product at about 800 TFLOP/s: the datasheet's figures are
# peaks that real kernels approach but do not reach.)
#
# We count both for the two kinds of work in a forward pass, in bf16 (2 bytes per number):
#
# - **matmuls** (the projections, the MLP and the output head): a weight matrix of `in × out` applied to
#   `n` tokens costs $2\,n \cdot in \cdot out$ FLOPs and reads the matrix once ($2 \cdot in \cdot out$ bytes)
#   plus the activations in and out. Per weight, that is $n$ FLOPs per byte: **batching tokens is free
#   intensity**, because every token reuses the same weights.
# - **attention**: for each query and each key it may see, $4D$ FLOPs (the score $q\cdot k$ and the
#   weighted sum of $v$, a multiply and an add each), and it reads K and V once. A decode step has one query
#   per sequence, and each sequence has its *own* keys, so batching does not help: the intensity stays at
#   $4 D H \,/\, (2 \cdot 2 D H_{kv}) = H/H_{kv}$ FLOP per byte, whatever the batch or the context.
#
# The functions below count exactly that (ignoring the softmax, norms and RoPE, which are small),
# for Llama-2-7B with a 4096-token prompt or context:

# %%
from effml_lib.kvcache import MODEL_EXPERTS, MODEL_PARAMS, MODEL_SHAPES, kv_cache_bytes, kv_cache_bytes_per_token

H100_FLOPS, H100_BYTES_PER_S = 989e12, 3.35e12  # NVIDIA H100 SXM datasheet: dense bf16 tensor core, HBM3
H200_FLOPS, H200_BYTES_PER_S = 989e12, 4.8e12   # NVIDIA H200 SXM datasheet: the same compute, faster memory


def head_dim_of(shape):
    return shape.get("head_dim", shape["dim"] // shape["n_heads"])


def matmul_cost(shape, n_tokens, bytes_per_elem=2):
    """(FLOPs, bytes) of every weight matmul of one forward pass over n_tokens tokens."""
    d, hd, hidden = shape["dim"], head_dim_of(shape), shape["hidden_dim"]
    q_out, kv_out = shape["n_heads"] * hd, shape["n_kv_heads"] * hd
    per_layer = [(d, q_out), (d, kv_out), (d, kv_out), (q_out, d),  # wq, wk, wv, wo
                 (d, hidden), (d, hidden), (hidden, d)]             # w1 (gate), w3 (up), w2 (down)
    mats = per_layer * shape["n_layers"] + [(d, shape["vocab_size"])]  # + the output head
    flops = sum(2 * n_tokens * i * o for i, o in mats)
    moved = sum(bytes_per_elem * (i * o + n_tokens * (i + o)) for i, o in mats)  # weights once, activations in and out
    return flops, moved


def attention_cost(shape, batch, q_len, context, bytes_per_elem=2):
    """(FLOPs, bytes) of causal attention in all layers: q_len new queries per sequence, the last
    ones of `context` keys. K and V are read once and q/out once, as a fused kernel does."""
    h, h_kv, hd = shape["n_heads"], shape["n_kv_heads"], head_dim_of(shape)
    visible_pairs = q_len * context - q_len * (q_len - 1) // 2  # query i sees context - q_len + i + 1 keys
    flops = 4 * hd * h * batch * visible_pairs                  # q·k and p·v: 2 FLOPs each per channel
    moved = bytes_per_elem * batch * (2 * h_kv * context * hd + 2 * h * q_len * hd)
    return shape["n_layers"] * flops, shape["n_layers"] * moved


# %%
llama2 = MODEL_SHAPES["llama-2-7b"]
ctx = 4096
work = {  # name -> (phase, FLOPs, bytes)
    "prefill 4096 tokens: matmuls": ("prefill", *matmul_cost(llama2, ctx)),
    "prefill 4096 tokens: attention": ("prefill", *attention_cost(llama2, 1, ctx, ctx)),
    "decode batch 1: matmuls": ("decode", *matmul_cost(llama2, 1)),
    "decode batch 1: attention (4096 cached)": ("decode", *attention_cost(llama2, 1, 1, ctx)),
    "decode batch 64: matmuls": ("decode", *matmul_cost(llama2, 64)),
    "decode batch 64: attention (4096 cached)": ("decode", *attention_cost(llama2, 64, 1, ctx)),
}
rows = []
for name, (phase, flops, moved) in work.items():
    t_math, t_mem = flops / H100_FLOPS, moved / H100_BYTES_PER_S
    rows.append({"work (Llama-2-7B, bf16)": name, "phase": phase, "GFLOP": flops / 1e9, "GB moved": moved / 1e9,
                 "FLOP/byte": flops / moved, "H100 math time (µs)": t_math * 1e6,
                 "H100 memory time (µs)": t_mem * 1e6, "bound by": "compute" if t_math > t_mem else "memory"})
intensity = pd.DataFrame(rows).set_index("work (Llama-2-7B, bf16)")
print(f"H100 ridge point: {H100_FLOPS / H100_BYTES_PER_S:.0f} FLOP/byte; H200: {H200_FLOPS / H200_BYTES_PER_S:.0f}")
intensity.drop(columns="phase").round(1)

# %%
fig, ax = plt.subplots(figsize=(9, 4))
colors = {"prefill": sns.color_palette()[0], "decode": sns.color_palette()[1]}
ax.barh(intensity.index[::-1], intensity["FLOP/byte"][::-1], color=[colors[p] for p in intensity["phase"][::-1]])
ax.set_xscale("log")
for ridge, name, ls, ha in ((H200_FLOPS / H200_BYTES_PER_S, "H200", ":", "right"), (H100_FLOPS / H100_BYTES_PER_S, "H100", "--", "left")):
    ax.axvline(ridge, color="0.2", ls=ls, lw=1.2)
    ax.text(ridge, 1.01, f" {name} ridge: {ridge:.0f} ", transform=ax.get_xaxis_transform(), ha=ha, va="bottom", fontsize=9)
ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
ax.set_xlabel("arithmetic intensity (FLOP/byte, log scale)")
ax.set_ylabel("work (Llama-2-7B, bf16)")
ax.set_title("Left of a ridge, memory sets the time; right of it, math does", pad=22)
ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], labels=list(colors),
          loc="center right")
plt.show()

# %% [markdown]
# The bars show each piece of work's FLOPs per byte on a log scale, against the ridge points of the
# H100 and H200. A 4096-token prefill is far right of the ridge: its matmuls do about 1 600 FLOPs per byte
# of weights read, and the GPU is busy computing. A decode step of one sequence is far left: its matmuls do
# about 1 FLOP per byte (each weight, 2 bytes, is used for one multiply-add, 2 FLOPs), so the step lasts as
# long as reading 13 GB of weights takes, about 4 ms on an H100, whatever its tensor cores could do.
#
# Batching 64 sequences raises the matmuls' intensity 64-fold for the same weight bytes, which is why
# serving systems batch. But attention stays at **1 FLOP/byte** at any batch size: each sequence brings its
# own cache to read. With grouped-query attention (module 04), $H/H_{kv}$ query heads share each K/V head
# and the intensity rises to the group size:

# %%
for name in ("llama-2-7b", "llama-3-8b", "qwen2.5-7b"):
    shape = MODEL_SHAPES[name]
    flops, moved = attention_cost(shape, 64, 1, ctx)
    print(f"{name:11s} {shape['n_heads']:2d} query heads / {shape['n_kv_heads']:2d} KV heads: decode attention "
          f"{flops / moved:4.1f} FLOP/byte, {H100_FLOPS / H100_BYTES_PER_S / (flops / moved):3.0f}x below the H100 ridge")

# %% [markdown]
# So at decode time the cost of attention is the cost of *reading the cache*. Its size in bytes is what
# sets both how much memory a batch needs and how long each step takes.

# %% [markdown]
# ## 2 · The bytes formula
#
# The cache stores, for every layer, a key and a value vector of `head_dim` numbers per KV head, per
# token, per sequence:
#
# $$
# \text{bytes} = 2 \times \text{batch} \times \text{seq\_len} \times n_\text{layers} \times n_\text{kv\_heads} \times \text{head\_dim} \times \text{bytes\_per\_elem}
# $$
#
# The leading 2 counts K and V. The number of *query* heads does not appear: only K/V heads are cached,
# which is the whole point of GQA and MQA (module 04). The library's `kv_cache_bytes(batch_size, seq_len,
# n_layers, n_kv_heads, head_dim, bytes_per_elem=2)` returns this product in bytes, as an int (lab 03 has you
# write it), and `kv_cache_bytes_per_token(name)` gives one token's bytes for a model of the catalog below.
#
# The lecture's figures, reproduced (fp16, 2 bytes per element). Llama-2-70B uses 8 KV heads for its
# 64 query heads; to see what that saves, we also size it as if it used multi-head attention (64 KV heads):

# %%
llama70 = MODEL_SHAPES["llama-2-70b"]
per_token_7b = kv_cache_bytes(1, 1, llama2["n_layers"], llama2["n_kv_heads"], head_dim_of(llama2))
per_token_70b_mha = kv_cache_bytes(1, 1, llama70["n_layers"], llama70["n_heads"], head_dim_of(llama70))  # 64 KV heads
per_token_70b_gqa = kv_cache_bytes_per_token("llama-2-70b")                                           # 8 KV heads
batch_70b_mha = kv_cache_bytes(16, 4096, llama70["n_layers"], llama70["n_heads"], head_dim_of(llama70))

assert per_token_7b == 512 * KiB and per_token_7b == kv_cache_bytes_per_token("llama-2-7b")
assert per_token_70b_mha == 2.5 * MiB and batch_70b_mha == 160 * GiB
print(f"Llama-2-7B:             {per_token_7b / KiB:6.0f} KiB per token")
print(f"Llama-2-70B as MHA:     {per_token_70b_mha / MiB:6.1f} MiB per token; batch 16 × 4096 tokens: {batch_70b_mha / GiB:.0f} GiB")
print(f"Llama-2-70B with GQA-8: {per_token_70b_gqa / KiB:6.0f} KiB per token; batch 16 × 4096 tokens: "
      f"{kv_cache_bytes(16, 4096, llama70['n_layers'], llama70['n_kv_heads'], head_dim_of(llama70)) / GiB:.0f} GiB")

# %% [markdown]
# 160 GiB of cache is two H100s' worth of memory before a single weight is loaded; with its 8 KV heads the
# real model needs 20 GiB. Now the whole catalog of published shapes in `MODEL_SHAPES`, next to the size of
# each model's weights (`MODEL_PARAMS`, the exact parameter counts of the released checkpoints, at 2 bytes
# each). The last column divides one by the other: the context at which **a single sequence's cache
# weighs as much as the whole model**.

# %%
catalog = []
for name, shape in MODEL_SHAPES.items():
    per_token = kv_cache_bytes_per_token(name)  # fp16/bf16
    weight_bytes = MODEL_PARAMS[name]["total"] * 2
    catalog.append({
        "model": name,
        "layers × KV heads × head_dim": f"{shape['n_layers']} × {shape['n_kv_heads']} × {head_dim_of(shape)}",
        "query heads per KV head": shape["n_heads"] // shape["n_kv_heads"],
        "KV cache per token (KiB)": per_token / KiB,
        "weights (GiB)": weight_bytes / GiB,
        "cache = weights at (tokens)": round(weight_bytes / per_token),
        "batch 16 × 4096 cache (GiB)": kv_cache_bytes(16, 4096, shape["n_layers"], shape["n_kv_heads"], head_dim_of(shape)) / GiB,
    })
catalog = pd.DataFrame(catalog).set_index("model")
catalog.round(1)

# %%
mixtral, mistral = catalog.loc["mixtral-8x7b"], catalog.loc["mistral-7b"]
experts = MODEL_EXPERTS["mixtral-8x7b"]
print(f"Mixtral-8x7B: {MODEL_PARAMS['mixtral-8x7b']['total'] / 1e9:.1f} B weights "
      f"({MODEL_PARAMS['mixtral-8x7b']['active'] / 1e9:.1f} B used per token: {experts['experts_per_token']} of "
      f"{experts['n_experts']} experts), Mistral-7B: {MODEL_PARAMS['mistral-7b']['total'] / 1e9:.1f} B")
print(f"  both cache {mixtral['KV cache per token (KiB)']:.0f} KiB per token, so the cache catches up with the weights at "
      f"{mixtral['cache = weights at (tokens)']:,} tokens for Mixtral and {mistral['cache = weights at (tokens)']:,} for Mistral")

# %% [markdown]
# Three things to read off the table:
#
# - **Multi-head attention is expensive to cache.** Llama-2-7B and 13B keep every head's K and V: at
#   512–800 KiB per token, one sequence of about 26 000–32 000 tokens holds as many bytes as the model.
#   The GQA models of about the same size cache 4–9× less per token (Llama-3-8B and Mistral-7B: 128 KiB;
#   Qwen2.5-7B, with 4 KV heads: 56 KiB), and their caches reach their weights only past 100 000 tokens.
# - **A bigger model does not mean a bigger cache.** Llama-2-70B caches less per token than
#   Llama-2-13B: 80 layers of 8 KV heads against 40 layers of 40.
# - **Mixture of experts multiplies the weights, not the cache.** Mixtral-8x7B has eight feed-forward
#   experts per layer, 46.7 B weights in all, but its attention is Mistral-7B's: the same 128 KiB per token.
#   Its cache only matches its weights beyond 700 000 tokens.
#
# (Mistral-7B v0.1 was also trained with a 4096-token sliding window: a server that uses it needs to keep
# only the last 4096 tokens per layer. The table assumes full attention over the whole context.)

# %% [markdown]
# ## 3 · A memory calculator
#
# A server must hold the weights and the cache of every sequence in its batch at once. The function below
# adds them up for any model of the catalog, batch, context and number format, and draws them against the
# memory of three GPUs. Formats: fp32 (4 bytes), bf16/fp16 (2), fp8 and int8 (1: serving engines such as
# vLLM can keep the cache in fp8), int4 (half a byte: common for weights, as in module 05). The GPU capacities are
# the usable bytes PyTorch reports on the course's H100 and H200 (recorded in `bench/results/`), and
# 24 GiB for a consumer card (RTX 3090/4090). Activations and the framework's workspace need a few GiB more,
# so a configuration that only just fits will not.

# %%
DTYPE_BYTES = {"fp32": 4, "bf16 / fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
GPU_BYTES = {  # usable memory: what torch reported on the course's GPUs, recorded in each result's env
    "consumer card (24 GiB)": 24 * GiB,
    "H100 80GB": load_result(H100, "decode")["env"]["device_memory_bytes"],
    "H200": load_result(H200, "decode_attention")["env"]["device_memory_bytes"],  # sold as 141 GB
}


def memory_budget(model="llama-2-7b", batch=16, context=4096, cache_dtype="bf16 / fp16", weight_dtype="bf16 / fp16", ax=None):
    """Bar chart of weights + KV cache (GiB) against GPU memories; prints what fits."""
    shape = MODEL_SHAPES[model]
    weights = MODEL_PARAMS[model]["total"] * DTYPE_BYTES[weight_dtype]
    per_sequence = kv_cache_bytes(1, context, shape["n_layers"], shape["n_kv_heads"], head_dim_of(shape), DTYPE_BYTES[cache_dtype])
    cache = batch * per_sequence
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    x = ["weights", "KV cache", "weights + KV cache"]
    ax.bar(x, [weights / GiB, 0, weights / GiB], color=sns.color_palette()[0], label=f"weights ({weight_dtype})")
    ax.bar(x, [0, cache / GiB, cache / GiB], bottom=[0, 0, weights / GiB], color=sns.color_palette()[1],
           label=f"KV cache ({cache_dtype})")
    for (gpu, capacity), color, ls in zip(GPU_BYTES.items(), sns.color_palette("dark", 3), ("-.", "--", ":")):
        ax.axhline(capacity / GiB, color=color, ls=ls, lw=1.5, label=f"{gpu}: {capacity / GiB:.1f} GiB")
    ax.set_ylim(0, 1.08 * max(weights + cache, max(GPU_BYTES.values())) / GiB)
    ax.set_ylabel("memory (GiB)")
    ax.set_xlabel("what the GPU must hold")
    ax.set_title(f"{model}: batch {batch} × {context:,} tokens", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    plt.show()
    print(f"weights {human_bytes(weights)} + KV cache {human_bytes(cache)} ({human_bytes(per_sequence)} per sequence) "
          f"= {human_bytes(weights + cache)}")
    for gpu, capacity in GPU_BYTES.items():
        most = max(0, int((capacity - weights) // per_sequence))  # sequences of this length that fit beside the weights
        print(f"  {gpu:23s} {'fits' if weights + cache <= capacity else 'does not fit':12s} "
              f"at most {most} sequence{'s' if most != 1 else ''} of {context:,} tokens")


memory_budget()  # the default: Llama-2-7B, batch 16 × 4096, everything in bf16

# %% [markdown]
# The figure shows Llama-2-7B in bf16 serving 16 sequences of 4096 tokens: the cache (32 GiB) is
# two and a half times the weights (12.6 GiB); together they overflow a 24 GiB card and take more than half
# of an H100. The printed lines give the most sequences of this length each GPU can hold beside the
# weights: that, not arithmetic, caps the batch and so the throughput of a decode server.
#
# Try it yourself below (in JupyterLab or Colab; a static copy of the notebook shows only the controls'
# description). Things to look for: Llama-3-8B at 128 k tokens; the same with an fp8 cache; Llama-2-70B with
# int4 weights on one H100.

# %%
try:
    import ipywidgets as widgets
except ImportError:
    widgets = None

if widgets is None:
    print("ipywidgets is not installed, so there is no interactive calculator here: "
          "call memory_budget(model, batch, context, cache_dtype, weight_dtype) with other arguments instead.")
else:
    widgets.interact(
        memory_budget,
        model=widgets.Dropdown(options=list(MODEL_SHAPES), value="llama-2-7b", description="model"),
        batch=widgets.SelectionSlider(options=[2**i for i in range(9)], value=16, description="batch",
                                      continuous_update=False),
        context=widgets.SelectionSlider(options=[2**i for i in range(9, 18)], value=4096, description="context",
                                        continuous_update=False),
        cache_dtype=widgets.Dropdown(options=list(DTYPE_BYTES), value="bf16 / fp16", description="cache"),
        weight_dtype=widgets.Dropdown(options=list(DTYPE_BYTES), value="bf16 / fp16", description="weights"),
        ax=widgets.fixed(None),
    );

# %% [markdown]
# ## 4 · Measured: decoding effml-tiny with and without the cache
#
# Now the real thing, on your device. effml-tiny is the course model (17.3 M parameters, 8 layers,
# 6 heads of 64, multi-head attention, up to 2048 tokens), kept in float32 here.

# %%
from effml_lib.checkpoints import pretrained
from effml_lib.device import describe, get_device
from effml_lib.measure import benchmark, env_info, peak_memory
from effml_lib.tokenizer import load_tokenizer

device = get_device()
tok = load_tokenizer()
model = pretrained("effml-tiny").eval().to(device)
cfg = model.config
elem = model.tok_embeddings.weight.element_size()  # 4 bytes: float32
tiny_per_token = kv_cache_bytes(1, 1, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, elem)
tiny_weights = model.num_parameters() * elem

info = env_info(device)
print(f"device {info['device_name']}, torch {info['torch']}, torch threads: {info['torch_threads']}")
print(f"effml-tiny: {cfg.n_layers} layers × {cfg.n_kv_heads} KV heads × {cfg.head_dim}, {str(model.tok_embeddings.weight.dtype).removeprefix('torch.')}")
print(f"  KV cache {human_bytes(tiny_per_token)} per token, {human_bytes(tiny_per_token * cfg.max_seq_len)} "
      f"for one {cfg.max_seq_len}-token sequence; weights {human_bytes(tiny_weights)}")
print(f"  one sequence's cache = the weights at {tiny_weights / tiny_per_token:,.0f} tokens; "
      f"a batch of 4 gets there at {tiny_weights / tiny_per_token / 4:,.0f}")

# %% [markdown]
# ### The code: a static cache and a step that uses it
#
# `StaticKVCache` preallocates, for every layer, K and V buffers of shape `(batch, n_kv_heads, max_seq_len,
# head_dim)`, and never reallocates them: every decode step works on tensors of the same shapes at the same
# addresses. The model talks to it through a small protocol that a paged cache (module 07) will also
# implement. Each attention layer calls
#
# - `cache.update(layer, k, v, positions)`, with the step's keys and values `k`, `v` of shape
#   `(B, n_kv_heads, T, head_dim)` and their positions `(B, T)`: consecutive within a row, but different from
#   row to row when the sequences have different lengths. It stores token `t` of sequence `b` in slot
#   `positions[b, t]` of that sequence's buffers and returns `(keys, values, context_lens)`: the layer's
#   whole buffers, and each sequence's length after the step, `positions[b, -1] + 1`;
# - then `cache.attention(q, keys, values, context_lens)`, which attends each sequence's queries to its first
#   `context_lens[b]` positions (`decode_attention`; on a GPU our split-K kernel of section 6).
#
# Here is the layer's side of the protocol:

# %%
from effml_lib.attention import Attention
from effml_lib.kvcache import StaticKVCache

show_source(Attention.forward)

# %% [markdown]
# `Transformer.forward(tokens, cache, start_pos)` puts the `T` tokens at positions `start_pos …
# start_pos + T - 1`, where `start_pos` is an int or one start per sequence (so prompts of different lengths
# share one cache), and checks once that they fit the cache. Decoding
# is then two phases: a **prefill** runs the whole prompt once (`start_pos = 0`), filling the cache, and
# each **decode step** runs one token (`T = 1`) against everything cached. `decoding.generate` does this;
# with `use_cache=False` it instead re-runs the whole sequence at every step. Both must choose the same
# tokens: we check it on a prompt, greedily, and also compare the logits of every step directly.

# %%
from effml_lib.decoding import generate

gen = torch.Generator().manual_seed(0)  # seeds every random input from here on
prompt = 'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n'
prompt_ids = torch.tensor([tok.encode(prompt)], device=device)  # (1, T_prompt)

start = time.perf_counter()
with_cache = generate(model, prompt_ids, check_new_tokens, use_cache=True)      # (1, T_prompt + new)
t_with = time.perf_counter() - start
start = time.perf_counter()
without_cache = generate(model, prompt_ids, check_new_tokens, use_cache=False)
t_without = time.perf_counter() - start

assert torch.equal(with_cache, without_cache), "cached and uncached greedy decoding chose different tokens"
print(f"{check_new_tokens} greedy tokens after a {prompt_ids.shape[1]}-token prompt: identical with and without the cache "
      f"({t_with:.2f} s with it, {t_without:.2f} s without)")
print("-" * 60 + "\n" + tok.decode(with_cache[0].tolist()) + "\n" + "-" * 60)

# %%
# Logits, not only argmaxes: every cached step against one uncached forward pass over the final sequence.
sequence = with_cache[:, :-1]                       # (1, T): the inputs of every step
reference = model(sequence)                         # (1, T, V): no cache, all positions at once
cache = StaticKVCache.for_model(model, batch_size=1, max_seq_len=sequence.shape[1])
n_prompt = prompt_ids.shape[1]
stepwise = [model(sequence[:, :n_prompt], cache, start_pos=0)]  # prefill: (1, T_prompt, V)
for pos in range(n_prompt, sequence.shape[1]):
    stepwise.append(model(sequence[:, pos : pos + 1], cache, start_pos=pos))  # one token: (1, 1, V)
stepwise = torch.cat(stepwise, dim=1)               # (1, T, V)
print(f"largest |logit difference| over {sequence.shape[1]} positions: {(stepwise - reference).abs().max():.1e} "
      f"(logits range over ±{reference.abs().max():.0f})")

# %% [markdown]
# The tokens are identical and the logits agree to float32 rounding (the two paths add the same numbers in
# a different order). The cache changes the cost, not the function.
#
# ### A batch of sequences of different lengths
#
# A server batches requests that arrived at different times, so the sequences sharing a cache have
# different lengths. Each keeps its own position: its new keys and values go to *its* next slot, and its
# query must see its own filled slots and nothing beyond them (the slots past its length hold stale values
# from an earlier request, or padding). `decode_attention(q, k, v, context_lens)` takes one length per
# sequence and masks the rest. We fill the unused slots with large garbage and check each sequence's
# result against attending to its own keys alone:

# %%
from effml_lib.attention import decode_attention

lens = torch.tensor([5, 12, 16])                              # filled slots of each sequence
n_seq, n_slots = len(lens), int(lens.max())
q_b = torch.randn(n_seq, cfg.n_heads, 1, cfg.head_dim, generator=gen)              # (B, H, 1, D): one new token each
k_b, v_b = torch.randn(2, n_seq, cfg.n_kv_heads, n_slots, cfg.head_dim, generator=gen)  # (B, Hkv, S, D) each
for b, n in enumerate(lens.tolist()):
    k_b[b, :, n:], v_b[b, :, n:] = 1e3, -1e3                  # stale slots: must not leak into the result
batched = decode_attention(q_b, k_b, v_b, context_lens=lens, impl="torch")  # (B, H, 1, D)
for b, n in enumerate(lens.tolist()):
    alone = decode_attention(q_b[b : b + 1], k_b[b : b + 1, :, :n], v_b[b : b + 1, :, :n], impl="torch")
    print(f"sequence {b}: {n:2d} of {n_slots} slots filled; batched vs alone: max |difference| = "
          f"{(batched[b] - alone[0]).abs().max():.1e}")

# %% [markdown]
# ### Time per token as the context grows
#
# To time one step at context $T$ (the new token attends to $T$ tokens, itself included):
#
# - **without a cache**, the step is a forward pass over all $T$ tokens, `model(tokens[:, :T])`, of which
#   only the last position's logits are used;
# - **with a cache**, it is `model(token, cache, start_pos=T - 1)` against a cache that already holds the
#   $T-1$ earlier tokens (one prefill fills it).
#
# Token ids are random: the time does not depend on which tokens they are.

# %% shared="fastest_in_turns"

# %%
from functools import partial

tokens = torch.randint(0, cfg.vocab_size, (1, max(contexts)), generator=gen).to(device)  # (1, T_max)
cache = StaticKVCache.for_model(model, batch_size=1, max_seq_len=max(contexts))
model(tokens[:, : max(contexts) - 1], cache, start_pos=0)  # prefill: the cache holds K/V of the first T_max - 1 tokens

# The cached steps at every context take turns (each rewrites position T - 1 with the K/V it already holds),
# so a busy moment of the machine slows them alike; the uncached steps take seconds, so each is timed alone.
cached_ms = fastest_in_turns({T: partial(model, tokens[:, T - 1 : T], cache, T - 1) for T in contexts}, rounds=4 * reps)
rows = []
for T in tqdm(contexts, desc="uncached steps"):
    uncached = benchmark(model, tokens[:, :T], warmup=1, reps=uncached_reps)
    rows.append({"context": T, "decoding": "without cache: whole prefix", "min_ms": uncached.min_s * 1e3})
    rows.append({"context": T, "decoding": "with KV cache: one token", "min_ms": cached_ms[T]})
latency = pd.DataFrame(rows)
latency.pivot(index="context", columns="decoding", values="min_ms").round(2)

# %%
from effml_lib.plots import latency_vs_size

ax = latency_vs_size(latency, x="context", y="min_ms", hue="decoding",
                     xlabel="context (tokens attended by the new token)",
                     ylabel="time per generated token (ms, fastest run)",
                     title=f"One decode step of effml-tiny, batch 1, on {describe(device)}")
ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1, 2, 5)))  # 10, 20, 50, 100, ...: readable on both lines
ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
ax.yaxis.set_minor_formatter(mticker.NullFormatter())
ax.figure.set_size_inches(8, 4.5)
plt.show()

# %%
by = latency.pivot(index="context", columns="decoding", values="min_ms")
slow, fast = by["without cache: whole prefix"], by["with KV cache: one token"]
T_max = max(contexts)
grid = np.arange(1, T_max + 1)
total_slow = np.interp(grid, by.index, slow).sum() / 1e3  # seconds to generate tokens 1 .. T_max, one step each
total_fast = np.interp(grid, by.index, fast).sum() / 1e3
print(f"at {T_max} tokens a step costs {slow[T_max]:.0f} ms without the cache and {fast[T_max]:.1f} ms with it "
      f"({slow[T_max] / fast[T_max]:.0f}x)")
print(f"generating {T_max} tokens one by one (interpolating the measured steps): {total_slow:.0f} s without, {total_fast:.0f} s with")
T_min = min(contexts)
print(f"a step at {T_max} tokens takes {fast[T_max] / fast[T_min]:.1f}x the time of one at {T_min} with the cache, "
      f"{slow[T_max] / slow[T_min]:.0f}x without")
print(f"the uncached step is a prefill of {T_max} tokens: {slow[T_max] / T_max:.3g} ms per token processed, "
      f"{fast[T_max] / (slow[T_max] / T_max):.0f}x less than a cached decode step spends on its one token")


# %% [markdown]
# The plot (log–log, the fastest of the timed runs) shows the cost of one generated token. Without a cache
# it grows about in proportion to the context (a slope near 1 on these axes, a little more at the longest
# contexts, where attention's own $T^2$ work starts to show): each step redoes the projections and the MLP
# for every earlier token. Summed over a generation that is quadratic, which is where the gap in total
# time comes from. With the cache the step processes one token, and its time changes far less with the
# context (the third line above): most of it is reading every weight once and the fixed cost of running
# the layers from Python, the same at any context; reading the cache adds a part that grows with $T$
# (section 5 measures it). (On a GPU, effml-tiny is so small that every step is paced by launching its
# hundred-odd kernels, a few milliseconds whatever the context; both lines stay flat until the uncached
# prefix is long enough to occupy the GPU. The difference shows with a real model.)
#
# The last line is section 1 measured: the uncached step is also a prefill, and processing 2048 tokens
# at once costs far less *per token* than one cached decode step, because the matmuls reuse each weight
# for every token. Prefill is cheap per token, decode is cheap per step.
#
# ### Peak memory against the formula
#
# Now memory. For each batch size and context we allocate a fresh cache and run one decode step, and
# `measure.peak_memory` reports the most extra memory alive at any moment (on a CPU it replays the
# profiler's allocation events; on a GPU it reads the allocator's peak). The formula predicts the cache;
# the rest is the step's own activations.

# %%
def step_with_fresh_cache(batch, T):
    """Allocate a (batch, T) cache and run the decode step at position T - 1 (the cache's last slot)."""
    cache = StaticKVCache.for_model(model, batch_size=batch, max_seq_len=T)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
    model(token, cache, start_pos=T - 1)
    return cache


rows = []
for batch in tqdm(memory_batches, desc="batch sizes"):
    for T in memory_contexts:
        cache, peak = peak_memory(step_with_fresh_cache, batch, T, device=device)
        predicted = kv_cache_bytes(batch, T, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, elem)
        assert cache.nbytes == predicted  # the buffers are exactly the formula
        rows.append({"batch": batch, "context": T, "measured peak (MiB)": peak / MiB,
                     "formula: KV cache (MiB)": predicted / MiB, "rest of the step (MiB)": (peak - predicted) / MiB})
        del cache
memory = pd.DataFrame(rows)
memory.set_index(["batch", "context"]).round(2)

# %%
fig, ax = plt.subplots(figsize=(8, 4.8))
for batch, color in zip(memory_batches, sns.color_palette()):
    part = memory[memory["batch"] == batch]
    ax.plot(part["context"], part["formula: KV cache (MiB)"], lw=8, alpha=0.3, color=color, solid_capstyle="round",
            label=f"batch {batch}: formula (KV cache)")
    ax.plot(part["context"], part["measured peak (MiB)"], marker="o", lw=1, color=color, label=f"batch {batch}: measured peak")
ax.axhline(tiny_weights / MiB, color="0.3", ls=":", lw=1.5)
ax.text(min(memory_contexts), tiny_weights / MiB * 1.08, f"effml-tiny's weights ({tiny_weights / MiB:.0f} MiB)", fontsize=9)
ax.set_xscale("log", base=2)
ax.set_yscale("log", base=2)
ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
ax.set_xlabel("context (cached tokens per sequence)")
ax.set_ylabel("memory (MiB)")
ax.set_title(f"Peak memory of one decode step with a fresh cache, on {describe(device)}", fontsize=11)
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()
extra = memory["rest of the step (MiB)"]
print(f"measured peak − formula: {extra.min():.2f} to {extra.max():.2f} MiB "
      f"(the formula alone is {memory['formula: KV cache (MiB)'].min():.0f} to {memory['formula: KV cache (MiB)'].max():.0f} MiB)")

# %% [markdown]
# The markers are the measured peaks, the wide pale lines under them the formula: they lie on top of each other,
# doubling with the context and quadrupling with each 4× in batch. The little that is left over is the
# decode step's own activations (logits and a few vectors per sequence), tiny next to the cache. Against the
# dotted line: a single 2048-token sequence's cache is already three quarters of the model's weights, and a
# batch of 4 at 1024 tokens passes them. Scale the same formula up to the catalog of section 2 and you get
# the tens of GiB of section 3.

# %% [markdown]
# ## 5 · Where a decode step's time goes at long context
#
# A cached decode step has two kinds of work. The **matmuls** read every weight once per step (a fixed
# cost, the same at any context). **Attention** reads the whole cache of every sequence (a cost that
# grows with batch × context). We time, at each context, three things on the same inputs:
#
# - the whole decode step, `model(token, cache, start_pos=T - 1)`;
# - the attention calls alone, one per layer, with that layer's own cached K and V (so the bytes read are
#   the step's), exactly as `Attention.forward` calls them;
# - the weight matmuls alone: the seven projections of each layer and the output head, on one token per sequence.
#
# Whatever is left (norms, RoPE, writing the cache, Python) is "rest". The three are timed in turns, so a
# busy moment of the machine slows all of them alike. For reference, the cache's share of the bytes that
# attention and the matmuls read is what attention's share of their time would be if both moved bytes
# equally fast.

# %%
weight_bytes_read = (model.num_parameters() - model.tok_embeddings.weight.numel()) * elem  # the embedding: one row per token
rows = []
with tqdm(total=len(split_batches) * len(split_contexts), desc="decode steps") as progress:
    for batch in split_batches:
        for T in split_contexts:
            cache = StaticKVCache.for_model(model, batch_size=batch, max_seq_len=T)
            for i in range(cfg.n_layers):   # random K/V: the time does not depend on the values
                for buf in cache.layer(i):
                    buf.normal_(generator=torch.Generator(device=device).manual_seed(i))
            token = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen).to(device)  # (B, 1)
            q = torch.randn(batch, cfg.n_heads, 1, cfg.head_dim, device=device)            # (B, H, 1, D)
            x = torch.randn(batch, 1, cfg.dim, device=device)                              # (B, 1, dim)
            hidden = torch.randn(batch, 1, cfg.hidden_dim, device=device)                  # (B, 1, hidden_dim)
            lens = torch.full((batch,), T, dtype=torch.int32, device=device)                # every slot filled

            def attention_only():
                for i in range(cfg.n_layers):
                    k, v = cache.layer(i)                # (B, Hkv, T, D): this layer's cache
                    cache.attention(q, k, v, lens)       # what Attention.forward calls in a decode step

            def matmuls_only():
                for layer in model.layers:
                    a, f = layer.attention, layer.feed_forward
                    a.wq(x), a.wk(x), a.wv(x), a.wo(x), f.w1(x), f.w3(x), f.w2(hidden)
                model.output(x)

            ms = fastest_in_turns({"step": lambda: model(token, cache, T - 1), "attention": attention_only,
                                   "matmuls": matmuls_only}, rounds=4 * reps)
            step, attn, mm = ms["step"], ms["attention"], ms["matmuls"]
            cache_read = kv_cache_bytes(batch, T, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, elem)
            rows.append({"batch": batch, "context": T, "step (ms)": step, "attention (ms)": attn, "matmuls (ms)": mm,
                         "rest (ms)": max(step - attn - mm, 0.0), "attention share": attn / (attn + mm),
                         "cache share of bytes read": cache_read / (cache_read + weight_bytes_read),
                         "attention GB/s": cache_read / attn / 1e6, "matmuls GB/s": weight_bytes_read / mm / 1e6})
            progress.update()
            del cache
split = pd.DataFrame(rows)
split.set_index(["batch", "context"]).round(2)

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
biggest = split[split["batch"] == max(split_batches)].set_index("context")
biggest[["attention (ms)", "matmuls (ms)", "rest (ms)"]].plot.bar(stacked=True, ax=left, rot=0,
                                                                  color=sns.color_palette()[1:4])
left.set_xlabel("context (cached tokens per sequence)")
left.set_ylabel("time per decode step (ms)")
left.set_title(f"Batch {max(split_batches)}: one step, split by work", fontsize=11)
left.set_ylim(0, 1.35 * biggest[["attention (ms)", "matmuls (ms)", "rest (ms)"]].sum(axis=1).max())  # room for the legend
left.legend(["attention", "weight matmuls", "rest"], loc="upper left", ncol=3, fontsize=9)

for batch, color in zip(split_batches, sns.color_palette()):
    part = split[split["batch"] == batch]
    right.plot(part["context"], 100 * part["attention share"], marker="o", color=color, label=f"batch {batch}: measured")
    right.plot(part["context"], 100 * part["cache share of bytes read"], ls="--", color=color,
               label=f"batch {batch}: cache share of bytes")
right.set_xscale("log", base=2)
right.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
right.set_ylim(0, 100)
right.set_xlabel("context (cached tokens per sequence)")
right.set_ylabel("attention's share of attention + matmuls (%)")
right.set_title("Attention's share grows with context and batch", fontsize=11)
right.legend(fontsize=9)
fig.suptitle(f"effml-tiny decode step on {describe(device)}", fontweight="bold")
fig.tight_layout()
plt.show()
for batch, part in split.groupby("batch"):
    first, last = part.iloc[0], part.iloc[-1]
    print(f"batch {batch}: weight matmuls {part['matmuls (ms)'].min():.1f} to {part['matmuls (ms)'].max():.1f} ms; "
          f"attention {first['attention (ms)']:.1f} ms at {first['context']:.0f} tokens, "
          f"{last['attention (ms)']:.1f} ms at {last['context']:.0f} ({last['attention share']:.0%} of attention + "
          f"matmuls; the cache is {last['cache share of bytes read']:.0%} of their bytes)")

# %% [markdown]
# Left: one step's time at the largest batch, split into attention, weight matmuls and the rest (norms,
# RoPE, the cache write and the Python between them); right: attention's share of the time that attention
# and the matmuls take together (solid), next to the cache's share of the bytes they read (dashed). The
# weight matmuls cost about the same at every context, as they must: the weights do not change (the lines
# under the plot give their range). Attention grows with the context, and faster with a larger batch,
# since every sequence reads its own cache: at the largest batch and context it takes longer than all the
# weight matmuls together. The solid lines follow the dashed ones, the prediction from bytes alone, but not
# exactly: where a solid line runs above its dashed one, attention moved its bytes more slowly than the
# matmuls moved theirs, and below it, faster (the table's last two columns give each one's bytes per
# second). On a CPU both are small separate operations, 57 matrix–vector products and 8 attention calls
# per step, each paying its own call overhead, so neither streams at the memory's full speed.
#
# On a GPU with a real model the same crossover happens where section 2's table says: for Llama-2-7B,
# once batch × context passes about 26 000 cached tokens, a decode step reads more bytes of cache than of
# weights. That is the regime a decode-attention kernel is written for.

# %% [markdown]
# ## 6 · The GPU kernel: split the keys, merge with log-sum-exp
#
# A decode step's attention has one query per sequence and head against thousands of cached keys.
# The natural GPU kernel gives one program (a block of threads on one streaming multiprocessor, SM) to
# each (sequence, KV head). At batch 1 with Llama-3-8B's 8 KV heads that is **8 programs for the H100's
# 132 SMs**: 94% of the chip, and most of its memory bandwidth, sits idle while 8 SMs read the whole cache.
#
# **Flash-decoding** (split-K) also splits each sequence's keys into chunks and gives each chunk its own
# program. Every program computes a softmax over *its* keys only, and writes two things: its normalised
# partial output $o_s$ and the log-sum-exp of its scores, $\ell_s = \log \sum_{j \in s} e^{x_j}$. A second,
# small kernel merges them. The merge is exact, because the full softmax is a weighted average of the chunks'
# softmaxes, weighted by each chunk's share of the total mass:
#
# $$
# o = \sum_s \frac{e^{\ell_s}}{\sum_r e^{\ell_r}}\, o_s = \sum_s e^{\,\ell_s - L}\, o_s, \qquad L = \log \sum_s e^{\ell_s} .
# $$
#
# (In practice every exponent is taken after subtracting a maximum, so nothing overflows.) The library's
# kernel chooses the number of chunks so that there are about as many programs as SMs, and never splits
# below one tile of keys:

# %%
kernel_file = Path(effml_lib.__file__).parent / "kernels/decode_attention.py"  # read, not imported: it needs Triton
source = kernel_file.read_text()
node = next(n for n in ast.parse(source).body if getattr(n, "name", None) == "_num_splits")
print(ast.get_source_segment(source, node, padded=True))


# %%
def num_splits(batch_heads, keys, block_n=128, sms=132, programs_per_sm=1):
    """The kernel's rule above, for a CUDA device with `sms` SMs (the H100 has 132)."""
    return max(1, min(programs_per_sm * sms // batch_heads, math.ceil(keys / block_n)))


n_kv = MODEL_SHAPES["llama-3-8b"]["n_kv_heads"]
rows = [{"batch": b, "context": c, "programs, one per (sequence, KV head)": b * n_kv,
         "chunks per sequence": num_splits(b * n_kv, c),
         "programs with split keys": b * n_kv * num_splits(b * n_kv, c)}
        for b in (1, 4, 16, 64) for c in (1024, 16384)]
pd.DataFrame(rows).set_index(["batch", "context"])


# %% [markdown]
# At batch 1 and 16 k tokens, splitting turns 8 programs into 128 (at 1 k tokens there are only 8 tiles of
# 128 keys to share out, so 64). From batch 16 on, sequences × KV heads already fill the GPU and the kernel
# does not split at all. Now the merge itself, in plain PyTorch on the CPU: one query per
# head against `lse_context` keys, attended in `lse_chunks` chunks, compared with the softmax over all keys
# computed in float64.

# %%
def attend_chunk(q, k, v):
    """Softmax attention of q (H, D) to one chunk k/v (H, n, D): normalised output (H, D) and LSE (H,)."""
    scores = q[:, None, :] @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (H, 1, n)
    scores = scores[:, 0]                                                # (H, n)
    m = scores.max(dim=-1, keepdim=True).values                          # subtract the max: exp never overflows
    p = torch.exp(scores - m)                                            # (H, n)
    out = (p[:, None, :] @ v)[:, 0] / p.sum(-1, keepdim=True)            # (H, D)
    lse = m[:, 0] + torch.log(p.sum(-1))                                 # (H,)
    return out, lse


def merge(outs, lses):
    """Exact merge of chunk results: outs (S, H, D), lses (S, H) -> (H, D)."""
    weights = torch.softmax(lses, dim=0)  # e^{l_s - L}: each chunk's share of the softmax mass, (S, H)
    return (weights[..., None] * outs).sum(0)


H_demo, D_demo = 8, 128
g_lse = torch.Generator().manual_seed(0)                       # its own seed: the same inputs whatever ran before
q = torch.randn(H_demo, D_demo, generator=g_lse)               # (H, D): one decode query per head
k = torch.randn(H_demo, lse_context, D_demo, generator=g_lse)  # (H, T, D)
v = torch.randn(H_demo, lse_context, D_demo, generator=g_lse)
chunk = lse_context // lse_chunks
relevant = torch.arange(2 * chunk + 100, 2 * chunk + 116)     # 16 keys in the third chunk that match the query,
k[:, relevant] += 0.6 * q[:, None, :]                         # as attention usually looks at a few tokens

parts = [attend_chunk(q, kc, vc) for kc, vc in zip(k.chunk(lse_chunks, dim=1), v.chunk(lse_chunks, dim=1))]
outs, lses = torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts])  # (S, H, D), (S, H)
merged = merge(outs, lses)

exact = torch.softmax((q.double()[:, None] @ k.double().transpose(1, 2))[:, 0] / math.sqrt(D_demo), -1)  # (H, T)
exact = (exact[:, None] @ v.double())[:, 0]                                                                # (H, D)
naive = outs.mean(0)  # averaging the chunks' outputs, ignoring how much mass each holds
print(f"{lse_chunks} chunks of {lse_context // lse_chunks} keys, {H_demo} heads of {D_demo}")
print(f"  merged with log-sum-exp weights: max |error| vs the float64 softmax = {(merged - exact).abs().max():.1e}")
print(f"  plain average of the chunks:     max |error|                         = {(naive - exact).abs().max():.1e}"
      f"  (the outputs themselves reach ±{exact.abs().max():.2f})")
print("  chunk weights e^(l_s - L) of head 0:", "  ".join(f"{w:.2f}" for w in torch.softmax(lses, 0)[:, 0].tolist()))

# %%
library = decode_attention(q[None, :, None], k[None], v[None], impl="torch")[0, :, 0]  # (1, H, 1, D) -> (H, D)
print(f"library decode_attention(impl='torch') vs the chunked merge: max |difference| = {(library - merged).abs().max():.1e}")


# %% [markdown]
# The merged result equals the full softmax to float32 rounding, while averaging the chunks' outputs is
# off by about as much as the outputs themselves: a chunk that holds most of the softmax mass must count
# for most of the answer, and its LSE says how much. The weights printed for one head show how uneven the
# chunks are: the third, which holds the keys that match the query, carries most of the mass. The Triton kernel does exactly this, with each chunk's softmax computed online, tile by tile,
# inside one program, and `_combine_kernel` applying `merge`.
#
# ### On a GPU (precomputed by `bench/decode_attention.py`)
#
# The benchmark times the kernel against PyTorch's SDPA backends for batch 1–64 and 1 k–64 k cached tokens
# (Llama-3-8B's 32/8 heads of 128, bf16), inside CUDA graphs, and reports each time as a fraction of the
# device-to-device copy bandwidth: decode attention reads the cache once, so 100% is the limit.

# %%
# One look per implementation. SDPA's automatic choice is cuDNN here, so its hollow squares sit on the cuDNN line.
IMPL_STYLE = {"triton kernel": dict(color="black", marker="o", ls="-", lw=2.5),
              "sdpa cudnn": dict(color=sns.color_palette()[0], marker="^", ls="--", lw=1.5),
              "sdpa (auto)": dict(color=sns.color_palette()[0], marker="s", ls="none", markerfacecolor="none", ms=9),
              "sdpa flash": dict(color=sns.color_palette()[3], marker="D", ls=":", lw=1.5)}


def plot_decode_attention(run, device_name):
    """The benchmark's rows: fraction of copy bandwidth vs context, one panel per batch, one line per implementation."""
    rows = pd.DataFrame([r for r in run["rows"] if "graph_us" in r])
    batches = sorted(rows["batch"].unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(3.6 * len(batches), 4), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        part = rows[rows["batch"] == batch]
        for impl, style in IMPL_STYLE.items():
            line = part[part["impl"] == impl].sort_values("context")
            ax.plot(line["context"], 100 * line["graph_fraction_of_copy"], label=impl, **style)
        ax.axhline(100, color="0.4", ls="-.", lw=1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1024:g}k")
        ax.set_xlabel("context (cached tokens)")
        ax.set_title(f"batch {batch}", fontsize=11)
    axes[0, 0].set_ylabel("K/V read speed (% of copy bandwidth)")
    axes[0, 0].set_ylim(0, max(110, 105 * rows["graph_fraction_of_copy"].max()))
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Decode attention, precomputed on {device_name} by bench/decode_attention.py "
                 f"(copy {run['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s = 100%)", fontweight="bold")
    fig.tight_layout()
    plt.show()


saved = load_result(H200, "decode_attention")
run, gpu_name = saved["results"], saved["env"]["device_name"]
plot_decode_attention(run, gpu_name)
print(f"precomputed on {gpu_name}: the Triton kernel per shape (CUDA-graph time), against the fastest SDPA backend")
pd.DataFrame(run["summary"]).set_index(["batch", "context"]).round(2)

# %% [markdown]
# Each panel is one batch size, each line one implementation, and the height is how fast it read the cache
# compared with a device-to-device copy (the dash-dotted line at 100%); `sdpa (auto)` chose cuDNN, so its
# hollow squares sit on the cuDNN line. Small shapes sit low for every
# implementation, because a few microseconds of fixed cost per call dominate; large ones should approach the
# copy line, and may pass it, since a copy both reads and writes while attention almost only reads. The
# table gives the kernel's time at each shape and its speed-up over the fastest SDPA backend in the same run.
#
# If CUDA and Triton are available where you run this notebook, the cell below also times the library's
# kernel against the PyTorch reference live, at a batch-1, long-context shape (Llama-3-8B's heads, bf16).
# On a CPU it says so and does nothing.

# %%
from effml_lib.device import triton_available

if torch.cuda.is_available() and triton_available():
    # bf16 needs compute capability 8.0 (A100, H100, RTX 30xx and later); older GPUs such as a T4 get fp16
    live_dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    live_rows = []
    for live_batch, live_context in [(1, 4096), (1, 32768), (16, 4096)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        q_live = torch.randn(live_batch, 32, 1, 128, generator=g, device="cuda", dtype=live_dtype)  # (B, H, 1, D)
        k_live, v_live = torch.randn(2, live_batch, 8, live_context, 128, generator=g, device="cuda",
                                     dtype=live_dtype)                                             # (B, Hkv, S, D) each
        try:
            out_triton = decode_attention(q_live, k_live, v_live, impl="triton")
        except Exception as e:  # an old GPU or Triton version the kernel does not support
            print(f"the Triton kernel does not run on this GPU: {type(e).__name__}: {str(e)[:200]}")
            break
        out_torch = decode_attention(q_live, k_live, v_live, impl="torch")
        row = {"batch": live_batch, "context": live_context,
               "max |triton − torch|": f"{(out_triton.float() - out_torch.float()).abs().max().item():.1e}"}
        for impl in ("torch", "triton"):
            row[f"{impl} (µs)"] = benchmark(decode_attention, q_live, k_live, v_live, impl=impl, warmup=3, reps=20).median_us
        row["speed-up"] = row["torch (µs)"] / row["triton (µs)"]
        live_rows.append(row)
    if live_rows:
        print(f"measured now on {describe('cuda')}, {str(live_dtype).removeprefix('torch.')}: one call from Python each, "
              "so the wrapper's checks and the launches are included (the benchmark's CUDA-graph times above are not)")
        display(pd.DataFrame(live_rows).set_index(["batch", "context"]).round(1))
else:
    print("No CUDA GPU with Triton here: the live kernel timing is skipped (the kernel needs one).")

# %% [markdown]
# ## What we found, and what the lab asks
#
# - A decode step does about **1 FLOP per byte** for one sequence; an H100 needs about 295 to keep its
#   tensor cores busy. Decoding is paced by memory traffic. Batching raises the matmuls' intensity, but
#   attention stays at $H/H_{kv}$ FLOPs per byte at any batch, because each sequence reads its own cache.
# - The cache costs $2 \cdot B \cdot T \cdot n_\text{layers} \cdot n_\text{kv\_heads} \cdot \text{head\_dim}
#   \cdot \text{bytes}$: 512 KiB per token for Llama-2-7B, 2.5 MiB for a 70B model with full multi-head
#   attention (160 GiB for 16 sequences of 4096 tokens). One sequence's cache passes the weights at about
#   26 k tokens for Llama-2-7B, beyond 100 k for GQA models, beyond 700 k for Mixtral, whose experts
#   multiply its weights but not its cache.
# - The memory of a GPU minus the weights, divided by the cache per sequence, caps the batch.
# - On your device, with the cache, effml-tiny chose identical tokens, and its time per token changed far
#   less with the context than without it; peak memory matched the formula to within the activations of
#   one step.
# - As batch × context grows, attention takes a growing share of a step, because it reads the cache.
#   At small batch a GPU kernel has to split the keys across programs to use the whole chip, and merges
#   the pieces exactly with their log-sum-exps.
#
# **Lab 03** ([`labs/lab03_kv_cache/lab03_kv_cache.ipynb`](../labs/lab03_kv_cache/lab03_kv_cache.ipynb), 14 points)
# has you build the pieces yourself, each part graded by hidden tests:
#
# 1. **`kv_cache_bytes`** (3 points), and with it how many 4096-token sequences fit beside Llama-3-8B's
#    weights on an 80 GiB GPU (section 3's question, by hand);
# 2. **`StaticKVCache.update`** (3 points), the protocol's method above, for a batch whose sequences sit at
#    different positions: it returns the buffers and each sequence's length, and raises a clear error on
#    overflow, on positions that are not consecutive, or on a shape that does not fit;
# 3. **the model one step at a time** on top of that cache (3 points): projections, RoPE at each token's
#    position, the cache update, and attention masked per sequence;
# 4. **cached greedy decoding of a batch** of prompts of different lengths (3 points), whose tokens must be
#    exactly the uncached model's (section 4's check);
# 5. **what the cache buys** (2 points): your cached decoding must take at most half the time of
#    recomputation on the grading machine.
#
# While the hidden tests run, the library's own `kv_cache_bytes` and cache are unavailable, so the notebook
# above is the explanation, not the answer key.
