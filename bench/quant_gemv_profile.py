"""The library's GEMV (two tiles), a read-only probe and tinygemm at batch 1 on 4096 -> 11008 (W4 g128),
each launched three times, for Nsight Compute:

    ncu --set full -k regex:'gemv|_rows|tinygemm' python bench/quant_gemv_profile.py

The profiler replays each launch with cold caches; what to read is its stall reasons and occupancy,
beside the graph timings of bench/quant_gemv_chunks.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quant import Int4PackLinear, random_linear  # noqa: E402  (bench/)
from quant_read_probe import _rows  # noqa: E402

from effml_lib.kernels.quant_matmul import quant_matmul  # noqa: E402
from effml_lib.quant import QuantLinear  # noqa: E402

TILES = [dict(block_n=4, chunks=64, num_warps=2), dict(block_n=8, chunks=32, num_warps=1)]


def main():
    device = torch.device("cuda")
    k, n = 4096, 11008
    q = QuantLinear.from_linear(random_linear(k, n, device, 0), 4, 128, impl="triton")
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    words = q.codes.view(torch.int32)
    y = torch.empty(n, dtype=torch.int32, device=device)
    pack = Int4PackLinear(q)
    for _ in range(3):
        for tiles in TILES:
            quant_matmul(x, q.codes, q.scale, q.zero, None, 4, 128, k, gemv=tiles)
        _rows[(n // 4,)](words, y, n, k // 8, BLOCK_N=4, WORDS=128, num_warps=8)  # only the reads
        pack(x)  # tinygemm
    torch.cuda.synchronize()


if __name__ == "__main__":
    with torch.no_grad():
        main()
