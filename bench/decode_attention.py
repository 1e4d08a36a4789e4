"""Decode attention: the split-K Triton kernel vs PyTorch SDPA, against copy bandwidth.

    python bench/decode_attention.py            # on a GPU: batch 1-64 x context 1k-64k, 32/8 heads x 128, bf16
    python bench/decode_attention.py --sweep    # tune the kernel's tile, warps, stages and split count
    python bench/decode_attention.py --quick    # a few small shapes, a smoke test

One decode step's attention reads the whole K/V cache once and does ~4 flops per cached element per
query head it serves (G = 4 query heads share each KV head here): far too few to keep the tensor
cores busy, so time is set by bytes, and the yardstick is a device-to-device copy measured in the same
run (bytes read + written). For each shape:
    achieved GB/s = bytes of K and V read (+ q and the output) / median time
and that as a fraction of the copy bandwidth.

Two timings per implementation:
- "graph": calls captured in a CUDA graph and replayed back to back, as a compiled decode step runs
  them; divided by the number of calls. Each call reads a different copy of the cache (enough copies
  to overflow L2), so no call finds the previous one's K/V in cache.
- "launch": one call from Python on an idle GPU, launch overhead included (eager decoding).
Full context (every cached key visible), so SDPA without a mask computes the same function; the
kernel's output is checked against SDPA's at every shape.
Results: bench/results/<device>/decode_attention.json and decode_attention.png.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effml_lib.device import describe, get_device, triton_available  # noqa: E402
from effml_lib.measure import benchmark, copy_bandwidth, device_slug, save_result  # noqa: E402

N_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B / Mistral-7B attention
L2_OVERFLOW_BYTES = 256 * 2**20  # H100 L2 is 50 MiB; rotate through at least this many bytes of cache
CALLS_PER_GRAPH = 16


def make_inputs(batch, context, n_copies, dtype, device, gen):
    """q (B, H, 1, D) and ``n_copies`` independent caches k/v (B, Hkv, S, D), with their lengths."""
    q = torch.randn(batch, N_HEADS, 1, HEAD_DIM, generator=gen, dtype=dtype, device=device)
    caches = [
        (torch.randn(batch, N_KV_HEADS, context, HEAD_DIM, generator=gen, dtype=dtype, device=device),
         torch.randn(batch, N_KV_HEADS, context, HEAD_DIM, generator=gen, dtype=dtype, device=device))
        for _ in range(n_copies)
    ]
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, caches, lens


def implementations(device, kernel_options=None):
    """name -> fn(q, k, v, context_lens); SDPA backends that cannot run this shape are left out later."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {}
    if device.type == "cuda" and triton_available():
        from effml_lib.kernels.decode_attention import decode_attention_triton

        options = kernel_options or {}
        impls["triton kernel"] = lambda q, k, v, lens: decode_attention_triton(q, k, v, lens, **options)
    impls["sdpa (auto)"] = lambda q, k, v, lens: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if device.type == "cuda":
        for name, backend in [("sdpa flash", SDPBackend.FLASH_ATTENTION),
                              ("sdpa mem-efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)]:
            def run(q, k, v, lens, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            impls[name] = run
    return impls


def graph_time_s(fn, q, caches, lens, reps):
    """Median seconds per call of ``fn`` replayed in a CUDA graph, cycling through the caches."""
    calls = [caches[i % len(caches)] for i in range(max(CALLS_PER_GRAPH, len(caches)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, autotune) off the capture
        for k, v in calls[:2]:
            fn(q, k, v, lens)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k, v in calls:
            fn(q, k, v, lens)
    t = benchmark(graph.replay, warmup=2, reps=reps, device=q.device)
    return t.median_s / len(calls)


def time_impl(fn, q, caches, lens, reps, graph: bool):
    try:
        if graph:
            return graph_time_s(fn, q, caches, lens, reps)
        return benchmark(fn, q, *caches[0], lens, warmup=3, reps=reps).median_s
    except (RuntimeError, torch.OutOfMemoryError) as err:  # a backend that cannot run this shape
        torch.cuda.empty_cache()
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def n_copies_for(batch, context, dtype_bytes, device):
    one = 2 * batch * N_KV_HEADS * context * HEAD_DIM * dtype_bytes
    return 1 if device.type != "cuda" else max(1, min(8, math.ceil(L2_OVERFLOW_BYTES / one)))


def bytes_read(batch, context, dtype_bytes):
    """K and V of every sequence, plus q read and the output written."""
    return dtype_bytes * (2 * batch * N_KV_HEADS * context * HEAD_DIM + 2 * batch * N_HEADS * HEAD_DIM)


def table(args, device, gen, bandwidth) -> list[dict]:
    rows = []
    impls = implementations(device)
    for batch, context in itertools.product(args.batches, args.contexts):
        if 2 * batch * N_KV_HEADS * context * HEAD_DIM * 2 > args.max_cache_bytes:
            continue
        q, caches, lens = make_inputs(batch, context, n_copies_for(batch, context, 2, device), torch.bfloat16, device, gen)
        moved = bytes_read(batch, context, 2)
        k0, v0 = caches[0]  # fp32 reference for the first sequence only: an fp32 copy of all K/V may not fit
        expected = F.scaled_dot_product_attention(q[:1].float(), k0[:1].float(), v0[:1].float(), enable_gqa=True)
        for name, fn in impls.items():
            row = {"batch": batch, "context": context, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS,
                   "head_dim": HEAD_DIM, "impl": name, "bytes": moved, "n_cache_copies": len(caches)}
            try:
                row["max_abs_error_vs_fp32"] = (fn(q, k0, v0, lens)[:1].float() - expected).abs().max().item()
            except RuntimeError as err:
                row["error"] = str(err).splitlines()[0][:160]
                rows.append(row)
                print(f"B={batch:3d} S={context:6d} {name:20s} cannot run: {row['error']}")
                continue
            for mode in (["graph", "launch"] if device.type == "cuda" else ["launch"]):
                t = time_impl(fn, q, caches, lens, args.reps, graph=mode == "graph")
                if isinstance(t, str):
                    row[f"{mode}_error"] = t
                    continue
                row[f"{mode}_us"] = t * 1e6
                row[f"{mode}_gb_per_s"] = moved / t / 1e9
                row[f"{mode}_fraction_of_copy"] = moved / t / bandwidth
            rows.append(row)
            shown = "  ".join(f"{m}: {row[m + '_us']:8.1f} us {100 * row[m + '_fraction_of_copy']:5.1f}%"
                              for m in ("graph", "launch") if m + "_us" in row)
            print(f"B={batch:3d} S={context:6d} {name:20s} {shown}  err {row['max_abs_error_vs_fp32']:.1e}")
        del q, caches, k0, v0, expected
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def sweep(args, device, gen, bandwidth) -> list[dict]:
    """Graph time of each kernel configuration at a few shapes, to choose the defaults."""
    from effml_lib.kernels.decode_attention import decode_attention_triton

    shapes = [(1, 4096), (1, 16384), (1, 65536), (4, 16384), (16, 32768), (64, 16384)]
    configs = [dict(block_n=bn, num_warps=w, num_stages=st, programs_per_sm=p)
               for bn, w, st, p in itertools.product(args.sweep_block_n, [4, 8], [2, 3, 4], [1, 2, 4, 8])]
    rows = []
    for batch, context in shapes:
        q, caches, lens = make_inputs(batch, context, n_copies_for(batch, context, 2, device), torch.bfloat16, device, gen)
        moved = bytes_read(batch, context, 2)
        best = None
        for cfg in configs:
            fn = lambda q, k, v, lens, cfg=cfg: decode_attention_triton(q, k, v, lens, **cfg)  # noqa: E731
            t = time_impl(fn, q, caches, lens, args.reps, graph=True)
            row = {"batch": batch, "context": context, **cfg}
            if isinstance(t, str):
                row["error"] = t
            else:
                row.update(graph_us=t * 1e6, fraction_of_copy=moved / t / bandwidth)
                if best is None or t < best[0]:
                    best = (t, cfg)
            rows.append(row)
        print(f"B={batch:3d} S={context:6d} best {best[0] * 1e6:8.1f} us "
              f"{100 * moved / best[0] / bandwidth:5.1f}% of copy with {best[1]}")
        del q, caches
        torch.cuda.empty_cache()
    return rows


def summarize(rows) -> list[dict]:
    """At each shape: the kernel's graph time and fraction of copy, and its speedup over each SDPA path."""
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["batch"], r["context"]), {})[r["impl"]] = r
    out = []
    for (b, s), impls in sorted(by_shape.items()):
        kernel = impls.get("triton kernel", {})
        if "graph_us" not in kernel:
            continue
        entry = {"batch": b, "context": s, "kernel_graph_us": kernel["graph_us"],
                 "kernel_fraction_of_copy": kernel["graph_fraction_of_copy"]}
        sdpa = {n: r["graph_us"] for n, r in impls.items() if n.startswith("sdpa") and "graph_us" in r}
        if sdpa:
            fastest = min(sdpa, key=sdpa.get)
            entry.update(fastest_sdpa=fastest, fastest_sdpa_graph_us=sdpa[fastest],
                         speedup_vs_fastest_sdpa=sdpa[fastest] / kernel["graph_us"])
        out.append(entry)
    return out


def plot(rows, bandwidth, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(2, len(batches), figsize=(4.2 * len(batches), 7.5), sharex=True, squeeze=False)
    for col, batch in enumerate(batches):
        for impl in impls:
            pts = sorted((r["context"], r["graph_us"], r["graph_fraction_of_copy"]) for r in rows
                         if r["batch"] == batch and r["impl"] == impl and "graph_us" in r)
            if not pts:
                continue
            x, us, frac = zip(*pts)
            style = dict(marker="o", linewidth=2.5 if impl == "triton kernel" else 1.2, label=impl)
            axes[0, col].plot(x, us, **style)
            axes[1, col].plot(x, [100 * f for f in frac], **style)
        axes[0, col].set_title(f"batch {batch}")
        axes[0, col].set_yscale("log")
        axes[1, col].axhline(100, color="black", linestyle="--", linewidth=1)
        axes[1, col].axhline(70, color="grey", linestyle=":", linewidth=1)
        axes[1, col].set_ylim(0, 110)
        axes[1, col].set_xscale("log", base=2)
        axes[1, col].set_xlabel("context (cached tokens per sequence)")
    axes[0, 0].set_ylabel("time per call (µs, CUDA graph)")
    axes[1, 0].set_ylabel("% of copy bandwidth (K/V bytes read)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Decode attention, {N_HEADS}/{N_KV_HEADS} heads x {HEAD_DIM}, bf16, 1 query token: {device_name} "
                 f"(copy {bandwidth / 1e12:.2f} TB/s; dotted: 70%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--max-cache-bytes", type=int, default=24 * 2**30, help="skip larger K/V caches")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="tune the kernel instead of the comparison table")
    parser.add_argument("--sweep-block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.reps = [1, 4], [256, 1024], 5

    device = get_device()
    gen = torch.Generator(device=device).manual_seed(0)
    bandwidth = copy_bandwidth(device)
    print(f"{describe(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device)
    if args.sweep:
        rows = sweep(args, device, gen, bandwidth)
        path = save_result(out_dir / "decode_attention_sweep.json",
                           {"copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, device=device)
        print("wrote", path)
        return
    rows = table(args, device, gen, bandwidth)
    result = {"copy_bandwidth_bytes_per_s": bandwidth, "dtype": "torch.bfloat16", "q_len": 1,
              "calls_per_graph": CALLS_PER_GRAPH, "rows": rows, "summary": summarize(rows)}
    path = save_result(out_dir / "decode_attention.json", result, device=device)
    plot(rows, bandwidth, out_dir / "decode_attention.png", describe(device))
    for e in result["summary"]:
        vs = f"{e['speedup_vs_fastest_sdpa']:.2f}x {e['fastest_sdpa']}" if "fastest_sdpa" in e else ""
        print(f"B={e['batch']:3d} S={e['context']:6d} kernel {e['kernel_graph_us']:8.1f} us "
              f"{100 * e['kernel_fraction_of_copy']:5.1f}% of copy, {vs}")
    print("wrote", path)


if __name__ == "__main__":
    main()
