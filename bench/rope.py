"""RoPE on q and k: the Triton kernel vs the eager PyTorch reference vs torch.compile, against copy bandwidth.

    python bench/rope.py            # on a GPU: 32 query heads x 128, batch 1-64, 1k-32k tokens
    python bench/rope.py --quick    # a few small shapes (any device)

RoPE is pure data movement: each q and k element is read once and written once, with a handful of
flops in between. So the honest yardstick is memory bandwidth, measured in the same run by a
device-to-device copy (bytes read + written). For each shape we report
    achieved GB/s = (bytes of q and k read + written) / median time
and that as a fraction of the copy bandwidth; the cos/sin rows (read once per token, shared by every
head) are not counted. Inputs have the model's layout, (B, H, T, D) views of (B, T, H, D) activations,
bf16, positions 0..T-1 (the prefill case); a second table times one decode step (T = 1, a position
per sequence) where launch overhead, not bandwidth, decides.
Results: bench/results/<device>/rope.json and rope.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effml_lib.device import describe, get_device, triton_available  # noqa: E402
from effml_lib.measure import benchmark, copy_bandwidth, device_slug, save_result  # noqa: E402
from effml_lib.rope import apply_rope_qk, rope_frequencies, rotate_reference  # noqa: E402

HEAD_DIM = 128
N_HEADS = 32


def make_inputs(batch, seq_len, n_heads, n_kv_heads, dtype, device, gen):
    q = torch.randn(batch, seq_len, n_heads, HEAD_DIM, generator=gen, dtype=dtype, device=device).transpose(1, 2)
    k = torch.randn(batch, seq_len, n_kv_heads, HEAD_DIM, generator=gen, dtype=dtype, device=device).transpose(1, 2)
    return q, k


def implementations(device):
    """name -> fn(q, k, cos, sin, positions)."""
    def eager(q, k, cos, sin, positions):
        return apply_rope_qk(q, k, cos, sin, positions, impl="torch")

    impls = {"eager reference": eager}
    if device.type == "cuda" and triton_available():
        impls["triton kernel"] = lambda q, k, cos, sin, positions: apply_rope_qk(q, k, cos, sin, positions, impl="triton")
    # dynamic=False: one specialised graph per shape, as a serving engine would compile per bucket.
    impls["torch.compile(reference)"] = torch.compile(eager, dynamic=False)
    return impls


def time_or_oom(fn, args, reps):
    try:
        return benchmark(fn, *args, warmup=3, reps=reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def bandwidth_table(args, device, gen, bandwidth) -> list[dict]:
    rows = []
    cos, sin = rope_frequencies(HEAD_DIM, max(args.seq_lens), theta=500000.0, device=device)
    impls = implementations(device)
    for n_kv_heads in args.kv_heads:
        for batch in args.batches:
            for seq_len in args.seq_lens:
                tokens = batch * seq_len
                if tokens > args.max_tokens:
                    continue  # q+k in and out would not fit next to the reference's temporaries
                q, k = make_inputs(batch, seq_len, N_HEADS, n_kv_heads, torch.bfloat16, device, gen)
                moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read + write, q and k
                for name, fn in impls.items():
                    t = time_or_oom(fn, (q, k, cos, sin, None), args.reps)
                    row = {"batch": batch, "seq_len": seq_len, "tokens": tokens, "n_heads": N_HEADS,
                           "n_kv_heads": n_kv_heads, "head_dim": HEAD_DIM, "impl": name, "bytes_moved": moved,
                           "median_ms": None, "gb_per_s": None, "fraction_of_copy": None}
                    if t is not None:
                        row.update(median_ms=t.median_ms, q25_ms=t.q25_ms, q75_ms=t.q75_ms,
                                   gb_per_s=moved / t.median_s / 1e9, fraction_of_copy=moved / t.median_s / bandwidth)
                    rows.append(row)
                    shown = "out of memory" if t is None else f"{row['median_ms']:8.3f} ms {row['gb_per_s']:7.0f} GB/s {100 * row['fraction_of_copy']:5.1f}%"
                    print(f"{N_HEADS}/{n_kv_heads} heads B={batch:3d} T={seq_len:6d} {name:26s} {shown}")
                del q, k
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def decode_table(args, device, gen) -> list[dict]:
    rows = []
    cos, sin = rope_frequencies(HEAD_DIM, 32768, theta=500000.0, device=device)
    # The rotation alone: apply_rope_qk's check of the positions' range costs a host sync, which at
    # this size would dominate both paths alike.
    def eager(q, k, cos, sin, positions):
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, 1, D/2)
        return rotate_reference(q, c, s), rotate_reference(k, c, s)

    impls = {"eager reference": eager, "torch.compile(reference)": torch.compile(eager, dynamic=False)}
    if device.type == "cuda" and triton_available():
        from effml_lib.kernels.rope import rope_qk_triton

        impls["triton kernel"] = lambda q, k, cos, sin, positions: rope_qk_triton(q, k, cos, sin, positions, False)
    for batch in args.batches:
        q, k = make_inputs(batch, 1, N_HEADS, 8, torch.bfloat16, device, gen)
        positions = torch.randint(0, 32768, (batch, 1), generator=gen, device=device)
        for name, fn in impls.items():
            t = benchmark(fn, q, k, cos, sin, positions, warmup=3, reps=args.reps)
            rows.append({"batch": batch, "impl": name, "median_us": t.median_us, "q25_us": t.q25_s * 1e6,
                         "q75_us": t.q75_s * 1e6})
            print(f"decode step B={batch:3d} {name:26s} {t.median_us:8.1f} us")
    return rows


def summarize(rows) -> dict:
    """At each shape, kernel vs eager and vs compile; and the kernel's best fraction of copy bandwidth."""
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["n_kv_heads"], r["batch"], r["seq_len"]), {})[r["impl"]] = r
    ratios = []
    for (n_kv, b, t), impls in by_shape.items():
        kernel = impls.get("triton kernel")
        if kernel is None or kernel["median_ms"] is None:
            continue
        entry = {"n_kv_heads": n_kv, "batch": b, "seq_len": t, "kernel_fraction_of_copy": kernel["fraction_of_copy"]}
        for other in ("eager reference", "torch.compile(reference)"):
            o = impls.get(other)
            entry[f"speedup_vs_{other.split()[0].split('(')[0]}"] = (
                o["median_ms"] / kernel["median_ms"] if o and o["median_ms"] else None)
        ratios.append(entry)
    return {"per_shape": ratios}


def plot(rows, bandwidth, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame([r for r in rows if r["gb_per_s"] is not None])
    kv_values = sorted(df["n_kv_heads"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(kv_values), figsize=(6 * len(kv_values), 4.2), sharey=True, squeeze=False)
    for ax, n_kv in zip(axes[0], kv_values):
        part = df[df["n_kv_heads"] == n_kv].groupby(["impl", "tokens"], as_index=False)["gb_per_s"].max()
        sns.lineplot(data=part, x="tokens", y="gb_per_s", hue="impl", marker="o", ax=ax)
        ax.axhline(bandwidth / 1e9, color="black", linestyle="--", linewidth=1)
        ax.text(part["tokens"].min(), bandwidth / 1e9 * 0.97, "device-to-device copy", va="top", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens rotated (batch x sequence length)")
        ax.set_ylabel("achieved bandwidth (GB/s, q and k read + written)")
        ax.set_title(f"{N_HEADS} query / {n_kv} key heads x {HEAD_DIM}, bf16")
    fig.suptitle(f"RoPE on q and k: {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--max-tokens", type=int, default=2**19, help="skip shapes with more tokens than this")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a CPU or a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.seq_lens, args.kv_heads, args.reps = [1, 4], [256, 1024], [8], 5

    device = get_device()
    torch._dynamo.config.cache_size_limit = 256  # one compiled graph per shape
    gen = torch.Generator(device=device).manual_seed(0)
    bandwidth = copy_bandwidth(device)
    print(f"{describe(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = bandwidth_table(args, device, gen, bandwidth)
    decode = decode_table(args, device, gen)
    result = {"copy_bandwidth_bytes_per_s": bandwidth, "dtype": "torch.bfloat16", "prefill": rows,
              "decode_step": decode, "summary": summarize(rows), "max_tokens": args.max_tokens}
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device)
    path = save_result(out_dir / "rope.json", result, device=device)
    plot(rows, bandwidth, out_dir / "rope.png", describe(device))
    per_shape = result["summary"]["per_shape"]
    if per_shape:
        top = max(per_shape, key=lambda e: e["kernel_fraction_of_copy"])
        print(f"kernel's best: {100 * top['kernel_fraction_of_copy']:.1f}% of copy bandwidth at {top}")
    print("wrote", path)


if __name__ == "__main__":
    main()
