"""The chunked W4A16/W8A16 GEMV (``bench/quant_gemv_chunks_kernel.py``, MATH 2: PTX pairs) on a GPU:
its answers against the reference and its plain-Triton copy (MATH 1), then its time per tile beside
tinygemm and bf16 cuBLAS, in one run.

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

import quant_gemv_chunks_kernel as qm  # noqa: E402  (bench/)
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
                o.codes.copy_(q.codes); o.scale.copy_(q.scale); o.bias.copy_(q.bias)
                o.offset.copy_((torch.randn(o.offset.shape, generator=gen) * 0.05).half().to(device))
            q = o
        x = torch.randn(3, k, generator=gen).to(device, dtype)
        ref = F.linear(x.float(), q.dequantized_weight(), q.bias.float())
        outs = {}
        for math in (0, 1, 2):
            outs[math] = qm.quant_matmul(x if math else x.float(), q.codes, q.scale, q.zero, q.bias, bits, q.group_size, k,
                                         gemv={"math": math}, offset=q.offset).float()
        err = {m: ((o - ref).abs().max() / ref.abs().max()).item() for m, o in outs.items()}
        rows.append({"bits": bits, "group_size": group, "in": k, "out": n, "dtype": str(dtype), "offset": offset,
                     "relative_error": err})
        print(f"W{bits} g{group} {k}->{n} {dtype} offset={offset}: " + " ".join(f"math{m} {e:.1e}" for m, e in err.items()))
        assert err[2] < 1e-2 and err[1] < 1e-2 and err[0] < 1e-5, err
    return rows


def bench(device, out_dir: Path, checks) -> None:
    from quant import Int4PackLinear, copies_for, graph_ms, random_linear  # bench/quant.py

    from effml_lib.measure import copy_bandwidth, save_result

    bandwidth = copy_bandwidth(device, nbytes=2 * 2**30)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for (k, n), (bits, group) in itertools.product(((4096, 11008), (11008, 4096), (4096, 4096)),
                                                   ((4, 128), (8, None))):
        linears = [random_linear(k, n, device, i) for i in range(copies_for(k * n * bits // 8))]
        qs = [QuantLinear.from_linear(lin, bits, group, impl="triton") for lin in linears]
        nbytes = qs[0].weight_bytes
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        reference = F.linear(x.float(), qs[0].dequantized_weight())

        def record(name, calls, **tiles):
            err = ((calls[0]().float() - reference).norm() / reference.norm()).item()
            ms = graph_ms(calls, iters=40, rounds=5)
            rows.append({"in": k, "out": n, "bits": bits, "group_size": group, "variant": name, **tiles, "ms": ms,
                         "fraction_of_copy_bandwidth": nbytes / (ms * 1e-3) / bandwidth, "relative_error": err})

        record("bf16 cuBLAS", [lambda lin=lin: lin(x) for lin in linears])
        if bits == 4:
            packs = [Int4PackLinear(q) for q in qs]
            record("tinygemm", [lambda p=p: p(x) for p in packs])
            del packs
        record("library", [lambda q=q: q(x) for q in qs])  # the library's own GEMV, for comparison
        for bn, nw, per_thread in itertools.product((4, 8, 16), (1, 2, 4), (1,)):
            t = {"block_n": bn, "chunks": 32 * nw * per_thread, "num_warps": nw}
            record("chunks", [lambda q=q, t=t: qm.quant_matmul(x, q.codes, q.scale, q.zero, None, bits, q.group_size, k, gemv=t)
                              for q in qs], **t)
        for name in ("bf16 cuBLAS", "tinygemm", "library", "chunks"):
            best = min((r for r in rows if (r["in"], r["out"], r["bits"], r["variant"]) == (k, n, bits, name)),
                       key=lambda r: r["ms"], default=None)
            if best:
                print(f"{k}->{n} W{bits} {name:16s} {best['ms'] * 1e3:6.1f} us {100 * best['fraction_of_copy_bandwidth']:4.0f}% "
                      f"err {best['relative_error']:.1e} " + " ".join(f"{t}={best[t]}" for t in ("block_n", "chunks", "num_warps") if t in best))
        del linears, qs
        torch.cuda.empty_cache()
        save_result(out_dir / "quant_gemv_chunks.json", {"copy_bandwidth_bytes_per_s": bandwidth, "checks": checks, "rows": rows}, device)


if __name__ == "__main__":
    device = torch.device("cuda")
    with torch.no_grad():
        checks = check(device)
        from effml_lib.measure import device_slug
        bench(device, Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / device_slug(device), checks)
