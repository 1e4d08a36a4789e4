# %% [markdown]
# # 05 · Quantization
#
# Module 03 showed that decoding one sequence is paced by memory traffic: every step reads every weight
# once. So the number of **bits per weight** sets the speed limit, and fewer bits also let a larger model
# fit in a GPU's memory. Quantization stores each weight as a small integer code plus a few floats (a
# scale, perhaps a zero point) shared by a group of weights. The questions are how few bits a model
# tolerates, and which tricks buy back the quality.
#
# In this notebook we
#
# 1. turn module 03's bound into a bound per bit: Llama-2-7B's decode speed limit and memory from 16 bits down to 2;
# 2. quantize by hand (scale, zero point, the half-step error bound), then compare one scale per tensor,
#    per output channel and per group on effml-tiny's weights;
# 3. compare k-means codebooks with evenly spaced levels at 2–4 bits;
# 4. measure the **outliers** in real activations of SmolLM2-135M and effml-tiny, find where they sit, and
#    see why INT8 activations with one scale per tensor fail;
# 5. sweep SmoothQuant's α, which moves the outliers' range from the activations into the weights (W8A8, simulated);
# 6. test AWQ's observation that the 1% of input channels with the largest activations matter most: keep
#    them in fp16, or scale them;
# 7. climb effml-tiny's quality ladder (fp16, W8, W4 g128, W4 g32, W3, k-means): held-out perplexity against bytes;
# 8. decode one GGUF Q4_1 block of SmolLM2's file by hand;
# 9. time W8A16 and W4A16 layers on your device, and see what a kernel must do to turn saved bytes into saved time.
#
# SmolLM2-135M-Instruct comes from a set-up step run once (`python -m effml_lib.checkpoints fetch`, or
# `make models` in the repository); without it, the cells that use it fall back to effml-tiny and say so.
# Runs in about two minutes on a busy 2-core CPU (about one without SmolLM2).

# %% shared="colab_setup"

# %% tags=["parameters"]
# parameters: sizes for the measurements (raise them on a GPU)
eval_windows, eval_seq_len = 4, 512       # effml-tiny's held-out windows for every loss below
calib_windows = 2                         # other held-out windows: the calibration activations (sections 4-6)
smol_eval_windows, smol_seq_len = 2, 256  # SmolLM2 is 8x larger: fewer, shorter windows
alphas = [0.0, 0.25, 0.5, 0.75, 1.0]     # SmoothQuant's migration strengths (section 5)
salient_fraction = 0.01                   # the share of input channels kept in fp16 in section 6
awq_bits, awq_grid, awq_tokens = 3, 10, 128  # section 6: weight bits; awq_scales' search points and calibration tokens
kmeans_bits = 3                           # the k-means rung of the ladder (section 7)
speed_in, speed_out = 4096, 4096          # the layer timed in section 9 (Llama-2-7B's attention projections)
speed_tokens = [1, 16]                    # rows per call: one decode step, a few tokens
speed_reps = 3                            # timed repetitions per point (the fastest is reported)

# %% shared="notebook_setup"

# %%
import copy
import math

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from effml_lib import checkpoints, data
from effml_lib.checkpoints import pretrained, smollm2_path
from effml_lib.device import describe, get_device
from effml_lib.kvcache import MODEL_PARAMS, MODEL_SHAPES
from effml_lib.measure import benchmark, copy_bandwidth, env_info, load_result, peak_memory
from effml_lib.model import replace_linears
from effml_lib.plots import human_bytes
from effml_lib.quant import (QuantLinear, awq_scales, dequantize, kmeans_quantize, pack_int4, quantize,
                             quantize_model, smoothquant_scales)
from effml_lib.train import load_split_tokens

H100, H200 = "nvidia-h100-80gb-hbm3", "nvidia-h200"  # where bench/ measured what this notebook shows precomputed
MiB = 2**20
device = get_device()
info = env_info(device)
print(f"device {info['device_name']}, torch {info['torch']}, {info['torch_threads']} thread(s), effml_lib {info['effml_lib']}")

# %% [markdown]
# ## 1 · Bytes per weight decide decode speed
#
# At batch 1 a decode step reads every weight once, and (module 03) that reading takes most of the step.
# Its time is at least (bytes of weights + bytes of KV cache) ÷ memory bandwidth, so halving the bits per
# weight nearly doubles the speed limit. Each format below counts everything it stores per weight: a
# group's scale (and zero point) is shared by the group, so groups of $g$ weights add $16/g$ bits for a
# float16 scale, $24/g$ with a uint8 zero point. A step reads every weight but the embedding table, of which
# it reads one row (Llama-2's LM head is a matrix of its own, read in full; with tied embeddings the head would
# read the table), and we count every weight it reads at the format's width, the LM head's included. Memory
# counts every weight, the table's too. The other numbers are those of module 03's run (`bench/decode.py` on
# an H100, precomputed): the copy bandwidth it measured, Llama-2-7B's parameters, and the weight and cache
# bytes each of its steps read.

# %%
decode_run = load_result(H100, "decode")
run, run_env = decode_run["results"], decode_run["env"]
compiled = run["decoders"]["ours-compiled"]
params, copy_bw, efficiency = run["parameters"], run["copy_bandwidth_bytes_per_s"], compiled["fraction_of_copy_bandwidth"]
kv_per_token = compiled["kv_bytes_per_token"]  # cache bytes a step read, on average over that run
shape = MODEL_SHAPES[run["model"]]
read_params = params - shape["vocab_size"] * shape["dim"] + shape["dim"]  # all but the embedding table, and one row of it
assert read_params * 2 == compiled["weight_bytes"]  # the bf16 weight bytes bench/decode.py counted per step
print(f"precomputed on an {run_env['device_name']} by bench/decode.py: {run['model']}, {run['dtype'].removeprefix('torch.')}, "
      f"batch {run['batch_size']}: {compiled['tokens_per_s']:.0f} tokens/s = {efficiency:.0%} of the copy bandwidth "
      f"({copy_bw / 1e12:.2f} TB/s) at {compiled['bytes_per_token'] / 1e9:.2f} GB per token")
print(f"a step reads {read_params / 1e9:.3f} B of the {params / 1e9:.3f} B parameters: all but the embedding table "
      f"({(params - read_params) / 1e9:.3f} B), of which it reads one row")

FORMATS = {  # name -> bits per weight, its scales and zero points included
    "bf16": 16,
    "GGUF Q8_0": 34 * 8 / 32,                 # blocks of 32 weights: a float16 scale + 32 int8 codes
    "int8 per channel (W8A16)": 8 + 16 / 4096,  # a float16 scale per row of 4096
    "GGUF Q4_1": 20 * 8 / 32,                 # blocks of 32: float16 scale and minimum + 16 bytes of 4-bit codes
    "GGUF Q4_0": 18 * 8 / 32,                 # blocks of 32: a float16 scale + 16 bytes of codes
    "int4 g128 (W4A16)": 4 + (16 + 8) / 128,  # a float16 scale and a uint8 zero point per 128 weights
    "int3 g128": 3 + (16 + 8) / 128,
    "int2 g64": 2 + (16 + 8) / 64,
}


def decode_bound(bits_per_weight):
    """Llama-2-7B's tokens/s at batch 1 if a step did nothing but read its weights (all but the embedding
    table) and its cache once, at copy speed."""
    return copy_bw / (read_params * bits_per_weight / 8 + kv_per_token)


formats = pd.DataFrame([{"format": name, "bits per weight": bits,
                         "Llama-2-7B weights (GB)": params * bits / 8 / 1e9,
                         "Llama-2-70B weights (GB)": MODEL_PARAMS["llama-2-70b"]["total"] * bits / 8 / 1e9,
                         "7B bound (tokens/s)": decode_bound(bits),
                         f"7B at {efficiency:.0%} of it (tokens/s)": efficiency * decode_bound(bits)}
                        for name, bits in FORMATS.items()]).set_index("format")
bf16_bound, int4_bound = formats.loc["bf16", "7B bound (tokens/s)"], formats.loc["int4 g128 (W4A16)", "7B bound (tokens/s)"]
print(f"the measured bf16 run reached {compiled['tokens_per_s'] / bf16_bound:.1%} of the bf16 bound; "
      f"int4 g128 raises the bound from {bf16_bound:.0f} to {int4_bound:.0f} tokens/s, {int4_bound / bf16_bound:.2f}x")
formats.round(2)

# %%
fig, ax = plt.subplots(figsize=(8, 4.4))
bits_axis = np.linspace(2, 16, 200)
ax.plot(bits_axis, decode_bound(bits_axis), color="0.3", label="bound: copy bandwidth ÷ bytes per token")
ax.plot(bits_axis, efficiency * decode_bound(bits_axis), color="0.3", ls="--", lw=1,
        label=f"{efficiency:.0%} of the bound (what the bf16 run reached)")
for (name, row), color in zip(formats.iterrows(), sns.color_palette("colorblind", len(formats))):
    ax.scatter(row["bits per weight"], row["7B bound (tokens/s)"], color=color, zorder=3, label=f"{name}: {row['bits per weight']:.2f} bits")
ax.scatter(16, compiled["tokens_per_s"], marker="*", s=200, color="black", zorder=4, label="measured, bf16 (bench/decode.py)")
ax.set_xscale("log", base=2)
ax.set_xticks([2, 3, 4, 5, 6, 8, 12, 16], ["2", "3", "4", "5", "6", "8", "12", "16"])
ax.xaxis.set_minor_formatter(mticker.NullFormatter())
ax.set_xlabel("bits per weight, scales included (log scale)")
ax.set_ylabel("decode tokens/s, batch 1")
ax.set_title(f"Llama-2-7B, batch 1, on an {run_env['device_name']} (precomputed bandwidth and bf16 run)", fontsize=11)
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
plt.show()

# %% [markdown]
# The solid curve is the bound, the dashed one 75% of it (75.5%, printed above), which is what
# the compiled bf16 decoder reached (the star). At 4.19 bits (int4 codes with a float16 scale and a uint8 zero
# point per 128 weights) the bound rises from 224 to 828 tokens/s, 3.70×: not 16/4 = 4×, because the scales
# add 0.19 bits to every weight and the KV cache is read in 16 bits whatever the weights. Memory matters as
# much: Llama-2-70B's weights take 138 GB in bf16, more than one 80 GB GPU holds, and 36.1 GB at int4 g128,
# which leaves more than half of one GPU for the cache. GGUF's Q4_1, with a float16 scale and a float16
# minimum for every 32 weights, pays a whole bit per weight for them: small groups cost bytes.
#
# Whether a kernel reaches this bound with quantized weights depends on how it dequantizes them
# (section 9). Whether the model still works at these widths is the rest of the notebook.

# %% [markdown]
# ## 2 · Linear quantization by hand
#
# A group of weights $w_1 \dots w_n$ becomes integer codes $q_i$ of $b$ bits and one **scale** $s$ (and,
# asymmetric, a **zero point** $z$), such that $\hat w_i = s\,(q_i - z)$:
#
# - **symmetric**: $s = \max_i |w_i| \,/\, (2^{b-1} - 1)$, $q_i = \mathrm{clamp}\big(\mathrm{round}(w_i / s),\ -(2^{b-1}-1),\ 2^{b-1}-1\big)$, $z = 0$.
#   The largest $|w|$ lands on the largest code, and the levels are centred on 0 whether the weights are or not.
# - **asymmetric**: $s = (\max_i w_i - \min_i w_i) \,/\, (2^b - 1)$, $z = \mathrm{round}(-\min_i w_i / s)$,
#   $q_i = \mathrm{clamp}\big(\mathrm{round}(w_i / s) + z,\ 0,\ 2^b - 1\big)$. The $2^b$ levels cover
#   $[\min, \max]$ (the library widens it to hold 0 if it does not), and 0.0 has a code of its own, $z$,
#   so zeros come back exact.
#
# Rounding to the nearest level misses by at most half a step: $|w_i - \hat w_i| \le s/2$ for every weight
# in range, and for weights spread evenly within a step the mean squared error is $s^2/12$. Everything that
# follows is about making $s$ small: fewer weights per scale (a smaller range to cover), more bits, or a
# range not stretched by a few large values.
#
# Eight weights of a row at 4 bits, by hand (Python's `round`, like `torch.round`, rounds halves to even):

# %%
w = torch.tensor([0.42, -1.37, 0.05, 0.88, -0.21, 2.10, -0.63, 0.30])  # 8 weights of one row
bits = 4
qmax = 2 ** (bits - 1) - 1                                # symmetric codes run from -7 to 7
scale_sym = w.abs().max().item() / qmax                   # the largest |w| lands on code 7
scale_asym = (w.max() - w.min()).item() / (2**bits - 1)   # the range [min, max] in 15 steps
zero = round(-w.min().item() / scale_asym)                # the code that 0.0 gets
print(f"symmetric:  scale = max|w| / {qmax} = {w.abs().max():.2f} / {qmax} = {scale_sym:.4f}")
print(f"asymmetric: scale = (max - min) / {2**bits - 1} = ({w.max():.2f} - ({w.min():.2f})) / {2**bits - 1} = {scale_asym:.4f}; "
      f"zero point = round({-w.min():.2f} / {scale_asym:.4f}) = {zero}")
x1 = w[1].item()
c_sym, c_asym = round(x1 / scale_sym), round(x1 / scale_asym) + zero
print(f"w[1] = {x1:.2f}, symmetric:  code round({x1:.2f} / {scale_sym:.4f}) = round({x1 / scale_sym:.3f}) = {c_sym}; "
      f"back: {c_sym} × {scale_sym:.4f} = {c_sym * scale_sym:.4f}")
print(f"w[1] = {x1:.2f}, asymmetric: code round({x1:.2f} / {scale_asym:.4f}) + {zero} = {c_asym - zero} + {zero} = {c_asym}; "
      f"back: ({c_asym} - {zero}) × {scale_asym:.4f} = {(c_asym - zero) * scale_asym:.4f}")

# %% [markdown]
# The same eight weights through the library's `quantize` (one row, so one group) and `dequantize`: the
# scales and the zero point are the ones computed by hand, and so are the codes of `w[1]`.

# %%
sym, asym = quantize(w[None], bits), quantize(w[None], bits, symmetric=False)  # one row, one group
example = pd.DataFrame({"w": w.numpy(),
                        "symmetric code": sym.codes[0].numpy(), "symmetric ŵ": dequantize(sym)[0].numpy(),
                        "asymmetric code": asym.codes[0].numpy(), "asymmetric ŵ": dequantize(asym)[0].numpy()})
example["symmetric |error|"] = (example["symmetric ŵ"] - example["w"]).abs()
example["asymmetric |error|"] = (example["asymmetric ŵ"] - example["w"]).abs()
print(f"quantize: symmetric scale {sym.scale.item():.4f}; asymmetric scale {asym.scale.item():.4f}, zero point {asym.zero.item()}")
print(f"largest |error|: symmetric {example['symmetric |error|'].max():.4f} ≤ scale/2 = {sym.scale.item() / 2:.4f}; "
      f"asymmetric {example['asymmetric |error|'].max():.4f} ≤ {asym.scale.item() / 2:.4f}")
example.round(4)

# %% [markdown]
# Symmetric 4-bit wastes levels: its codes run from −7 to 7, and since these weights reach 2.10 but only
# −1.37, the codes −7 and −6 are never used; its largest error, 0.1300, is within its bound of 0.1500.
# Asymmetric spends all 16 levels on [−1.37, 2.10]: a smaller step (0.2313 against 0.3000) and a largest
# error of 0.0687. Both give back 0.05 as 0: it is within half a step of zero.
#
# ### Per tensor, per channel, per group
#
# One scale for a whole tensor is stretched by the tensor's largest weight. One per output row (**per
# channel**) adapts to each row's range, and one per **group** of $g$ consecutive weights of a row adapts
# further, at a price of $16/g$ bits per weight for a float16 scale (and $8/g$ more for a uint8 zero point).
# We measure the relative error $\lVert \hat W - W \rVert / \lVert W \rVert$ over all of effml-tiny's block
# weights: the seven projections of each of its 8 blocks (the embedding and the LM head are not quantized
# here, as usual). First the bound itself, on every weight:

# %%
tiny = pretrained("effml-tiny").eval().to(device)
tiny_weights = {name: module.weight.detach() for name, module in tiny.named_modules()
                if isinstance(module, nn.Linear) and name.startswith("layers.")}
n_weights = sum(w.numel() for w in tiny_weights.values())
print(f"effml-tiny: {len(tiny_weights)} linear layers in {tiny.config.n_layers} blocks, {n_weights:,} weights "
      f"(rows of {sorted({w.shape[1] for w in tiny_weights.values()})} inputs); the embedding and LM head stay in 16 bits")

worst = 0.0
for w in tiny_weights.values():
    qt = quantize(w, 4, 128, symmetric=False)
    half_step = qt.scale.repeat_interleave(128, dim=-1) / 2  # each weight's own group's scale / 2
    worst = max(worst, ((dequantize(qt) - w).abs() / half_step).max().item())
print(f"4 bits, groups of 128: the largest error of any of the {n_weights:,} weights is {worst:.4f} × its scale/2")

# %%
GRANULARITIES = {"per tensor": dict(per_tensor=True), "per channel": dict(group_size=None),
                 "g128": dict(group_size=128), "g64": dict(group_size=64), "g32": dict(group_size=32),
                 "g16": dict(group_size=16)}


def relative_error(bits, symmetric=False, **granularity):
    """||Ŵ - W|| / ||W|| over all of effml-tiny's block weights, and the bits per weight it costs
    (codes + a float16 scale per group, + a uint8 zero point when asymmetric)."""
    err = total = groups = 0.0
    for w in tiny_weights.values():
        qt = quantize(w, bits, symmetric=symmetric, **granularity)
        err += (dequantize(qt) - w).pow(2).sum().item()
        total += w.pow(2).sum().item()
        groups += qt.scale.numel()
    return math.sqrt(err / total), bits + (16 if symmetric else 24) * groups / n_weights


rows = []
for bits in tqdm((2, 3, 4, 8), desc="bits"):
    for name, granularity in GRANULARITIES.items():
        error, cost = relative_error(bits, **granularity)
        rows.append({"bits": bits, "granularity": name, "relative error": error, "bits per weight": cost})
sweep = pd.DataFrame(rows)
for name in ("per channel", "g128"):
    sym_error, _ = relative_error(4, symmetric=True, **GRANULARITIES[name])
    asym_error = sweep.query("bits == 4 and granularity == @name")["relative error"].item()
    print(f"4 bits {name}: symmetric {sym_error:.4f}, asymmetric {asym_error:.4f}")
sweep.pivot(index="granularity", columns="bits", values="relative error").loc[list(GRANULARITIES)].round(4)

# %%
fig, (ax_g, ax_b) = plt.subplots(1, 2, figsize=(12, 4.4))
palette = sns.color_palette("viridis", 4)
positions = {name: i for i, name in enumerate(GRANULARITIES)}
markers = dict(zip(GRANULARITIES, "XosD^v"))
for color, (bits, part) in zip(palette, sweep.groupby("bits")):
    ax_g.plot([positions[g] for g in part["granularity"]], part["relative error"], color=color, label=f"{bits} bits")
    ax_b.plot(part["bits per weight"], part["relative error"], color=color, label=f"{bits} bits")
    for _, r in part.iterrows():
        for ax, x in ((ax_g, positions[r["granularity"]]), (ax_b, r["bits per weight"])):
            ax.scatter(x, r["relative error"], marker=markers[r["granularity"]], color=color, s=40, zorder=3)
ax_b.legend(handles=[plt.Line2D([], [], color=c, label=f"{b} bits") for c, b in zip(palette, (2, 3, 4, 8))]
            + [plt.Line2D([], [], ls="none", marker=m, color="0.3", label=g) for g, m in markers.items()],
            fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
ax_g.set_xticks(range(len(GRANULARITIES)), [g.replace(" ", "\n") for g in GRANULARITIES])
ax_g.set_xlabel("one scale per … (groups of g consecutive weights of a row)")
for ax in (ax_g, ax_b):
    ax.set_yscale("log")
    ax.set_ylabel("relative error ‖Ŵ − W‖ / ‖W‖ (log scale)")
ax_g.set_title("Error vs granularity", fontsize=11)
ax_b.set_xlabel("bits per weight, scales and zero points included")
ax_b.set_title("The same points against what they cost", fontsize=11)
fig.suptitle("Round-to-nearest, asymmetric, on all 56 block weights of effml-tiny", fontweight="bold")
fig.tight_layout()
plt.show()

# %% [markdown]
# The bound holds on all 14,155,776 weights up to float32 rounding, and is reached (the ratio prints as 1.0000:
# a group's largest weight can land exactly half a step from the top code, where the codes are clamped).
#
# Left: every step to a finer granularity lowers the error, and the largest step is the first, from per
# tensor to per channel (at 4 bits, 0.2330 to 0.1180: halved), because effml-tiny's rows have different
# ranges. Groups of 128 down to 16 go on to 0.1009 and 0.0695. Each extra bit roughly halves the error, as a
# halved step should (per channel: 0.5838, 0.2528, 0.1180 at 2, 3, 4 bits), and asymmetric codes beat
# symmetric ones at the same granularity (per channel 0.1180 against 0.1354, g128 0.1009 against 0.1178).
#
# Right: the same points at what they cost. Small groups are not free: at 16 weights per group the scale and
# zero point add 1.5 bits to every weight, so 3-bit codes in groups of 16 cost more than 4-bit codes per
# channel and make a larger error (0.1489 against 0.1180). The usual choices, groups of 32 to 128, sit where
# the curves are still steep and the overhead is a fraction of a bit. The weights' error is only a proxy:
# section 7 measures the model's loss.

# %% [markdown]
# ## 3 · k-means vs linear levels at 2–4 bits
#
# Evenly spaced levels suit evenly spread values, but weights are bell-shaped: most sit near 0, few in the
# tails. **k-means** quantization (Deep Compression, Han et al., 2016) fits the $2^b$ levels, a **codebook**
# of centroids, to the weights instead: each weight is stored as the index of its nearest centroid, and each
# centroid is the mean of the weights assigned to it (Lloyd's algorithm, which lowers the squared error at
# every iteration). Dequantizing is a table lookup, `centroids[codes]`. The library's version:

# %%
show_source(kmeans_quantize)

# %%
km_name = "layers.3.feed_forward.w1"
km_w = tiny_weights[km_name]
rows, levels = [], {}
for bits in (2, 3, 4):
    codes, centroids = kmeans_quantize(km_w, bits)
    rows.append({"bits": bits, "method": "k-means (one codebook)",
                 "relative error": ((centroids[codes.long()] - km_w).norm() / km_w.norm()).item()})
    levels[bits] = centroids
    for name in ("per tensor", "per channel", "g128"):
        qt = quantize(km_w, bits, symmetric=False, **GRANULARITIES[name])
        rows.append({"bits": bits, "method": f"linear, {name}",
                     "relative error": ((dequantize(qt) - km_w).norm() / km_w.norm()).item()})
kmeans_table = pd.DataFrame(rows).pivot(index="method", columns="bits", values="relative error")
print(f"{km_name} {tuple(km_w.shape)}: relative error ‖Ŵ − W‖ / ‖W‖")
kmeans_table.round(4)

# %%
fig, ax = plt.subplots(figsize=(9, 4))
ax.hist(km_w.flatten().cpu().numpy(), bins=200, color="0.75")
linear_levels = dequantize(quantize(km_w, kmeans_bits, symmetric=False, per_tensor=True)).unique().cpu()
ax.vlines(linear_levels, 0.5, 1.0, transform=ax.get_xaxis_transform(), color=sns.color_palette()[0], lw=2,
          label=f"linear levels ({2**kmeans_bits}, evenly spaced over the range)")
ax.vlines(levels[kmeans_bits].cpu(), 0.0, 0.5, transform=ax.get_xaxis_transform(), color=sns.color_palette()[1], lw=2,
          label=f"k-means centroids ({2**kmeans_bits})")
ax.set_xlabel("weight value")
ax.set_ylabel("weights per bin (count)")
ax.set_title(f"{km_name}: where {kmeans_bits}-bit levels sit, one set for the whole tensor", fontsize=11)
ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
plt.show()

# %% [markdown]
# The histogram shows why codebooks win with one set of levels per tensor: the 8 linear levels (blue) spread
# evenly from the smallest weight to the largest, so the outer ones serve a handful of weights, while the 8
# centroids (orange) crowd where the weights are. Over the whole tensor, k-means makes a much smaller error
# than linear levels at every width (0.3452 against 0.8078 at 2 bits, 0.1884 against 0.3747 at 3, 0.1136
# against 0.1750 at 4). But its edge shrinks as bits grow, and per-group scales win it back: at 4 bits linear
# levels per channel (0.1156) are level with the codebook and groups of 128 (0.1013) beat it; at 2 and 3
# bits the codebook still beats groups of 128.
#
# A codebook costs little storage (16 floats per tensor at 4 bits) but costs elsewhere: k-means takes many
# passes over the weights (25 here), and a lookup is a gather, which GPU kernels do less well than the
# multiply-add that turns a linear code back into a weight. That, and groups closing the gap by 4 bits, is
# why most deployed LLM formats (AWQ's, GPTQ's, most of GGUF's types) are linear with group scales; GGUF's
# i-quants (IQ2_XS, IQ4_NL, ...) are the exception, with non-linear codebooks and lattices. Section 7 puts
# a 3-bit codebook into effml-tiny.

# %% [markdown]
# ## 4 · Outliers in real activations
#
# Weights are fixed and bell-shaped; the **activations** a layer multiplies them by are neither. Dettmers et
# al. (LLM.int8(), 2022) found that in large models a few **hidden channels** carry values far larger than
# the rest, in most layers and on most tokens; Sun et al. (2024) found **massive activations**, thousands of
# times the median, at a few special tokens. Both matter once activations are quantized too (**W8A8**: INT8
# weights and INT8 activations, so that the matmul runs on integer units): one scale per tensor must
# stretch to the largest value, and the ordinary values then get only a few codes each.
#
# We record what every block linear layer receives on calibration windows of held-out text, for effml-tiny and
# for **SmolLM2-135M-Instruct** (Hugging Face's Llama-shaped 135 M-parameter model, loaded from its GGUF file
# by `checkpoints.load_gguf`, which dequantizes its Q4_1 weights to float32). SmolLM2's starting point, "as
# loaded" below, is therefore already a 4-bit model: the file's Q4_1 weights, dequantized. Every W8A8, W3 and
# AWQ figure for it re-quantizes weights that sit on a Q4_1 grid, and measures damage on top of the file's
# own. The text is the same for both: the standard library's held-out files, which effml-tiny never trained on
# (SmolLM2 may have: they are public code), in each model's own tokens. Losses below are mean next-token
# cross-entropy in nats per token, on evaluation windows different from the calibration ones.

# %%
def spread_windows(tokens, n, seq_len):
    """n windows of seq_len + 1 tokens spread evenly over tokens: (n, seq_len + 1), inputs and shifted targets."""
    starts = torch.linspace(0, tokens.numel() - seq_len - 2, n).long()
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts]).to(device)


def heldout_loss(model, windows):
    """Mean next-token loss (nats per token) of model on windows (W, T + 1)."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten()).item()


def linear_inputs(model, tokens):
    """What every block linear layer receives on tokens: {name: (N, in_features)}. Layers that read the
    same input (wq, wk and wv; w1 and w3) share one tensor."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            hooks.append(module.register_forward_hook(
                lambda module, inputs, output, name=name: seen.__setitem__(name, inputs[0].flatten(0, -2))))
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


heldout = load_split_tokens("heldout", None)  # effml-tiny's held-out split: stdlib files it never trained on
windows = spread_windows(heldout, calib_windows + eval_windows, eval_seq_len)
models = {"effml-tiny": (tiny, windows[:calib_windows], windows[calib_windows:])}  # name -> (model, calibration, evaluation)

smol = None
smol_file = smollm2_path()
if smol_file is None:
    print("SmolLM2-135M-Instruct's GGUF file has not been fetched. Fetch it once (98 MB) with\n"
          "    python -m effml_lib.checkpoints fetch\n"
          "(or `make models` in the repository), then run the notebook again. Until then, the cells that\n"
          "use SmolLM2 use effml-tiny instead.")
else:
    try:
        smol, smol_tokenizer = checkpoints.load_gguf(smol_file, device=device, max_seq_len=2048)
    except ImportError as e:  # the gguf or tokenizers package is missing
        print(f"{e}\nUntil then, the cells that use SmolLM2 use effml-tiny instead.")
if smol is not None:
    smol_ids = []
    for text in data.read_corpus("heldout"):  # the same held-out files, in SmolLM2's own tokens
        smol_ids += smol_tokenizer.encode(text, allow_special=False) + [smol_tokenizer.eos_id]
    smol_windows = spread_windows(torch.tensor(smol_ids), calib_windows + smol_eval_windows, smol_seq_len)
    models["SmolLM2-135M"] = (smol, smol_windows[:calib_windows], smol_windows[calib_windows:])
    print(f"{smol_file.name}: {smol.config.n_layers} layers of width {smol.config.dim} (feed-forward {smol.config.hidden_dim}), "
          f"{smol.num_parameters() / 1e6:.0f} M parameters, dequantized from the file's Q4_1 blocks to float32")
big_name = "SmolLM2-135M" if smol is not None else "effml-tiny"  # sections 5 and 6 use it
for name, (model, calib, evaluation) in models.items():
    print(f"{name}: held-out windows of tokens (count, length + 1): calibration {tuple(calib.shape)}, evaluation {tuple(evaluation.shape)}")

# %%
SITES = {"attention input (wq, wk, wv)": "attention.wq", "attention output (wo)": "attention.wo",
         "feed-forward input (w1, w3)": "feed_forward.w1", "down projection input (w2)": "feed_forward.w2"}
acts = {name: linear_inputs(model, calib[:, :-1]) for name, (model, calib, _) in models.items()}
rows = []
for model_name, inputs in acts.items():
    seq_len = models[model_name][1].shape[1] - 1
    for site, suffix in SITES.items():
        for layer in range(models[model_name][0].config.n_layers):
            x = inputs[f"layers.{layer}.{suffix}"].abs()  # (tokens, channels)
            channel_max = x.amax(0)                       # each channel's largest |x|
            top = channel_max.argmax().item()
            rows.append({"model": model_name, "site": site, "layer": layer, "top channel": top,
                         "largest / median channel": (channel_max[top] / channel_max.median()).item(),
                         "its tokens at ≥ half its max": (x[:, top] >= channel_max[top] / 2).float().mean().item(),
                         "position of its max": x[:, top].argmax().item() % seq_len})
outliers = pd.DataFrame(rows)


def most_common(channels):
    top = channels.mode()[0]
    return f"{top} ({(channels == top).sum()} of {len(channels)} layers)"


groups = outliers.groupby(["model", "site"], sort=False)
worst_layers = outliers.loc[groups["largest / median channel"].idxmax()].set_index(["model", "site"])
summary = pd.DataFrame({
    "largest / median, median over layers": groups["largest / median channel"].median(),
    "most frequent top channel": groups["top channel"].agg(most_common),
    "worst layer": worst_layers["layer"], "its top channel": worst_layers["top channel"],
    "its largest / median": worst_layers["largest / median channel"],
    "share of tokens at ≥ half that max": worst_layers["its tokens at ≥ half its max"],
    "token position of the max": worst_layers["position of its max"]})
summary.style.format({"largest / median, median over layers": "{:.1f}", "its largest / median": "{:.1f}",
                      "share of tokens at ≥ half that max": "{:.0%}"})

# %%
fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.4 * len(models)), squeeze=False)
for (ax_c, ax_t), (model_name, inputs) in zip(axes, acts.items()):
    seq_len = models[model_name][1].shape[1] - 1
    worst_attention = worst_layers.loc[(model_name, "attention input (wq, wk, wv)"), "layer"]
    worst_down = worst_layers.loc[(model_name, "down projection input (w2)"), "layer"]
    x = inputs[f"layers.{worst_attention}.attention.wq"].abs()
    channel_max = x.amax(0).cpu()
    ax_c.plot(channel_max, color=sns.color_palette()[0], lw=1)
    ax_c.axhline(channel_max.median(), color="0.4", ls=":", label="median channel")
    for c in channel_max.topk(3).indices.tolist():
        ax_c.annotate(str(c), (c, channel_max[c]), textcoords="offset points", xytext=(3, -3), fontsize=8)
    ax_c.set_yscale("log")
    ax_c.set_xlabel("channel")
    ax_c.set_ylabel("max |x| over tokens")
    ax_c.set_title(f"{model_name}, layer {worst_attention}, attention input: per channel", fontsize=10)
    ax_c.legend(fontsize=8, loc="lower right")
    x = inputs[f"layers.{worst_down}.feed_forward.w2"].abs()
    token_max = x.amax(1).cpu().view(-1, seq_len)  # (windows, tokens)
    for i, row in enumerate(token_max):
        ax_t.plot(row, lw=1, color=sns.color_palette()[1 + i], label=f"calibration window {i}")
    ax_t.set_yscale("log")
    ax_t.set_xlabel("token position in its window")
    ax_t.set_ylabel("max |x| over channels")
    ax_t.set_title(f"{model_name}, layer {worst_down}, down projection input: per token", fontsize=10)
    ax_t.legend(fontsize=8, loc="upper right")
    for ax in (ax_c, ax_t):
        low, high = ax.get_ylim()  # under two decades, one tick per decade is too few: ticks at 1, 2, 5 × 10^k
        ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1, 2, 5) if high / low < 100 else (1,)))
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
fig.suptitle("Where the largest activations are: each site's worst layer", fontweight="bold")
fig.tight_layout()
plt.show()

# %% [markdown]
# The table gives, for each model and each place a linear layer reads, how far the largest channel stands
# above the median one (each channel's largest |x| over the calibration tokens, the largest of those divided
# by their median), the channel that is most often the largest, and the worst layer in detail. The figure
# shows the worst layers: left, each channel's largest value entering attention; right, each token's largest
# value entering the down projection, for the two calibration windows.
#
# - **SmolLM2 has channel outliers.** Entering attention, the largest channel is 12.0× the median channel in
#   a typical layer and 23.2× in layer 12, and it is the same channel, 247, in 16 of the 30 layers. It is
#   large on almost every token: on 96% of them it reaches half of its maximum. That is LLM.int8()'s
#   phenomenon, a property of the channel (the residual stream and the RMSNorm weight feeding it), not of
#   the text.
# - **SmolLM2 also has massive activations at one token.** Entering layer 11's down projection one channel
#   reaches 3266.6× the median channel, at position 0, the first token of its window, and hardly any
#   other token comes within half of that (0% of them, rounded). In the right panel both windows spike at
#   position 0 and stay within 1 to 10 after it. These windows start in the middle of files, so it is the
#   position, not the token, that is special: the first token the model sees. Layer 29's feed-forward
#   input has one too (48.6×, at position 0).
# - **effml-tiny's outliers are mild.** Channel 355 is the largest entering attention in 7 of its 8 layers,
#   but only 3.9× the median channel (4.9× at worst), and no token stands out: its down projection's worst,
#   13.5×, is at position 52, one spike among many in the right panel. The course's small model has not
#   grown the extreme features of larger, longer-trained models.
#
# What this does to INT8 activations, layer by layer: with one scale per tensor, $s = \max|X| / 127$, how
# large a code the median channel reaches, and the relative output error of the layer when its input is
# rounded to INT8 per tensor or per token (one scale per row of X, as `quantize(x, 8)` does by default),
# medians over the layers:

# %%
rows = []
for model_name, inputs in acts.items():
    model = models[model_name][0]
    modules = dict(model.named_modules())
    for site, suffix in SITES.items():
        for layer in range(model.config.n_layers):
            name = f"layers.{layer}.{suffix}"
            x, weight = inputs[name], modules[name].weight
            y = x @ weight.T
            per_tensor_scale = x.abs().max() / 127
            row = {"model": model_name, "site": site,
                   "median channel's largest code": (x.abs().amax(0).median() / per_tensor_scale).item()}
            for kind, x_q in (("per tensor", dequantize(quantize(x, 8, per_tensor=True))),
                              ("per token", dequantize(quantize(x, 8)))):  # one scale per row: per token
                row[f"output error, INT8 {kind}"] = ((x_q @ weight.T - y).norm() / y.norm()).item()
            rows.append(row)
int8_errors = pd.DataFrame(rows).groupby(["model", "site"], sort=False).median()
print("medians over layers; output error = ‖Q(X) Wᵀ − X Wᵀ‖ / ‖X Wᵀ‖, the weight in full precision")
int8_errors.round(4)

# %% [markdown]
# With one scale per tensor, SmolLM2's median channel entering attention reaches only code 10.6 of 127 (the
# median over layers): about 21 of the 255 levels, a 4.4-bit quantizer for most channels, while the outlier
# channel gets the full 8 bits. effml-tiny's reaches 32.2. Per-token scales isolate the special tokens: the
# down projection's output error falls from 0.1119 to 0.0301 for SmolLM2 and from 0.1060 to 0.0257 for
# effml-tiny. They cannot isolate channel outliers, which are on every token: entering attention, SmolLM2's
# error only goes from 0.0363 to 0.0246.
#
# What does that do to the whole model? We **simulate** quantization inside it: `SimulatedLinear` wraps each
# block linear, rounds its input with `quantize`/`dequantize` when asked, divides it by per-channel scales
# when given some (sections 5 and 6), and computes with whatever weight we set (the layer's own, or a
# quantized and dequantized copy). Simulated ("fake") quantization computes in float32 what integer kernels
# would compute up to the order of accumulation: the tool for measuring quality, not speed. W8A8 here means
# weights INT8 per output channel and activations INT8 per tensor or per token, with scales taken from each
# batch as it comes (dynamic quantization).

# %%
class SimulatedLinear(nn.Module):
    """A block linear layer computing with simulated quantization: F.linear(A(x / s), weight), where
    s divides the input channels (SmoothQuant's or AWQ's scales: a real deployment folds 1/s into the
    layer before), A rounds activations to INT8 when `act` says so, and `weight` is whatever the
    section sets, usually a quantized and dequantized copy of W·diag(s). The original stays in `linear`."""

    def __init__(self, linear):
        super().__init__()
        self.linear, self.weight, self.s, self.act = linear, linear.weight.detach(), None, None

    def forward(self, x):
        if self.s is not None:
            x = x / self.s
        if self.act == "per tensor":
            x = dequantize(quantize(x, 8, per_tensor=True))
        elif self.act == "per token":
            x = dequantize(quantize(x, 8))
        return F.linear(x, self.weight, self.linear.bias)


def wrap(model):
    """Put each of model's block linears inside a SimulatedLinear, in place: {name: wrapper}."""
    wrappers = {}
    replace_linears(model, lambda name, linear: wrappers.setdefault(name, SimulatedLinear(linear)))
    return wrappers


def simulate(layers, act=None, scales=None, weight=None):
    """Set every wrapped layer: INT8 activations `act` (None, "per tensor" or "per token"), input divisors
    scales[name] (None: no scaling), and the weight it computes with, weight(name, W·diag(s)) (None: W·diag(s))."""
    for name, layer in layers.items():
        s = None if scales is None else scales[name]
        w_s = layer.linear.weight.detach() if s is None else layer.linear.weight.detach() * s
        layer.act, layer.s = act, s
        layer.weight = w_s if weight is None else weight(name, w_s)


def int8_weight(name, w):
    return dequantize(quantize(w, 8))  # INT8, symmetric, one scale per output channel: the W8 of W8A8


wrapped = {}  # name -> (the model that computes, its wrapped layers)
for name, (model, _, _) in models.items():
    if name == "effml-tiny":
        model = pretrained("effml-tiny").eval().to(device)  # a copy, so that `tiny` stays as shipped
    wrapped[name] = (model, wrap(model))
rows = []
for name, (model, layers) in tqdm(wrapped.items(), desc="models"):
    evaluation = models[name][2]
    row = {"model": name, "as loaded": heldout_loss(model, evaluation)}  # wrapped, nothing simulated yet
    for act in ("per tensor", "per token"):
        simulate(layers, act, None, int8_weight)
        row[f"W8A8, INT8 {act}"] = heldout_loss(model, evaluation)
    simulate(layers)  # back to the weights as loaded
    rows.append(row)
w8a8 = pd.DataFrame(rows).set_index("model")
AS_LOADED = {"effml-tiny": "effml-tiny's shipped weights", "SmolLM2-135M": "the file's Q4_1 weights, dequantized"}
print("held-out loss (nats per token); every block linear W8A8: weights INT8 per output channel, activations INT8")
print("as loaded: " + "; ".join(f"{name}, {AS_LOADED[name]}" for name in w8a8.index))
w8a8.round(3)

# %% [markdown]
# effml-tiny hardly notices: W8A8 with per-tensor activations costs it less than 0.02 nats (from 2.183).
# SmolLM2 loses about 0.8 nats (from 2.457, its file's Q4_1 weights dequantized, to about 3.3), and only about
# 0.03 with per-token activations. (The third decimal moves from CPU to CPU: matrix routines round
# differently, and a rounding that crosses half a step flips an INT8 code.) Per-token scales are one way out, but they are computed at run time for every row and
# applied to the matmul's output; SmoothQuant keeps one scale per tensor and removes the outliers instead.

# %% [markdown]
# ## 5 · SmoothQuant: move the range from activations to weights
#
# Xiao et al. (SmoothQuant, 2023) observed that activation outliers stay in fixed channels, and that a
# matmul lets one move them. For any positive $s_j$ per input channel,
#
# $$Y = X W^\top = \big(X \,\mathrm{diag}(s)^{-1}\big)\big(W \,\mathrm{diag}(s)\big)^\top ,$$
#
# so dividing channel $j$ of the activations by $s_j$ and multiplying column $j$ of the weight by it changes
# nothing in exact arithmetic, but changes what is hard to quantize. With
# $s_j = \max|X_j|^{\alpha} / \max|W_j|^{1-\alpha}$, the **migration strength** $\alpha$ sets how much range
# moves: $\alpha = 1$ flattens every activation channel to a maximum of 1 and puts all the range into the
# weights, $\alpha = 0$ flattens the weights' columns instead and leaves every outlier in the activations,
# and $\alpha = 0.5$ gives a channel the same maximum in both. $1/s$ is folded once, offline, into what comes
# before the layer (the RMSNorm's weight for $W_q, W_k, W_v$ and for $W_1, W_3$, which therefore share one $s$;
# $W_v$'s rows for $W_o$, where each value row feeds a single channel of $W_o$, which is not true under
# GQA; $W_3$'s rows for $W_2$), so it costs nothing at run time. The simulation below scales every layer's own
# input, so it shows what smoothing can buy, not a fold that every layer admits. The library's
# `smoothquant_scales`:

# %%
show_source(smoothquant_scales)

# %% [markdown]
# For each α of `alphas`, the cell below computes every layer's scales from its calibration activations
# (section 4), measures the output error of each site's worst layer, and evaluates the whole model with
# every block linear W8A8, activations INT8 per tensor. It uses SmolLM2, or effml-tiny without the file.

# %%
SHARE_INPUT = {"wq": ("wq", "wk", "wv"), "wk": ("wq", "wk", "wv"), "wv": ("wq", "wk", "wv"),
               "w1": ("w1", "w3"), "w3": ("w1", "w3"), "wo": ("wo",), "w2": ("w2",)}


def smoothing(layers, inputs, alpha):
    """SmoothQuant's scales for every layer. Layers that read one input share them (one 1/s folds into the
    RMSNorm before them), so a column's weight maximum is taken over all of them."""
    scales = {}
    for name in layers:
        parent, last = name.rsplit(".", 1)
        w_absmax = torch.stack([layers[f"{parent}.{k}"].linear.weight.abs().amax(0) for k in SHARE_INPUT[last]]).amax(0)
        scales[name] = smoothquant_scales(inputs[name].abs().amax(0), w_absmax, alpha)
    return scales


big, layers = wrapped[big_name]
big_eval, big_inputs = models[big_name][2], acts[big_name]
reference = w8a8.loc[big_name, "as loaded"]  # SmolLM2: the file's Q4_1 weights, dequantized
chosen = {site: f"layers.{worst_layers.loc[(big_name, site), 'layer']}.{suffix}" for site, suffix in SITES.items()}
layer_rows, loss_rows = [], []
for alpha in tqdm(alphas, desc="alpha"):
    scales = smoothing(layers, big_inputs, alpha)
    for site, name in chosen.items():  # each site's worst layer, on its calibration activations
        x, w, s = big_inputs[name], layers[name].linear.weight, scales[name]
        y = x @ w.T
        y_q = dequantize(quantize(x / s, 8, per_tensor=True)) @ dequantize(quantize(w * s, 8)).T
        layer_rows.append({"alpha": alpha, "layer": f"{name} ({site})", "output error": ((y_q - y).norm() / y.norm()).item()})
    simulate(layers, "per tensor", scales, int8_weight)
    loss_rows.append({"alpha": alpha, "held-out loss": heldout_loss(big, big_eval)})
simulate(layers)  # back to the weights as loaded
layer_errors, sq_losses = pd.DataFrame(layer_rows), pd.DataFrame(loss_rows).set_index("alpha")
best_alpha = sq_losses["held-out loss"].idxmin()
print(f"{big_name}, W8A8 with INT8 activations per tensor: as loaded ({AS_LOADED[big_name]}) {reference:.3f}, no smoothing "
      f"{w8a8.loc[big_name, 'W8A8, INT8 per tensor']:.3f}, best alpha {best_alpha:g}: {sq_losses.loc[best_alpha, 'held-out loss']:.3f} nats")
sq_losses.T.round(3)

# %%
fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(12.5, 4.4))
for (layer, part), color in zip(layer_errors.groupby("layer", sort=False), sns.color_palette()):
    ax_l.plot(part["alpha"], part["output error"], marker="o", color=color, label=layer)
ax_l.set_yscale("log")
ax_l.set_xlabel("migration strength α")
ax_l.set_ylabel("layer output error, relative (log scale)")
ax_l.set_title("Each site's worst layer, W8A8 per tensor", fontsize=11)
ax_l.legend(fontsize=7, loc="lower left")
ax_m.plot(sq_losses.index, sq_losses["held-out loss"], marker="o", color="black", label="SmoothQuant, INT8 per tensor")
for column, color, ls in zip(("W8A8, INT8 per tensor", "W8A8, INT8 per token"), sns.color_palette()[3:5], ("--", "-.")):
    ax_m.axhline(w8a8.loc[big_name, column], color=color, ls=ls, label=f"{column}, no smoothing")
ax_m.axhline(reference, color="0.4", ls=":", label=f"as loaded: {AS_LOADED[big_name]}")
ax_m.set_xlabel("migration strength α")
ax_m.set_ylabel("held-out loss (nats per token)")
ax_m.set_title("The whole model", fontsize=11)
ax_m.legend(fontsize=8)
fig.suptitle(f"SmoothQuant on {big_name}: activations ÷ s, weights × s, s = max|X|^α / max|W|^(1−α)", fontweight="bold")
fig.tight_layout()
plt.show()

# %% [markdown]
# Left: for each site's worst layer, the output error falls by roughly an order of magnitude as
# α grows from 0, is smallest at α = 0.75, and rises again at 1, where the weights' columns take the whole
# range and become the hard part. Right: the whole model follows. α = 0 is worse than no smoothing at all
# (about 5.5 against 3.3: it moves the weights' range into the activations), α = 0.5, the paper's default,
# recovers most of the loss (about 2.7), and α = 0.75 is the best of the sweep, about 2.56: 0.1 nats above the
# model as loaded (its Q4_1 weights, dequantized), where per-tensor W8A8 without smoothing was about 0.8 above it. The
# paper likewise finds that models with stronger outliers want a larger α. Per-token INT8 without smoothing
# (about 2.49) is still better here: SmolLM2's massive activations sit at one token, and a scale per channel can
# only shrink that channel on every token alike. (On effml-tiny, without the SmolLM2 file, smoothing leaves
# W8A8 slightly worse than no smoothing: there is little range to move, and moving it costs the weights.)

# %% [markdown]
# ## 6 · AWQ: protect the salient channels
#
# Weight-only quantization (W4A16, W3A16) keeps the activations in 16 bits, so their outliers do no harm
# directly, but they decide which weights matter. A weight column that multiplies a large input channel
# contributes a large part of the output, and its rounding error is multiplied by that channel's size. Lin et
# al. (AWQ, 2023) showed that keeping just **1% of the input channels** in fp16, chosen by the size of their
# activations, recovers much of what 3-bit round-to-nearest loses, while choosing them by the size of their
# weights, or at random, does not. Mixed precision is awkward for kernels, so AWQ protects those channels
# another way: it scales weight column $j$ up by $s_j$ and the input down by it, so that the salient columns
# get a finer share of their group's grid, with $s = \overline{|X|}^{\,a}$ and the exponent $a \in [0, 1)$
# searched for the smallest output error on calibration activations. The $1/s$ must be folded into whatever
# produces the input, so layers that read one input share one $s$, searched once on their weights stacked:
#
# - $W_q, W_k, W_v$ read the attention RMSNorm's output, and $W_1, W_3$ the feed-forward RMSNorm's: their
#   group's $1/s$ folds into that RMSNorm's weight;
# - $W_2$ reads $\mathrm{silu}(W_1 x) \odot W_3 x$: its $1/s$ folds into $W_3$'s rows, and scaling a whole
#   row scales its groups' grids with it, so $W_3$'s codes do not change; we simulate the fold by scaling
#   $W_2$'s input;
# - $W_o$ reads the attention's output, whose channels are $W_v$'s rows mixed by the attention weights; under
#   GQA (SmolLM2 has 3 KV heads for 9 query heads) one such row feeds several of $W_o$'s columns, so no
#   $1/s$ per column folds into it, and we leave $W_o$ unscaled (AWQ's own code folds it only without GQA).
#
# The library's `awq_scales`, which searches one $s$ for the weight it is given:

# %%
show_source(awq_scales)

# %% [markdown]
# Every block linear at `awq_bits` = 3 bits, asymmetric, round to nearest, in groups of 64 for SmolLM2 (the
# largest power of two that divides its width, 576; 128 for effml-tiny); then 1% of each layer's input
# channels kept as they were, picked three ways; then AWQ's scales instead, with `awq_grid` = 10 exponents
# tried per group of layers (wq/wk/wv, w1/w3, w2; wo unscaled) on `awq_tokens` = 128 calibration tokens.

# %%
group = next(g for g in (128, 64, 32) if all(layer.linear.in_features % g == 0 for layer in layers.values()))
generator = torch.Generator().manual_seed(0)


def round_to_nearest(w):
    return dequantize(quantize(w, awq_bits, group, symmetric=False))


def keep_in_fp16(pick):
    """A weight(name, w) for simulate: round to nearest, but the columns pick(name, w) chooses stay as they were."""
    def weight(name, w):
        w_q, columns = round_to_nearest(w), pick(name, w)
        w_q[:, columns] = w[:, columns]
        return w_q
    return weight


def n_salient(w):
    return max(1, round(salient_fraction * w.shape[1]))


PICKS = {"by activation (mean |x|)": lambda name, w: big_inputs[name].abs().mean(0).topk(n_salient(w)).indices,
         "by weight (mean |w| of the column)": lambda name, w: w.abs().mean(0).topk(n_salient(w)).indices,
         "at random": lambda name, w: torch.randperm(w.shape[1], generator=generator)[: n_salient(w)].to(w.device)}
awq_losses = {"as loaded": reference}
simulate(layers, weight=lambda name, w: round_to_nearest(w))
awq_losses[f"W{awq_bits} g{group}, round to nearest"] = heldout_loss(big, big_eval)
for how, pick in PICKS.items():
    simulate(layers, weight=keep_in_fp16(pick))
    awq_losses[f"+ {salient_fraction:.0%} of input channels in fp16, {how}"] = heldout_loss(big, big_eval)
AWQ_GROUPS = {"attention": (("wq", "wk", "wv"),),  # layers that read one input, which get one s; wo: none
              "feed_forward": (("w1", "w3"), ("w2",))}
awq = {}
for layer in tqdm(range(big.config.n_layers), desc="awq_scales"):
    for module, groups in AWQ_GROUPS.items():
        for members in groups:
            names = [f"layers.{layer}.{module}.{m}" for m in members]
            x = big_inputs[names[0]]  # the input they share
            s = awq_scales(torch.cat([layers[n].linear.weight for n in names]),  # (their outputs together, in)
                           x[:: max(1, x.shape[0] // awq_tokens)][:awq_tokens], awq_bits, group, grid=awq_grid)
            awq.update({n: s for n in names})
    awq[f"layers.{layer}.attention.wo"] = None  # left unscaled: no 1/s folds into its input under GQA
shared = all(awq[f"layers.{i}.attention.wq"] is awq[f"layers.{i}.attention.wk"] is awq[f"layers.{i}.attention.wv"]
             and awq[f"layers.{i}.feed_forward.w1"] is awq[f"layers.{i}.feed_forward.w3"] for i in range(big.config.n_layers))
print(f"{big_name} ({big.config.n_heads} query heads, {big.config.n_kv_heads} KV heads): "
      f"{sum(len(g) for g in AWQ_GROUPS.values()) * big.config.n_layers} searches for {len(layers)} layers; "
      f"one s for wq, wk and wv and one for w1 and w3 in every block: {shared}; wo unscaled")
simulate(layers, scales=awq, weight=lambda name, w: round_to_nearest(w))
awq_losses["+ AWQ scales (nothing kept in fp16)"] = heldout_loss(big, big_eval)
simulate(layers)
awq_table = pd.Series(awq_losses, name="held-out loss (nats)").to_frame()
awq_table["vs as loaded"] = awq_table.iloc[:, 0] - reference
awq_table.round(3)

# %%
fig, ax = plt.subplots(figsize=(9, 3.6))
names = list(awq_losses)[1:]
colors = [sns.color_palette()[3]] + [sns.color_palette()[0]] * len(PICKS) + [sns.color_palette()[2]]
y = np.arange(len(names))
ax.hlines(y, reference, [awq_losses[n] for n in names], colors=colors, lw=3)  # each line: the damage over the model as loaded
ax.scatter([awq_losses[n] for n in names], y, color=colors, s=50, zorder=3)
ax.axvline(reference, color="0.3", ls=":", label=f"as loaded ({AS_LOADED[big_name]}): {reference:.3f}")
for i, n in enumerate(names):
    ax.text(awq_losses[n], i, f"  {awq_losses[n]:.3f}", va="center", fontsize=9)
ax.set_yticks(y, names)
ax.invert_yaxis()
worst_loss = max(awq_losses.values())
ax.set_xlim(reference - 0.05 * (worst_loss - reference), worst_loss + 0.15 * (worst_loss - reference))
ax.set_xlabel("held-out loss (nats per token)")
ax.set_title(f"{big_name}, weights at {awq_bits} bits in groups of {group}: what protecting 1% buys", fontsize=11)
ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.25), frameon=False)
plt.show()

# %% [markdown]
# Each line runs from the loss as loaded (SmolLM2's Q4_1 weights, dequantized) to a variant's:
# the damage it does. Round-to-nearest at 3 bits costs SmolLM2 1.508 nats more. Keeping 1% of the input
# channels in fp16 (6 of 576, or 15 of 1536) almost halves that (+0.808) when they are the channels with the
# largest mean |x|, barely helps when they are the columns with the largest weights (+1.410), and does nothing
# at random (+1.516): the weights that matter are the ones that meet large activations. AWQ's scaling gets
# most of the way there (+0.910) with every weight at 3 bits, no fp16 columns, and scales that fold away (one
# per RMSNorm, one into each $W_3$; $W_o$ unscaled). Our search is the simple one (10 exponents per group, 128
# tokens, the error at the group's own outputs); the paper measures it at the output of the whole attention or
# feed-forward and also clips the weights' range. At 3 bits even AWQ leaves SmolLM2 far from where it started,
# which is why 4 bits is the usual deployment. (effml-tiny, with its mild outliers, gains little or nothing
# from either; run the notebook without the SmolLM2 file to see.)

# %% [markdown]
# ## 7 · The effml-tiny quality ladder
#
# Now the whole course model in each format, with the layers a deployment uses: `quantize_model` swaps every
# block linear for a `QuantLinear` (W8: symmetric INT8 per channel; W4: asymmetric codes packed two per byte
# with a float16 scale and a uint8 zero point per group), and the bytes are what those layers hold.
# `QuantLinear` stores 4 and 8 bits only, so W3 (3-bit codes in groups of 128) and a 3-bit k-means codebook
# per tensor are simulated, their bytes counted as a packed format would store them. Every rung is evaluated
# on the same held-out windows; perplexity is $e^{\text{loss}}$.

# %%
def block_linear_bytes(model):
    """Bytes of the block weights as QuantLinear stores them: codes, scales and zero points."""
    return sum(m.weight_bytes for m in model.modules() if isinstance(m, QuantLinear))


tiny_eval = models["effml-tiny"][2]
n_groups128 = sum(w.numel() // 128 for w in tiny_weights.values())
ladder = [{"format": "fp16 (as shipped)", "bytes": 2 * n_weights, "loss": w8a8.loc["effml-tiny", "as loaded"]}]
for bits, group_size, label in tqdm([(8, None, "W8 per channel"), (4, 128, "W4 g128"), (4, 32, "W4 g32")], desc="QuantLinear"):
    quantized = quantize_model(pretrained("effml-tiny").eval().to(device), bits, group_size)
    ladder.append({"format": label, "bytes": block_linear_bytes(quantized), "loss": heldout_loss(quantized, tiny_eval)})
tiny_sim, tiny_layers = wrapped["effml-tiny"]  # section 4's wrapped copy
simulate(tiny_layers, weight=lambda name, w: dequantize(quantize(w, 3, 128, symmetric=False)))
ladder.append({"format": "W3 g128 (simulated)", "bytes": n_weights * 3 / 8 + n_groups128 * 3,  # 3-bit codes, fp16 scale + uint8 zero
               "loss": heldout_loss(tiny_sim, tiny_eval)})
codebooks = {name: kmeans_quantize(w, kmeans_bits) for name, w in tqdm(tiny_weights.items(), desc="k-means")}
simulate(tiny_layers, weight=lambda name, w: codebooks[name][1][codebooks[name][0].long()])
ladder.append({"format": f"k-means {kmeans_bits} bits (simulated)",
               "bytes": n_weights * kmeans_bits / 8 + len(codebooks) * 2**kmeans_bits * 2,  # indices + fp16 codebooks
               "loss": heldout_loss(tiny_sim, tiny_eval)})
simulate(tiny_layers)
ladder = pd.DataFrame(ladder).set_index("format")
ladder["bits per weight"] = 8 * ladder["bytes"] / n_weights
ladder["perplexity"] = np.exp(ladder["loss"])
ladder["Δ loss"] = ladder["loss"] - ladder["loss"].iloc[0]
print(f"effml-tiny, {tuple(tiny_eval.shape)} held-out windows; bytes of the {len(tiny_weights)} block weights")
ladder.style.format({"bytes": human_bytes, "bits per weight": "{:.2f}", "loss": "{:.3f}", "perplexity": "{:.3f}", "Δ loss": "{:+.3f}"})

# %%
fig, ax = plt.subplots(figsize=(8.5, 4.4))
placed = {"W3 g128 (simulated)": (8, -24, "left"), "W4 g128": (-8, 6, "right"),  # label offsets (points) and alignment
          "fp16 (as shipped)": (-8, -24, "right")}                                 # the rest: above, to the right
for (name, r), color in zip(ladder.iterrows(), sns.color_palette("colorblind", len(ladder))):
    ax.scatter(r["bytes"] / MiB, r["perplexity"], s=60, color=color, zorder=3)
    dx, dy, ha = placed.get(name, (8, 6, "left"))
    ax.annotate(f"{name}\n{r['bits per weight']:.2f} bits, ppl {r['perplexity']:.2f}", (r["bytes"] / MiB, r["perplexity"]),
                textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8)
span = ladder["perplexity"].max() - ladder["perplexity"].min()
ax.set_ylim(ladder["perplexity"].min() - 0.15 * span, ladder["perplexity"].max() + 0.15 * span)
ax.set_xlim(0, ladder["bytes"].max() / MiB * 1.3)
ax.set_xlabel("bytes of effml-tiny's block weights (MiB)")
ax.set_ylabel("held-out perplexity (e^loss)")
ax.set_title("effml-tiny: quality against the bytes its weights take", fontsize=11)
plt.show()

# %% [markdown]
# W8 is free: half the bytes, and the loss is unchanged to the third decimal. W4 g128 takes a quarter of
# fp16's bytes (4.19 bits per weight) for +0.022 nats, perplexity 8.877 to 9.071; groups of 32 cost 0.95 MiB
# more and buy back only 0.004 nats (+0.018). Below 4 bits the curve turns up: W3 g128 saves another 1.69 MiB
# for +0.093, and a 3-bit codebook per tensor does worse (+0.145), although in section 3 a codebook fitted a
# tensor's weights better than 3-bit groups of 128: per-group scales follow each row's range and one codebook
# cannot, and it is the loss, not the weights' squared error, that counts. This is the knee quantization
# papers find on large models too: 8 bits are lossless, 4 bits with groups cost a little, and 3 bits and below
# need activation-aware methods such as section 6's, or training, to be usable.

# %% [markdown]
# ## 8 · A GGUF Q4_1 block, decoded by hand
#
# llama.cpp's GGUF files store most tensors in **blocks of 32 weights**, each block with its own scale in
# front of its codes. SmolLM2's file stores its block weights as **Q4_1**, 20 bytes per block:
#
# | bytes | field | meaning |
# |---|---|---|
# | 0–1 | `d` | the scale, float16, little-endian |
# | 2–3 | `m` | the block's minimum, float16 |
# | 4–19 | `qs` | 32 unsigned 4-bit codes: byte $j$ holds weight $j$ in its low nibble and weight $j + 16$ in its high nibble |
#
# and weight $i$ is $w_i = d\,q_i + m$: asymmetric 4-bit quantization in groups of 32, with the zero point
# stored as a float, $m = -d\,z$, rather than as an integer code; 5 bits per weight. The nibble order is not
# `pack_int4`'s, which puts neighbours $2i$ and $2i+1$ in one byte: llama.cpp's lets a SIMD kernel turn the
# 16 low nibbles into weights 0–15 with one mask and the 16 high nibbles into weights 16–31 with one shift.
#
# We read one block's 20 bytes with `gguf.GGUFReader`, llama.cpp's own reader of the format (it finds the
# bytes; the arithmetic is ours): the first block of row 0 of layer 0's value projection,
# `blk.0.attn_v.weight`, whose rows llama.cpp's converter leaves in Hugging Face's order (it reorders those of
# `attn_q` and `attn_k` for its RoPE, which `load_gguf` undoes).

# %%
try:
    import gguf  # llama.cpp's reader of the file format (the layout; the numbers below are ours)
except ImportError:
    gguf = None
if smol_file is not None and gguf is not None:
    reader = gguf.GGUFReader(smol_file)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    print(f"{smol_file.name}: tensor {tensor.name}, type {tensor.tensor_type.name}, "
          f"{tensor.shape.tolist()[::-1]} (rows, inputs), {tensor.n_bytes:,} bytes at offset {tensor.data_offset:,}")
    block = np.asarray(tensor.data)[0, :20].copy()  # row 0's first block: that row's weights 0..31
    source = "SmolLM2's file"
else:
    # No file here: make one Q4_1 block from effml-tiny's weights, as llama.cpp's quantizer does:
    # d = (max - min) / 15, m = min, code = round((w - m) / d), codes j and j + 16 in byte j.
    w32 = tiny.layers[0].attention.wv.weight[0, :32].cpu().numpy()
    d16, m16 = np.float16((w32.max() - w32.min()) / 15), np.float16(w32.min())
    q = np.clip(np.round((w32 - m16) / d16), 0, 15).astype(np.uint8)
    block = np.concatenate([np.array([d16, m16]).view(np.uint8), q[:16] | (q[16:] << 4)])
    source = "a block made from effml-tiny's layers.0.attention.wv (no SmolLM2 file here)"
print(f"the 20 bytes of one block ({source}):")
print("  d:", block[0:2].tobytes().hex(" "), "  m:", block[2:4].tobytes().hex(" "), "  codes:", block[4:].tobytes().hex(" "))

# %%
def half_from_bytes(label, low, high):
    """A float16 from its two little-endian bytes, by its bit fields (normal numbers)."""
    bits16 = int(low) | int(high) << 8
    sign, exponent, fraction = bits16 >> 15, (bits16 >> 10) & 0x1F, bits16 & 0x3FF
    assert 0 < exponent < 31, "a subnormal, infinite or NaN float16: not a scale"
    print(f"{label}: bytes {low:02x} {high:02x} -> 0x{bits16:04x} = sign {sign}, exponent {exponent:2d}, fraction {fraction:4d} -> "
          f"(-1)^{sign} × 2^({exponent} - 15) × (1 + {fraction}/1024) = {(-1) ** sign * 2.0 ** (exponent - 15) * (1 + fraction / 1024):.8f}")
    return (-1) ** sign * 2.0 ** (exponent - 15) * (1 + fraction / 1024)


d, m = half_from_bytes("d", block[0], block[1]), half_from_bytes("m", block[2], block[3])
assert d == float(block[0:2].view(np.float16)[0]) and m == float(block[2:4].view(np.float16)[0])  # numpy agrees
byte0, byte1 = int(block[4]), int(block[5])
hand = {}
for weight, byte, nibble in ((0, byte0, "low"), (16, byte0, "high"), (1, byte1, "low")):
    code = byte & 0x0F if nibble == "low" else byte >> 4
    hand[weight] = d * code + m
    print(f"weight {weight:2d}: code byte {weight % 16} ({byte:#04x}), {nibble} nibble = {code:2d};  "
          f"d × {code:2d} + m = {d:.6f} × {code:2d} + ({m:.6f}) = {hand[weight]: .6f}")

# %%
decoded = checkpoints.dequantize_q4_1(torch.from_numpy(block))  # the library's decoder: (32,) float32
for weight, value in hand.items():
    print(f"weight {weight:2d}: by hand {value: .6f}, dequantize_q4_1 {decoded[weight].item(): .6f}")
print(f"largest difference over the three: {max(abs(v - decoded[i].item()) for i, v in hand.items()):.1e}")
if source == "SmolLM2's file":
    print(f"the loaded model's weight row 0, inputs 0..31, equals the decoded block: "
          f"{torch.equal(smol.layers[0].attention.wv.weight[0, :32].cpu(), decoded)}")
codes = torch.round((decoded - m) / d).to(torch.uint8)  # the block's 32 codes, read back from its weights
print("first 4 code bytes in the file:      ", block[4:8].tobytes().hex(" "), "  (byte j: weight j low, weight j + 16 high)")
print("the same codes packed by pack_int4:  ", pack_int4(codes)[:4].numpy().tobytes().hex(" "), "  (byte i: weight 2i low, weight 2i + 1 high)")

# %% [markdown]
# Little-endian means the low byte comes first: the bytes `af 22` are the float16 0x22af, whose 5-bit
# exponent 8 and 10-bit fraction 687 give d = 2^(8 − 15) × (1 + 687/1024) = 0.01305389; the same reading of
# `c8 ad` gives m = −0.09033203. Code byte 0, 0xbf, holds weight 0 in its low nibble (15) and weight 16 in its
# high nibble (11). By hand, weight 0 is 0.013054 × 15 − 0.090332 = 0.105476, and the library's
# `dequantize_q4_1` gives the same three values; the model that `load_gguf` built holds exactly these 32
# weights in row 0 of `layers.0.attention.wv`. The last two lines show why the layout matters: the same 32
# codes packed by `pack_int4` make other bytes (`df 90 99 26` against the file's `bf 7d 60 99`), and a loader
# that read them in the wrong order would raise no error, only load a model that computes nonsense. (Without
# the SmolLM2 file, the block above is made from effml-tiny's weights in the same layout, with other numbers.)

# %% [markdown]
# Q4_1 is the asymmetric 4-bit scheme of section 2 with groups of 32, except that its zero point is the
# float16 `m` rather than a whole number of steps. `QuantLinear`'s offset form stores exactly that
# (`w = code * scale + offset`), so `load_gguf(path, quantized=True)` can keep each block's linear layers at
# the file's 4 bits, holding the file's own codes and scales, and compute with the very weights the float
# load holds:

# %%
if smol is not None:
    kept, _ = checkpoints.load_gguf(smol_file, device=device, max_seq_len=2048, quantized=True)
    kept_linears = {name: m for name, m in kept.named_modules() if isinstance(m, QuantLinear)}
    dense_modules = dict(smol.named_modules())
    same = all(torch.equal(m.dequantized_weight().to(device), dense_modules[name].weight) for name, m in kept_linears.items())
    kept_bytes = sum(m.weight_bytes for m in kept_linears.values())
    n_weights = sum(m.in_features * m.out_features for m in kept_linears.values())
    with torch.no_grad():
        window = smol_windows[-1][None, :128].to(device)
        logit_diff = (kept(window) - smol(window)).abs().max().item()
    print(f"{len(kept_linears)} block linears kept as QuantLinear (4 bits, groups of 32, float16 offsets): "
          f"{kept_bytes / 2**20:.1f} MiB, {8 * kept_bytes / n_weights:.2f} bits per weight, against "
          f"{2 * n_weights / 2**20:.1f} MiB in float16")
    print(f"every weight equal to the float load's: {same}; largest |logit difference| on 128 tokens: {logit_diff:.1e}")
    del kept, kept_linears
else:
    print("without SmolLM2's file there is no Q4_1 model to keep (see section 4 for how to fetch it)")

# %% [markdown]
# Five bits per weight, not four: each group of 32 codes (16 bytes) carries 4 bytes of scale and offset, the
# 20 bytes of a Q4_1 block. On a GPU the kept model runs through the Triton kernel of section 9, which adds
# the offset where the zero-point form subtracts zero × scale.

# %% [markdown]
# ## 9 · Speed and memory of W8A16 and W4A16 on your device
#
# Quantized weights take fewer bytes; whether they take less time depends on the kernel. We time one
# projection of Llama-2-7B's size (`speed_in` × `speed_out`, 4096 × 4096) as an `nn.Linear` in float32 and
# float16 and as a `QuantLinear` W8 and W4 g128, for one token (a decode step) and for 16, beside the time it
# takes to read the weight's bytes once at this device's copy bandwidth (`measure.copy_bandwidth`), and the
# peak extra memory of one call (`measure.peak_memory`). On a CPU, `QuantLinear` runs its PyTorch reference,
# which dequantizes the whole weight and then calls one matmul; on CUDA with Triton it runs the library's
# kernel, which dequantizes tiles of the weight on their way into the multiply.

# %%
act_dtype = torch.float16 if device.type == "cuda" else torch.float32  # QuantLinear's input
linear = nn.Linear(speed_in, speed_out, bias=False).to(device)
layers_timed = {  # name -> (module, the dtype of its input); every name distinct on CPU and CUDA alike
    "nn.Linear, float32": (copy.deepcopy(linear).float(), torch.float32),
    "nn.Linear, float16": (copy.deepcopy(linear).half(), torch.float16),
    "QuantLinear W8 (per channel)": (QuantLinear.from_linear(linear, 8, None), act_dtype),
    "QuantLinear W4 g128": (QuantLinear.from_linear(linear, 4, 128), act_dtype),
}
bandwidth = copy_bandwidth(device)
rows = []
for (name, (module, dtype)), tokens in tqdm([(v, t) for t in speed_tokens for v in layers_timed.items()], desc="layers"):
    x = torch.randn(tokens, speed_in, device=device).to(dtype)
    weight_bytes = module.weight_bytes if isinstance(module, QuantLinear) else module.weight.numel() * module.weight.element_size()
    timing = benchmark(module, x, warmup=1, reps=speed_reps)
    _, peak = peak_memory(module, x)
    rows.append({"tokens": tokens, "layer": name, "input": str(dtype).removeprefix("torch."), "weight bytes": weight_bytes,
                 "time (ms)": timing.min_s * 1e3, "bytes ÷ copy bandwidth (ms)": weight_bytes / bandwidth * 1e3,
                 "peak extra memory": peak})
speed = pd.DataFrame(rows).set_index(["tokens", "layer"])
assert len(speed) == len(speed_tokens) * len(layers_timed)  # one row per layer and token count
print(f"measured on {describe(device)}, torch {info['torch']}, {torch.get_num_threads()} thread(s): a {speed_in} → {speed_out} layer; "
      f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; QuantLinear runs {'its Triton kernel' if device.type == 'cuda' else 'the PyTorch reference'}")
speed.style.format({"weight bytes": human_bytes, "peak extra memory": human_bytes, "time (ms)": "{:.2f}",
                    "bytes ÷ copy bandwidth (ms)": "{:.2f}"})

# %%
fig, ax = plt.subplots(figsize=(9, 4))
one = speed.xs(min(speed_tokens), level="tokens")
y = np.arange(len(one))
ax.barh(y + 0.2, one["time (ms)"], height=0.4, color=sns.color_palette()[0], label="measured")
ax.barh(y - 0.2, one["bytes ÷ copy bandwidth (ms)"], height=0.4, color="0.7", label="weight bytes ÷ copy bandwidth")
ax.set_yticks(y, [f"{n} ({human_bytes(b)})" for n, b in zip(one.index, one["weight bytes"])])
ax.invert_yaxis()
ax.set_xscale("log")
ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
ax.set_xlabel("time per call (ms, log scale)")
ax.set_title(f"{speed_in} → {speed_out} layer, {min(speed_tokens)} token per call, on {describe(device)}", fontsize=11)
ax.legend(fontsize=9, loc="upper right")
plt.show()
time_ms = speed["time (ms)"]
f32_bound = speed.loc[(1, "nn.Linear, float32"), "bytes ÷ copy bandwidth (ms)"]
print(f"1 token: float32 nn.Linear takes {time_ms[(1, 'nn.Linear, float32')] / f32_bound:.2f}x its bytes' time at copy speed; "
      f"float16 / float32 time: {time_ms[(1, 'nn.Linear, float16')] / time_ms[(1, 'nn.Linear, float32')]:.2f} at 1 token, "
      f"{time_ms[(16, 'nn.Linear, float16')] / time_ms[(16, 'nn.Linear, float32')]:.2f} at 16; "
      f"QuantLinear W4 g128 / float32 nn.Linear: {time_ms[(1, 'QuantLinear W4 g128')] / time_ms[(1, 'nn.Linear, float32')]:.0f}x")

# %% [markdown]
# The figure compares, at one token, each layer's time (blue) with the time its weight's bytes take at copy
# speed (grey). In the committed run (a CPU) float32's `nn.Linear` takes about as long as reading its weight
# (the first ratio printed above): a decode step is bound by bytes, as section 1 assumed. Whether float16's
# half-size weight halves the time depends on the CPU and the shape: a CPU without fast float16 arithmetic
# converts as it goes, and its matrix routines differ by shape. The float16/float32 ratios printed above say
# what this CPU does at 1 and 16 tokens: 0.5 would be the bytes' saving, below it float16 gains more than its
# bytes, above 1 it is slower than float32 (the committed run's and yours may differ). The reference
# `QuantLinear` is many times slower than either, although its weight is 4× (W8) or 7.6× (W4 g128) smaller
# than float32's. Its peak extra memory says why: each call materialises the dequantized weight and its
# intermediates (128 MiB for W8, 192 MiB for W4, more than the 64 MiB float32 weight), so it writes and reads
# more bytes than `nn.Linear` does, on top of the unpacking. Timings vary from run to run; the ratios are the
# point.
#
# Saved bytes become saved time only when dequantizing happens inside the matmul, on values already in
# registers, so that the codes and scales are all that is read from memory: that is what the Triton kernel
# behind `QuantLinear` does on a GPU. llama.cpp's CPU kernels go one step further with Q4_1: they quantize the
# activations to Q8_1 blocks (int8 codes, a scale per 32) and take integer dot products with the 4-bit codes,
# applying d, m and the activations' scales once per block.

# %% [markdown]
# ## On an NVIDIA H200 (precomputed)
#
# `python bench/quant.py --parts gemv,batch` ran on an H200 (results shipped with the package). It times each
# linear layer of Llama-2-7B at one token with random weights four ways: bf16 (cuBLAS), our Triton kernels for
# W8 (per channel) and W4 (groups of 128), and PyTorch's own int4 kernel (`torch._weight_int4pack_mm`,
# "tinygemm", the int4 path of gpt-fast) on the same codes. Each call reads its weight from memory, not from the
# L2 cache, and the bandwidth column counts the bytes the layer stores (codes, scales, zero points) against a
# device-to-device copy in the same run. The last two layers are a block's q/k/v and gate/up projections, each
# set stacked into one matrix (`fuse_projections`, below).

# %%
kernels = load_result(H200, "quant")  # the library's kernels as they are now: layers, then batch sizes
kernels_env, kernels = kernels["env"], kernels["results"]
print(f"precomputed on an {kernels_env['device_name']} at {kernels_env['timestamp_utc']} (UTC), torch "
      f"{kernels_env['torch']}, triton {kernels_env['triton']}; copy bandwidth "
      f"{kernels['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
layer_rows = [{"layer": layer, "weights": name, "time (us)": round(r["ms"] * 1e3, 1),
               "of copy bandwidth": f"{100 * r['fraction_of_copy_bandwidth']:.0f}%",
               "speedup vs bf16": round(r["speedup_vs_bf16"], 2)}
              for layer, row in kernels["gemv"].items() for name, r in row.items()]
pd.DataFrame(layer_rows).set_index(["layer", "weights"])

# %% [markdown]
# Our W8 kernel reads these layers at 58-89% of the copy bandwidth, not far below bf16's cuBLAS (63-92%), and
# so runs 1.74-1.93× faster than bf16. Our W4 kernel reads a quarter of bf16's bytes but reaches only 40-69% of
# the copy bandwidth, so it is 2.44-2.86× faster than bf16, not 4×. It is still 1.3-1.6× faster than tinygemm
# on every layer. Where a layer takes longer than its bytes need, the kernel, not the memory, is the limit.
# Larger layers come closer to the bandwidth: the stacked gate/up layer takes 16.1 µs at W4, where each of its
# two halves alone takes 9.7 µs.
#
# The same call followed the 4096 → 11008 layer as the batch grows:

# %%
batch = pd.DataFrame(kernels["batch"]["ms"]).melt(id_vars="batch", var_name="weights", value_name="ms")
batch["time (us)"] = batch["ms"] * 1e3
fig, ax = plt.subplots(figsize=(6.5, 3.8))
sns.lineplot(data=batch, x="batch", y="time (us)", hue="weights", marker="o", ax=ax)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xticks(sorted(batch["batch"].unique()))
ax.xaxis.set_major_formatter(mticker.ScalarFormatter())
ax.set_yticks([10, 20, 50, 100, 200, 500, 1000])
ax.yaxis.set_major_formatter(mticker.ScalarFormatter())
ax.yaxis.set_minor_formatter(mticker.NullFormatter())
ax.set_xlabel("tokens per call (batch size)")
ax.set_ylabel("time per call (µs, log scale)")
ax.set_title(f"Llama-2-7B w1 layer (4096 → 11008), {kernels_env['device_name']} (precomputed)", fontsize=11)
fig.tight_layout()
plt.show()
print("first batch size at which bf16 is as fast or faster:", kernels["batch"]["crossover_batch"])

# %% [markdown]
# The plot shows time per call against the number of tokens: bf16's matrix multiply costs about the same from 1
# to 128 tokens, because reading the weight is all it waits for; every weight-only kernel does its
# dequantization once per tile of tokens, so its time grows with the batch. Our kernels serve up to 8 tokens
# with the GEMV, which reads the weight once per token (the rise up to 8), and more with the tiled GEMM; they
# lose to bf16 from 4 tokens on (the crossover printed above), tinygemm from 8. Weight-only quantization pays
# off at decode's small batches; serving many sequences at once needs a GEMM that dequantizes once for a large
# tile of tokens, as Marlin does.
#
# Whole decode steps, compiled with CUDA graphs (`generate(..., compile=True)`), on the Llama-2-7B shape, in
# another call (`python bench/quant.py --parts decode --profile`). Each of our quantized decoders ran twice: as
# `quantize_model` leaves the model, seven GEMVs a block; and "fused", after `fuse_projections(model)` has
# stacked each block's q/k/v and gate/up weights into one layer each, four GEMVs a block. Quantizing a stacked
# layer gives row for row the same codes and scales, so the same weights. tinygemm ran in the fused model,
# swapped in the same way (its unfused decoder did not finish within the call):

# %%
decode_h200 = load_result(H200, "quant_decode")
print(f"precomputed at {decode_h200['env']['timestamp_utc']} (UTC), copy bandwidth "
      f"{decode_h200['results']['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
decoders = decode_h200["results"]["decode"]["decoders"]
bf16_rate = decoders["bf16"]["tokens_per_s"]
decode_rows = [{"weights": name, "tokens/s": round(r["tokens_per_s"], 1), "GB read per token": round(r["bytes_per_token"] / 1e9, 2),
                "of copy bandwidth": f"{100 * r['fraction_of_copy_bandwidth']:.0f}%",
                "kernels per token": round(r["profile"]["kernel_calls_per_token"]),
                "speedup vs bf16": round(r["tokens_per_s"] / bf16_rate, 2)}
               for name, r in decoders.items()]
pd.DataFrame(decode_rows).set_index("weights")

# %% [markdown]
# Fusing the projections is worth 16% at W4 (424.1 → 491.4 tokens/s) and 19% at W8 (330.2 → 391.4), with the
# same weights: fewer, larger kernels. Our fused W4 decode is 2.11× bf16's while reading 28% of its bytes, our
# fused W8 decode 1.68× at 51%; tinygemm in the same fused model reaches 370.6 tokens/s (1.59×). So reading
# 4× fewer bytes does not make a step 4× faster. Part of that is the kernels, which turn bytes into weights
# slower than memory delivers them at 4 bits. The other part is everything else a step runs. The same call
# profiled each decoder, to show where the GPU's time goes (kernel time per token, the difference of a 64- and
# a 1-token run, so that the prompt's cost cancels):

# %%
PART_OF_STEP = ("quantized matrix-vector products", "inductor's matrix-vector products",
                "attention (split-K kernel)", "everything else")


def part_of_step(kernel: str) -> str:
    """Which part of a decode step a kernel belongs to, by its profiler name."""
    if kernel == "_quant_gemv_kernel" or "tinygemm" in kernel:  # ours, or torch's int4 kernel
        return PART_OF_STEP[0]
    if kernel.startswith("triton_red") and "mm" in kernel.split("_"):  # a reduction inductor built from a matmul
        return PART_OF_STEP[1]
    if kernel in ("_partial_kernel", "_combine_kernel"):
        return PART_OF_STEP[2]
    return PART_OF_STEP[3]


step_rows = []
for name, r in decoders.items():
    parts = dict.fromkeys(PART_OF_STEP, 0.0)
    for k in r["profile"]["top_kernels"]:  # the 40 slowest kernels; the others go to "everything else"
        parts[part_of_step(k["name"])] += k["us_per_token"]
    rest = r["profile"]["kernel_us_per_token"] - sum(k["us_per_token"] for k in r["profile"]["top_kernels"])
    parts[PART_OF_STEP[3]] += max(rest, 0.0)  # slightly negative where a kernel ran more often in the 1-token run
    step_rows.append({"decoder": f"{name} ({r['tokens_per_s']:.0f} tok/s)", **parts})
steps = pd.DataFrame(step_rows).set_index("decoder")
ax = steps.plot.barh(stacked=True, figsize=(7.5, 4.4), color=sns.color_palette("deep", 4))
ax.invert_yaxis()
ax.set_xlabel("GPU time of kernels per token (µs)")
ax.set_ylabel("")
ax.set_title(f"Where a Llama-2-7B decode step goes, {decode_h200['env']['device_name']} (precomputed)", fontsize=11)
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.4, -0.17), ncol=2, frameon=False)  # below the bars
plt.tight_layout()
plt.show()
steps.round(0)

# %% [markdown]
# The bars split each decoder's kernel time per token into four parts. In bf16, inductor builds the
# matrix-vector products itself and fuses the RMSNorms (with the residual adds before them), the SwiGLU
# product and one of the cache writes into them, so only 118 µs per token runs outside them and attention
# (RoPE and the other cache write among it). Our GEMVs, and tinygemm's, are custom operators that inductor
# cannot fuse into, so around them the quantized steps launch the norms and the SwiGLU product as kernels of
# their own: 344-451 µs per token of "everything else", in 395-491 kernels per token against bf16's 331.
# Stacking the projections shrank the W4 GEMVs from 1548 to 1330 µs per token, and tinygemm's take 2003 µs in
# the same fused model. With bf16's 118 µs of "everything else", the fused W4 step's kernels would take about
# 1.69 ms instead of 1.92, 2.5× less than bf16's 4.23 ms. Fusing the norms into the GEMVs is not free,
# though: each GEMV's loop would scale its activations too, which adds 25-63% to its instructions
# (`bench/quant_gemv_sass.py` counts them). The SwiGLU product could go into the gate/up GEMV's last step,
# and a W4 GEMV closer to the bandwidth is the other gain.
#
# How did our W4 kernel get here? Its previous version took 19.4 µs on the 4096 → 11008 layer. Two more
# benchmarks ran on the H200 against it, back to back in one call.
# `bench/quant_read_probe.py` times kernels that only *read* each layer's packed words (and fold them together
# with xor): the floor for any kernel that reads them. `bench/quant_gemv_variants.py` times variants of the GEMV
# that store the words transposed, `(K / 8, N)` as GPTQ checkpoints do, so that one load of a word's
# activations serves four outputs and no activation passes between threads ("transposed"), and, on top of
# that, turn each 4-bit lane into a float with one shift and one and-or, so that a weight costs one fused
# multiply-add ("transposed, lean lanes"; the file's docstring has the arithmetic). Each row is the fastest
# tile of its kind:

# %%
probe = load_result(H200, "quant_read_probe")
variants = load_result(H200, "quant_gemv_variants")
print(f"at {variants['env']['timestamp_utc']} and {probe['env']['timestamp_utc']} (UTC), copy bandwidth "
      f"{probe['results']['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
kinds = {"read the words only": ("probe", ("rows",)), "our previous GEMV": ("variants", ("library",)),
         "transposed": ("variants", ("lanes", "split")), "transposed, lean lanes": ("variants", ("unit", "unit+prefetch")),
         "tinygemm int4": ("variants", ("tinygemm",))}


def fastest(rows, k, n, names, key):
    return min((r for r in rows if (r["in"], r["out"]) == (k, n) and r.get(key) in names and r.get("bits", 4) == 4),
               key=lambda r: r["ms"])


limit_rows = []
for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
    for kind, (source, names) in kinds.items():
        rows, key = (probe["results"]["rows"], "probe") if source == "probe" else (variants["results"]["rows"], "variant")
        best = fastest(rows, k, n, names, key)
        limit_rows.append({"layer": f"{k} → {n}", "W4 g128 kernel": kind, "time (us)": round(best["ms"] * 1e3, 1),
                           "of copy bandwidth": f"{100 * best['fraction_of_copy_bandwidth']:.0f}%"})
pd.DataFrame(limit_rows).set_index(["layer", "W4 g128 kernel"])

# %% [markdown]
# Merely reading the words of the 4096 → 11008 layer takes 7.0 µs, 77% of the copy bandwidth: neither the
# layout nor the memory kept that kernel at 19.4 µs. Moving no activations between threads gains 1-3 µs, and
# lean lanes about 3 µs more on 11008 → 4096 (14.9 µs, level with tinygemm's 15.0), but every variant stays at
# or below 38% of the copy bandwidth. Triton compiles one instruction per element and operation, so each 4-bit
# weight cost a shift, a mask and a multiply-add, plus its share of loading and converting activations, scales
# and zero points.
#
# The kernel in the library now does three things differently (`effml_lib/kernels/quant_matmul.py`). It makes
# two float16 weights from two codes with one bit operation and multiplies them in pairs, in inline PTX. It
# reads each thread's activations in 16-byte loads. And it lays its tiles out so that the compiler gives each
# thread one chunk of every row: Triton 3.6 had spread each warp across rows and passed every pair of
# activations through shared memory (`bench/NOTES.md` has the profile). Together they took the layer from 19.4
# to 9.7 µs (in the layer table above).
#
# The real model, SmolLM2-135M from its GGUF file, also ran on the H200 (`python bench/quant.py --parts
# smollm2`, compiled decode, bf16 activations):

# %%
smol_gpu = load_result(H200, "quant_smollm2")
print(f"precomputed at {smol_gpu['env']['timestamp_utc']} (UTC) on an {smol_gpu['env']['device_name']}")
smol_labels = {"dense": "bf16 (as loaded, dequantized)", "w4-g32": "ours W4 g32", "q4_1-kept": "the file's Q4_1, kept"}
pd.DataFrame([{"weights": smol_labels[name],
               "tokens/s": round(r["tokens_per_s"], 1), "weight MB": round(r["weight_bytes"] / 1e6, 1),
               "GB/s of weights read": round(r["tokens_per_s"] * r["weight_bytes"] / 1e9)}
              for name, r in smol_gpu["results"]["smollm2"].items()]).set_index("weights")

# %% [markdown]
# A 135M-parameter model is too small to be bound by memory on an H200: a step reads its weights at 299 GB/s
# at most, of the 4.2 TB/s the copy reaches, so its time is 30 layers' worth of small kernels, each waiting on
# its own latency (the GEMV of that run, our previous one, was probably slower than cuBLAS's on layers this
# small; they have not been timed alone). W4 makes SmolLM2 slower here
# (830.1 against 1110.3 tokens/s): quantization for speed pays on large models at small batches, where bytes
# dominate, as on Llama-2-7B above.

# %% [markdown]
# ## What we found, and what the lab asks
#
# - At batch 1 a decode step's time is its bytes over the memory bandwidth, so bits per weight set the speed
#   limit: Llama-2-7B's bound on an H100 goes from 224 tokens/s in bf16 to 828 at int4 g128 (4.19 bits), and
#   Llama-2-70B's weights shrink from 138 GB to 36.1 GB.
# - Round-to-nearest misses by at most half a step, $s/2$. Finer groups shrink $s$ for $16/g$ to $24/g$ bits
#   of overhead; asymmetric codes use the whole range. On effml-tiny at 4 bits: relative error 0.2330 per
#   tensor, 0.1180 per channel, 0.1009 in groups of 128.
# - k-means codebooks fit bell-shaped weights better than evenly spaced levels over a tensor, but per-group
#   linear scales catch up by 4 bits and are what kernels and file formats use.
# - SmolLM2 has channel outliers (channel 247 entering attention, 12.0× the median channel in a typical layer)
#   and massive activations at the first token (3266.6× entering layer 11's down projection): INT8 activations
#   per tensor cost it about 0.8 nats. effml-tiny's outliers are mild, and W8A8 costs it less than 0.02.
# - SmoothQuant at α = 0.75 brought SmolLM2's per-tensor W8A8 to about 2.56 nats (2.457 as loaded, its Q4_1 weights
#   dequantized); too small or too large an α fails.
# - At 3 bits, keeping the 1% of input channels with the largest activations in fp16 almost halves the
#   damage, choosing them by weight or at random does not, and AWQ's scaling (one foldable s per shared
#   input) gets most of the way with no fp16 columns.
# - effml-tiny: W8 is lossless, W4 g128 costs 0.022 nats at a quarter of the bytes, 3 bits cost 0.093
#   (linear, groups of 128) to 0.145 (k-means).
# - A GGUF Q4_1 block is d and m (float16) and 16 bytes of codes, $w = d\,q + m$, weights $j$ and $j + 16$ sharing byte $j$.
# - Saved bytes become saved time only when dequantizing is fused into the matmul, and only if that
#   kernel unpacks as fast as memory delivers. On the H200 our W8 kernel reads Llama-2-7B's layers at 58-89% of
#   the copy bandwidth and our W4 kernel at 40-69%, 1.3-1.6× faster than tinygemm's. With each block's
#   projections stacked (four GEMVs instead of seven), our W8 and W4 decodes are 1.68× and 2.11× bf16's
#   (tinygemm's 1.59×). Kernels outside the GEMVs and attention take 18% of the fused W4 step's kernel time
#   against 3% of bf16's: the norms and the SwiGLU product, which inductor fuses into its own bf16 kernels but
#   not into ours.
#
# **Lab 05** ([`labs/lab05_quantization/lab05_quantization.ipynb`](../labs/lab05_quantization/lab05_quantization.ipynb), 12 points)
# has you build the pieces, each part graded by hidden tests:
#
# 1. **`quantize` and `dequantize`** (3 points): symmetric and asymmetric, per tensor, per channel and per
#    group, into the library's `QTensor`, every error within half a step;
# 2. **`pack_int4` and `unpack_int4`** (2 points): two 4-bit codes per byte, element $2i$ in the low nibble;
# 3. **`dequantize_q4_1`** (2 points): GGUF's Q4_1 blocks, as decoded by hand in section 8;
# 4. **`QuantLinear`** (3 points): `from_linear`, `dequantized_weight` and `forward` of a W8A16 or W4A16 layer
#    in the library's buffer layout, keeping effml-tiny's loss close to the unquantized one;
# 5. **what packing saves, and what it costs** (2 points): `model_bytes`, and your layer at a decode step
#    within 4× of the time of the library's reference.
#
# While the hidden tests run, the library's quantization, its GGUF block decoders and the `gguf` package are
# unavailable, so the notebook above is the explanation, not the answer key.
