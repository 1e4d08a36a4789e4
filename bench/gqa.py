"""One decode step of a Llama-3-8B-shaped attention layer with 32, 8 and 1 KV heads, at 4k-64k tokens.

    python bench/gqa.py            # on a GPU: batch 1 and 8, contexts 4k-64k, bf16
    python bench/gqa.py --quick    # small shapes, a smoke test on any device

The layer's step: the q/k/v projections of one new token per sequence, RoPE, writing k/v into the
cache, attention over the whole context (the decode-attention kernel on a GPU), and the output
projection. Its bytes are the layer's weights (the same for every variant but the k/v projections)
plus the cache it reads (proportional to the KV heads). Once the cache dominates, the step's time
should fall with the number of KV heads, approaching the ratio of cache bytes; at short contexts the
weights, read every step whatever the heads, cap the gain. Each speedup (vs 32 KV heads) is reported
next to both ratios: of cache bytes, and of all bytes the step reads.

Timed as CUDA-graph replays (each replay a step on its own cache copy where memory allows), medians.
Results: bench/results/<device>/gqa.json and gqa.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effml_lib.attention import Attention, decode_attention  # noqa: E402
from effml_lib.device import describe, get_device  # noqa: E402
from effml_lib.kvcache import MODEL_SHAPES  # noqa: E402
from effml_lib.measure import benchmark, copy_bandwidth, device_slug, save_result  # noqa: E402
from effml_lib.rope import rope_frequencies, rotate_reference  # noqa: E402

SHAPE = MODEL_SHAPES["llama-3-8b"]
DIM, N_HEADS = SHAPE["dim"], SHAPE["n_heads"]
HEAD_DIM = DIM // N_HEADS
CALLS_PER_GRAPH = 8


class DecodeLayer(torch.nn.Module):
    """An attention layer's decode step over a preallocated cache, shapes fixed so it can be graphed."""

    def __init__(self, n_kv_heads, batch, context, dtype, device, impl):
        super().__init__()
        self.attn = Attention(DIM, N_HEADS, n_kv_heads).to(device=device, dtype=dtype)
        self.impl = impl
        shape = (batch, n_kv_heads, context, HEAD_DIM)
        self.k_cache = torch.randn(shape, dtype=dtype, device=device)
        self.v_cache = torch.randn(shape, dtype=dtype, device=device)
        self.lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        cos, sin = rope_frequencies(HEAD_DIM, context, SHAPE["rope_theta"], device=device)
        self.cos, self.sin = cos[context - 1:context], sin[context - 1:context]  # the new token's row

    def cache_bytes(self):
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def weight_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.attn.parameters())

    @torch.no_grad()
    def forward(self, x):  # x (B, 1, dim): one new token per sequence, at position context - 1
        a, b = self.attn, x.shape[0]
        q = a.wq(x).view(b, 1, N_HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, 1, D)
        k = a.wk(x).view(b, 1, a.n_kv_heads, HEAD_DIM).transpose(1, 2)  # (B, Hkv, 1, D)
        v = a.wv(x).view(b, 1, a.n_kv_heads, HEAD_DIM).transpose(1, 2)
        q, k = rotate_reference(q, self.cos, self.sin), rotate_reference(k, self.cos, self.sin)
        self.k_cache[:, :, -1:] = k  # the new token's slot
        self.v_cache[:, :, -1:] = v
        if self.impl == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, enable_gqa=True)
        else:
            out = decode_attention_fast(q, self.k_cache, self.v_cache, self.lens, self.impl)
        return a.wo(out.transpose(1, 2).reshape(b, 1, N_HEADS * HEAD_DIM))


def decode_attention_fast(q, k, v, lens, impl):
    if impl == "triton":  # the kernel itself: decode_attention's range check would sync every call
        from effml_lib.kernels.decode_attention import decode_attention_triton

        return decode_attention_triton(q, k, v, lens)
    return decode_attention(q, k, v, lens, impl=impl)


def step_time_s(layers, x, reps):
    """Median seconds of one step, replaying a CUDA graph that steps through ``layers`` in turn."""
    if x.device.type != "cuda":
        return benchmark(layers[0], x, warmup=2, reps=reps).median_s
    calls = [layers[i % len(layers)] for i in range(max(CALLS_PER_GRAPH, len(layers)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for layer in calls[:2]:
            layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in calls:
            layer(x)
    return benchmark(graph.replay, warmup=2, reps=reps, device=x.device).median_s / len(calls)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8, 1])
    parser.add_argument("--impls", nargs="+", default=None, help="triton and/or sdpa (GPU); torch (CPU)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = get_device()
    if args.quick:
        args.batches, args.contexts, args.reps = [1], [256, 1024], 5
    impls = args.impls or (["triton", "sdpa"] if device.type == "cuda" else ["torch"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device)
    print(f"{describe(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    torch.manual_seed(0)
    rows = []
    for impl in impls:
        for batch in args.batches:
            for context in args.contexts:
                times = {}
                for n_kv in args.kv_heads:
                    one = 2 * batch * n_kv * context * HEAD_DIM * 2
                    copies = 1 if device.type != "cuda" else max(1, min(4, (512 * 2**20) // one))
                    layers = [DecodeLayer(n_kv, batch, context, dtype, device, impl) for _ in range(copies)]
                    x = torch.randn(batch, 1, DIM, dtype=dtype, device=device)
                    t = step_time_s(layers, x, args.reps)
                    moved = layers[0].cache_bytes() + layers[0].weight_bytes()
                    times[n_kv] = (t, layers[0].cache_bytes(), moved)
                    del layers
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                base_t, base_cache, base_moved = times[max(times)]
                for n_kv, (t, cache, moved) in times.items():
                    row = {"impl": impl, "batch": batch, "context": context, "n_heads": N_HEADS, "n_kv_heads": n_kv,
                           "step_us": t * 1e6, "cache_bytes": cache, "bytes_read": moved,
                           "fraction_of_copy": moved / t / bandwidth,
                           "speedup_vs_most_kv_heads": base_t / t,
                           "cache_bytes_ratio": base_cache / cache, "total_bytes_ratio": base_moved / moved}
                    rows.append(row)
                    print(f"{impl:6s} B={batch} S={context:6d} {N_HEADS}/{n_kv:2d}: {t * 1e6:8.1f} us "
                          f"{100 * row['fraction_of_copy']:5.1f}% of copy; speedup {row['speedup_vs_most_kv_heads']:5.2f}x "
                          f"(cache ratio {row['cache_bytes_ratio']:4.0f}x, all-bytes ratio {row['total_bytes_ratio']:5.2f}x)")
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device)
    result = {"copy_bandwidth_bytes_per_s": bandwidth, "dtype": str(dtype), "shape": "llama-3-8b attention layer",
              "rows": rows}
    path = save_result(out_dir / "gqa.json", result, device=device)
    plot(rows, out_dir / "gqa.png", describe(device))
    print("wrote", path)


def plot(rows, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["impl"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False, sharey=True)
    for ax, (impl, batch) in zip(axes[0], keys):
        part = [r for r in rows if r["impl"] == impl and r["batch"] == batch]
        for n_kv in sorted({r["n_kv_heads"] for r in part}, reverse=True)[1:]:
            pts = sorted((r["context"], r["speedup_vs_most_kv_heads"], r["total_bytes_ratio"], r["cache_bytes_ratio"])
                         for r in part if r["n_kv_heads"] == n_kv)
            x, speedup, total, cache = zip(*pts)
            line, = ax.plot(x, speedup, marker="o", label=f"{n_kv} KV heads: measured")
            ax.plot(x, total, linestyle="--", color=line.get_color(), label=f"{n_kv} KV heads: ratio of all bytes read")
            ax.axhline(cache[0], linestyle=":", color=line.get_color(), linewidth=1,
                       label=f"{n_kv} KV heads: ratio of cache bytes ({cache[0]:.0f}x)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("context (cached tokens per sequence)")
        ax.set_title(f"{impl}, batch {batch}")
    axes[0, 0].set_ylabel(f"decode-step speedup over {N_HEADS} KV heads (×)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Llama-3-8B attention layer, one decode step, bf16: {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
