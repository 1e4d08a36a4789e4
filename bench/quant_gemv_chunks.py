"""The library's chunked W4A16/W8A16 GEMV (``effml_lib/kernels/quant_matmul.py``, math 2: PTX pairs) on
a GPU: its answers against the reference and its plain-Triton copy (math 1), then its time per tile
beside its default tiles, tinygemm and bf16 cuBLAS, in one run.

    python bench/quant_gemv_chunks.py     # bench/results/<device>/quant_gemv_chunks.json
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from effml_lib.kernels.quant_matmul import quant_matmul  # noqa: E402
from effml_lib.quant import QuantLinear  # noqa: E402


def check(device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for bits, group, (k, n), dtype, offset in itertools.product((4, 8), (32, 128, None), ((4096, 256), (576, 40)),
                                                             (torch.bfloat16, torch.float16), (False, True)):
        if (offset and bits == 8) or (group and k % group):
            continue
        linear = torch.nn.Linear(k, n, bias=True)
        q = QuantLinear.from_linear(linear, bits, group, impl="torch").to(device)
        if offset:  # the offset form: same codes and scales, float16 offsets
            o = QuantLinear(k, n, 4, q.group_size, bias=True, offset=True, impl="torch").to(device)
            with torch.no_grad():
                for name in ("codes", "scale", "bias"):
                    getattr(o, name).copy_(getattr(q, name))
                o.offset.copy_((torch.randn(o.offset.shape, generator=gen) * 0.05).half().to(device))
            q = o
        x = torch.randn(3, k, generator=gen).to(device, dtype)
        ref = F.linear(x.float(), q.dequantized_weight(), q.bias.float())
        err = {}
        for math in (0, 1, 2):  # float32 products, the pairs in plain Triton, the pairs in PTX
            out = quant_matmul(x if math else x.float(), q.codes, q.scale, q.zero, q.bias, bits, q.group_size, k,
                               math=math, offset=q.offset).float()
            err[math] = ((out - ref).abs().max() / ref.abs().max()).item()
        rows.append({"bits": bits, "group_size": group, "in": k, "out": n, "dtype": str(dtype), "offset": offset,
                     **{f"relative_error_math{m}": e for m, e in err.items()}})
        print(f"W{bits} g{group} {k}->{n} {dtype} offset={offset}: " + " ".join(f"math{m} {e:.1e}" for m, e in err.items()))
        limit = 8e-3 if dtype == torch.bfloat16 else 2e-3  # the output's rounding; float16 products
        assert err[2] < limit and err[1] < limit and err[0] < 1e-5, err
    return rows


def bench(device, out_dir: Path, checks) -> None:
    from quant_gemv_variants import layer_with_baselines, print_best

    from effml_lib.measure import copy_bandwidth, save_result

    bandwidth = copy_bandwidth(device, nbytes=2 * 2**30)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for (k, n), (bits, group) in itertools.product(((4096, 11008), (11008, 4096), (4096, 4096)),
                                                   ((4, 128), (8, None))):
        qs, x, record = layer_with_baselines(k, n, bits, group, device, bandwidth, rows)
        record("library", [lambda q=q: q(x) for q in qs])  # the layer's forward: default tiles, custom op
        for block_n, warps in itertools.product((4, 8, 16), (1, 2, 4)):  # one chunk per thread and row
            t = {"block_n": block_n, "chunks": 32 * warps, "num_warps": warps}
            record("chunks", [lambda q=q, t=t: quant_matmul(x, q.codes, q.scale, q.zero, None, bits, q.group_size, k, gemv=t)
                              for q in qs], **t)
        print_best(rows, k, n, bits, ("bf16 cuBLAS", "tinygemm", "library", "chunks"))
        del qs, record
        torch.cuda.empty_cache()
        save_result(out_dir / "quant_gemv_chunks.json", {"copy_bandwidth_bytes_per_s": bandwidth, "checks": checks, "rows": rows}, device)


if __name__ == "__main__":
    device = torch.device("cuda")
    with torch.no_grad():
        checks = check(device)
        from effml_lib.measure import device_slug
        bench(device, Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / device_slug(device), checks)
