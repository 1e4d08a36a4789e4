"""How fast can a Triton kernel merely read a packed weight? A floor for the quantized GEMV.

    python bench/quant_read_probe.py     # on a GPU: bench/results/<device>/quant_read_probe.json

Each probe reads every 32-bit word of a 4-bit layer's codes once (Llama-2-7B's three shapes), folds them
together (xor or sum: no arithmetic worth the name) and writes one int per output or block, timed like
bench/quant.py (CUDA graphs rotating through copies larger than L2). Only the codes are read: a GEMV's
percentages also count scales and zero points, about 5% more bytes at groups of 128.
- ``flat``: the words as one 1-D array, BLOCK words per program;
- ``rows``: (N, K/8) words, BLOCK_N rows x WORDS words per step (the library GEMV's reads);
- ``cols``: (K/8, N) words, WORDS x BLOCK_N per step (the transposed variants' reads).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


@triton.jit
def _flat(w, y, total, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(w + i, mask=i < total, other=0)
    tl.store(y + pid, tl.sum(v, axis=0))


@triton.jit
def _rows(w, y, N, KW, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, WORDS), tl.int32)
    for w0 in range(0, KW, WORDS):
        k = w0 + tl.arange(0, WORDS)
        acc ^= tl.load(w + n[:, None] * KW + k[None, :], mask=(k < KW)[None, :], other=0)
    tl.store(y + n, tl.sum(acc, axis=1))


@triton.jit
def _cols(w, y, N, KW, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((WORDS, BLOCK_N), tl.int32)
    for w0 in range(0, KW, WORDS):
        k = w0 + tl.arange(0, WORDS)
        acc ^= tl.load(w + k[:, None] * N + n[None, :], mask=(k < KW)[:, None], other=0)
    tl.store(y + n, tl.sum(acc, axis=0))


def main():
    from quant import copies_for, graph_ms

    from effml_lib.measure import copy_bandwidth, device_slug, save_result

    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device, nbytes=2 * 2**30)
    rows = []
    for k, n in ((4096, 11008), (11008, 4096), (4096, 4096)):
        kw = k // 8
        nbytes = kw * n * 4
        ws = [torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device=device) for _ in range(copies_for(nbytes))]
        wt = [w.t().contiguous() for w in ws]
        y = torch.empty(max(n, nbytes // 4 // 256 + 1), dtype=torch.int32, device=device)

        def record(name, calls, **tiles):
            ms = graph_ms(calls, iters=40, rounds=5)
            rows.append({"in": k, "out": n, "probe": name, **tiles, "ms": ms, "fraction_of_copy_bandwidth": nbytes / (ms * 1e-3) / bandwidth})

        for block, warps in itertools.product((1024, 2048, 4096, 8192), (4, 8)):
            record("flat", [lambda w=w: _flat[(triton.cdiv(n * kw, block),)](w, y, n * kw, BLOCK=block, num_warps=warps) for w in ws],
                   block=block, num_warps=warps)
        for block_n, words, warps in itertools.product((4, 8, 16), (64, 128, 256, 512), (2, 4, 8)):
            record("rows", [lambda w=w: _rows[(n // block_n,)](w, y, n, kw, BLOCK_N=block_n, WORDS=words, num_warps=warps) for w in ws],
                   block_n=block_n, words=words, num_warps=warps)
            record("cols", [lambda w=w: _cols[(n // block_n,)](w, y, n, kw, BLOCK_N=block_n, WORDS=words, num_warps=warps) for w in wt],
                   block_n=block_n, words=words, num_warps=warps)
        for probe in ("flat", "rows", "cols"):
            best = min((r for r in rows if r["probe"] == probe and r["in"] == k and r["out"] == n), key=lambda r: r["ms"])
            print(f"{k}->{n} {probe}: {best['ms'] * 1e3:.1f} us, {100 * best['fraction_of_copy_bandwidth']:.0f}% "
                  + " ".join(f"{t}={best[t]}" for t in ("block", "block_n", "words", "num_warps") if t in best))
        del ws, wt
    save_result(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "bench" / "results" / device_slug(device)) / "quant_read_probe.json",
                {"copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, device)


if __name__ == "__main__":
    with torch.no_grad():
        main()
