"""Why is the W4A16 GEMV slow at batch 1, and what would make it fast? Variants, timed in one run.

    python bench/quant_gemv_variants.py             # on a GPU: bench/results/<device>/quant_gemv_variants.json
    TRITON_INTERPRET=1 python bench/quant_gemv_variants.py --check   # the variants' answers, on a CPU
    ncu -k regex:gemv python bench/quant_gemv_variants.py --profile  # a few calls of each, for a profiler

The library's GEMV (``kernels/quant_matmul.py``) reads ``codes`` as stored, ``(N, K / per_word)``
words: a thread's word feeds one output, and each of its lanes needs x at a stride of ``per_word``
elements, so x is loaded (or shuffled) once per lane and output. The variants here read the words
transposed, ``(K / per_word, N)`` (the layout of GPTQ's ``qweight``), with scales and zero points
``(K / G, N)``: a thread holds one word of 4 (or 8) neighbouring outputs, so one x load of a word's
lanes serves them all, and the group's scale multiplies a whole word's sum once
(``s * (sum_i q_i x_i - z * sum_i x_i)``).

First question, how a word's x reaches its lanes (``_gemv_t_kernel``):
- ``lanes``:  one strided load of x per lane;
- ``bcast``:  x as a ``(words, lanes)`` tile, broadcast against the words' unpacked lanes (3D);
- ``split``:  x as a ``(words, lanes)`` tile, its columns taken apart in registers (``tl.split``).

Second, fewer instructions per weight (``_gemv_unit_kernel``, ``unit`` and ``unit+prefetch``): each
lane becomes ``u = 1 + q / L`` (``L = 2**bits``) by one shift and one and-or into the top mantissa bits of
1.0 (no int-to-float conversion, no subtraction; for 8 bits an and-xor, q being the int8 code + 128 and
z = 128), so ``sum_i (q_i - z) x_i = L sum_i u_i x_i - (L + z) sum_i x_i``
costs one fused multiply-add per weight; x is multiplied by ``L`` once per word for all outputs; the
two bit masks are kernel arguments (as constants, ptxas rebuilds them in a register before every
lane); ``+prefetch`` issues the next step's loads before this step's arithmetic.

Third, two weights per instruction (``_gemv_pairs_kernel``, ``pairs``, GPU only): inline PTX turns a
word into four float16 pairs with one ``lop3`` each and multiplies them in ``fma.rn.f16x2``, as the fast
int4 kernels do (float16 products, four summed per half: checked to 2e-3 of the largest output).
``EFFML_GEMV_VARIANTS=unit,pairs`` runs some variants only (the baselines always run).

``bench/quant_read_probe.py`` measures the floor: a kernel that only reads the same words.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from effml_lib.kernels.quant_matmul import _as_float  # noqa: E402  (the library's exact code -> float32)
from effml_lib.quant import QuantLinear  # noqa: E402

XMODES = {"lanes": 0, "bcast": 1, "split": 2}


@triton.jit
def _lane_code(word, shift, BITS: tl.constexpr):
    v = (word >> shift) & ((1 << BITS) - 1)
    if BITS == 8:
        v = v ^ 0x80  # int8 -> offset binary 1..255 (the zero point is 128)
    return _as_float(v)


@triton.jit
def _split8(xs, WORDS: tl.constexpr):
    """(WORDS, 8) -> its 8 columns, each (WORDS,); lane = 4a + 2b + c."""
    c0, c1 = tl.split(tl.reshape(xs, (WORDS, 2, 2, 2)))  # (WORDS, 2, 2): c = 0, 1
    b00, b01 = tl.split(c0)  # (WORDS, 2): (b, c) = (0, 0), (1, 0)
    b10, b11 = tl.split(c1)
    x0, x4 = tl.split(b00)
    x2, x6 = tl.split(b01)
    x1, x5 = tl.split(b10)
    x3, x7 = tl.split(b11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _gemv_t_kernel(x, words, scale, zero, y, N, KW, x_sm, y_sm,
                   GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                   XMODE: tl.constexpr):
    pid_n, row = tl.program_id(0), tl.program_id(1)
    PER_WORD: tl.constexpr = 32 // BITS
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_ok = n < N
    lanes = tl.arange(0, PER_WORD)
    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    for w0 in range(0, KW, WORDS):
        wk = w0 + tl.arange(0, WORDS)  # (WORDS,) word index along K
        ok = (wk < KW)[:, None] & n_ok[None, :]
        word = tl.load(words + wk[:, None] * N + n[None, :], mask=ok, other=0)  # (WORDS, BLOCK_N) int32
        g = (wk * PER_WORD) // GROUP
        s = tl.load(scale + g[:, None] * N + n[None, :], mask=ok, other=0.0).to(tl.float32)
        if BITS == 4:
            z = tl.load(zero + g[:, None] * N + n[None, :], mask=ok, other=0).to(tl.float32)
        else:
            z = tl.full((WORDS, BLOCK_N), 128.0, tl.float32)
        xrow = x + row * x_sm
        if XMODE == 0:
            dot = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((WORDS,), dtype=tl.float32)
            for lane in tl.static_range(PER_WORD):
                xl = tl.load(xrow + wk * PER_WORD + lane, mask=wk < KW, other=0.0).to(tl.float32)
                dot += _lane_code(word, BITS * lane, BITS) * xl[:, None]
                xsum += xl
        elif XMODE == 1:
            xs = tl.load(xrow + wk[:, None] * PER_WORD + lanes[None, :], mask=(wk < KW)[:, None], other=0.0).to(tl.float32)
            q = _lane_code(word[:, :, None], (lanes * BITS)[None, None, :], BITS)  # (WORDS, BLOCK_N, PER_WORD)
            dot = tl.sum(q * xs[:, None, :], axis=2)
            xsum = tl.sum(xs, axis=1)
        else:
            xs = tl.load(xrow + wk[:, None] * PER_WORD + lanes[None, :], mask=(wk < KW)[:, None], other=0.0).to(tl.float32)
            x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xs, WORDS)
            dot = _lane_code(word, 0, BITS) * x0[:, None] + _lane_code(word, 4, BITS) * x1[:, None]
            dot += _lane_code(word, 8, BITS) * x2[:, None] + _lane_code(word, 12, BITS) * x3[:, None]
            dot += _lane_code(word, 16, BITS) * x4[:, None] + _lane_code(word, 20, BITS) * x5[:, None]
            dot += _lane_code(word, 24, BITS) * x6[:, None] + _lane_code(word, 28, BITS) * x7[:, None]
            xsum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        acc += s * (dot - z * xsum[:, None])
    out = tl.sum(acc, axis=0)  # (BLOCK_N,)
    tl.store(y + row * y_sm + n, out.to(y.dtype.element_ty), mask=n_ok)


@triton.jit
def _split4(xs, WORDS: tl.constexpr):
    """(WORDS, 4) -> its 4 columns; lane = 2b + c."""
    c0, c1 = tl.split(tl.reshape(xs, (WORDS, 2, 2)))
    x0, x2 = tl.split(c0)
    x1, x3 = tl.split(c1)
    return x0, x1, x2, x3


@triton.jit
def _step_loads(xrow, words, scale, zero, N, KW, n, w0,
             GROUP: tl.constexpr, BITS: tl.constexpr, WORDS: tl.constexpr, PER_ROW: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    wk = w0 + tl.arange(0, WORDS)
    ok = (wk < KW)[:, None]
    xs = tl.load(xrow + wk[:, None] * PER_WORD + tl.arange(0, PER_WORD)[None, :], mask=ok, other=0.0)
    word = tl.load(words + wk[:, None] * N + n[None, :], mask=ok, other=0)
    if PER_ROW:
        s = tl.zeros((WORDS, 4), dtype=tl.float16)
        z = tl.zeros((WORDS, 4), dtype=tl.uint8)
    else:
        g = (wk * PER_WORD) // GROUP
        s = tl.load(scale + g[:, None] * N + n[None, :], mask=ok, other=0.0)
        if BITS == 4:
            z = tl.load(zero + g[:, None] * N + n[None, :], mask=ok, other=0)
        else:
            z = tl.zeros((WORDS, 4), dtype=tl.uint8)
    return xs, word, s, z


@triton.jit
def _unit(word, lane: tl.constexpr, BITS: tl.constexpr, mask, one):
    TOP: tl.constexpr = 23 - BITS
    AT: tl.constexpr = BITS * lane
    if AT <= TOP:
        v = word << (TOP - AT)
    else:
        v = word >> (AT - TOP)
    if BITS == 8:
        return ((v & mask) ^ one).to(tl.float32, bitcast=True)
    return ((v & mask) | one).to(tl.float32, bitcast=True)


@triton.jit
def _step_math(acc, xs, word, s, z, mask, one, WORDS: tl.constexpr, BITS: tl.constexpr, PER_ROW: tl.constexpr):
    L: tl.constexpr = 1 << BITS
    xs = xs.to(tl.float32)
    xsum = tl.sum(xs, axis=1)
    xl = xs * L
    if BITS == 4:
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xl, WORDS)
        d = _unit(word, 0, BITS, mask, one) * x0[:, None]
        d += _unit(word, 1, BITS, mask, one) * x1[:, None]
        d += _unit(word, 2, BITS, mask, one) * x2[:, None]
        d += _unit(word, 3, BITS, mask, one) * x3[:, None]
        d += _unit(word, 4, BITS, mask, one) * x4[:, None]
        d += _unit(word, 5, BITS, mask, one) * x5[:, None]
        d += _unit(word, 6, BITS, mask, one) * x6[:, None]
        d += _unit(word, 7, BITS, mask, one) * x7[:, None]
    else:
        x0, x1, x2, x3 = _split4(xl, WORDS)
        d = _unit(word, 0, BITS, mask, one) * x0[:, None]
        d += _unit(word, 1, BITS, mask, one) * x1[:, None]
        d += _unit(word, 2, BITS, mask, one) * x2[:, None]
        d += _unit(word, 3, BITS, mask, one) * x3[:, None]
    if PER_ROW:
        return acc + d
    if BITS == 4:
        zl = (z.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 - L)
    else:
        zl = 128.0 + L
    return acc + s.to(tl.float32) * (d - zl * xsum[:, None])


@triton.jit
def _gemv_unit_kernel(x, words, scale, zero, y, N, KW, x_sm, y_sm, mask, one,
                    GROUP: tl.constexpr, BITS: tl.constexpr, WORDS: tl.constexpr, PER_ROW: tl.constexpr,
                    PREFETCH: tl.constexpr):
    pid_n, row = tl.program_id(0), tl.program_id(1)
    PER_WORD: tl.constexpr = 32 // BITS
    L: tl.constexpr = 1 << BITS
    n = pid_n * 4 + tl.arange(0, 4)
    xrow = x + row * x_sm
    acc = tl.zeros((WORDS, 4), dtype=tl.float32)
    if PREFETCH:
        xs, word, s, z = _step_loads(xrow, words, scale, zero, N, KW, n, 0, GROUP, BITS, WORDS, PER_ROW)
        for w0 in range(WORDS, KW + WORDS, WORDS):
            xs2, word2, s2, z2 = _step_loads(xrow, words, scale, zero, N, KW, n, w0, GROUP, BITS, WORDS, PER_ROW)
            acc = _step_math(acc, xs, word, s, z, mask, one, WORDS, BITS, PER_ROW)
            xs, word, s, z = xs2, word2, s2, z2
    else:
        for w0 in range(0, KW, WORDS):
            xs, word, s, z = _step_loads(xrow, words, scale, zero, N, KW, n, w0, GROUP, BITS, WORDS, PER_ROW)
            acc = _step_math(acc, xs, word, s, z, mask, one, WORDS, BITS, PER_ROW)
    out = tl.sum(acc, axis=0)
    if PER_ROW:
        k = tl.arange(0, 4096)
        xsum = 0.0
        for k0 in range(0, KW * PER_WORD, 4096):
            xsum += tl.sum(tl.load(xrow + k0 + k, mask=k0 + k < KW * PER_WORD, other=0.0).to(tl.float32), axis=0)
        sr = tl.load(scale + n).to(tl.float32)
        if BITS == 4:
            zl = tl.load(zero + n).to(tl.float32) + L
        else:
            zl = 128.0 + L
        out = sr * (out - zl * xsum)
    tl.store(y + row * y_sm + n, out.to(y.dtype.element_ty))



class TransposedQuant:
    """A QuantLinear's weight in the variants' layout: words ``(K / per_word, N)`` int32, scale and zero
    ``(K / G, N)``."""

    def __init__(self, q: QuantLinear):
        if q.offset is not None:
            raise ValueError("the variants take the zero-point form (no offsets)")
        self.bits, self.group_size, self.in_features, self.out_features = q.bits, q.group_size, q.in_features, q.out_features
        self.words = q.codes.contiguous().view(torch.int32).t().contiguous()  # (KW, N)
        self.scale = q.scale.t().contiguous()  # (G, N)
        self.zero = None if q.zero is None else q.zero.t().contiguous()
        self.weight_bytes = q.weight_bytes

    def _out(self, x):
        x2 = x.reshape(-1, self.in_features)
        return x2, torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)

    def __call__(self, x, xmode="split", block_n=4, words=256, num_warps=4):
        if xmode == "split" and self.bits != 4:
            raise ValueError("split takes 8 lanes: 4 bits only")
        x2, y = self._out(x)
        _gemv_t_kernel[(triton.cdiv(self.out_features, block_n), x2.shape[0])](
            x2, self.words, self.scale, self.scale if self.zero is None else self.zero, y,
            self.out_features, self.words.shape[0], x2.stride(0), y.stride(0),
            GROUP=self.group_size, BITS=self.bits, BLOCK_N=block_n, WORDS=words, XMODE=XMODES[xmode],
            num_warps=num_warps)
        return y

    def unit(self, x, words=128, num_warps=2, prefetch=True):
        if self.out_features % 4:
            raise ValueError(f"unit takes outputs four at a time, got {self.out_features}")
        x2, y = self._out(x)
        top = 23 - self.bits  # the code's lowest bit in the float
        mask, one = ((1 << self.bits) - 1) << top, 0x3F800000 | (0x80 << top if self.bits == 8 else 0)
        _gemv_unit_kernel[(self.out_features // 4, x2.shape[0])](
            x2, self.words, self.scale, self.scale if self.zero is None else self.zero, y,
            self.out_features, self.words.shape[0], x2.stride(0), y.stride(0), mask, one,
            GROUP=self.group_size, BITS=self.bits, WORDS=words, PER_ROW=self.group_size == self.in_features,
            PREFETCH=prefetch, num_warps=num_warps)
        return y

    def pairs(self, x, words=128, num_warps=2, tiles=1):
        if self.bits != 4 or self.out_features % (4 * tiles):
            raise ValueError(f"pairs: 4 bits, outputs {4 * tiles} at a time")
        x2, y = self._out(x)
        _gemv_pairs_kernel[(self.out_features // (4 * tiles), x2.shape[0])](
            x2, self.words, self.scale, self.zero, y, self.out_features, self.words.shape[0], x2.stride(0), y.stride(0),
            0x000F000F, 0x64006400, GROUP=self.group_size, WORDS=words, TILES=tiles, num_warps=num_warps)
        return y


def check(device) -> None:
    """Every variant against the reference on small ragged shapes (also under TRITON_INTERPRET=1)."""
    gen = torch.Generator().manual_seed(0)
    for bits, group, (k, n) in itertools.product((4, 8), (32, None), ((256, 12), (96, 8))):
        linear = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=gen))
        q = QuantLinear.from_linear(linear, bits, group, impl="torch")
        t = TransposedQuant(q.to(device))
        x = torch.randn(3, k, generator=gen).to(device)
        reference = F.linear(x, q.dequantized_weight().to(device))
        outs = {xmode: t(x, xmode, block_n=4, words=16, num_warps=1) for xmode in XMODES if xmode != "split" or bits == 4}
        outs["unit"] = t.unit(x, words=16, num_warps=1, prefetch=False)
        outs["unit+prefetch"] = t.unit(x, words=16, num_warps=1)
        if bits == 4 and device.type == "cuda":  # inline PTX: not under the interpreter
            outs["pairs"] = t.pairs(x, words=16, num_warps=1)
            outs["pairs x2"] = t.pairs(x, words=16, num_warps=1, tiles=2)
        for name, got in outs.items():
            error = ((got - reference).abs().max() / reference.abs().max()).item()
            limit = 2e-3 if name == "pairs" else 1e-5  # pairs: float16 products, half2 sums of four
            assert error < limit, f"{name} W{bits} g{group} {k}->{n}: relative error {error:.2e}"
        print(f"ok W{bits} group {group} {k}->{n}: {', '.join(outs)}")


NAMES = ("bf16 cuBLAS", "library", "tinygemm", *XMODES, "unit", "unit+prefetch", "pairs", "pairs x2")


def timed_row(calls, reference, nbytes: int, bandwidth: float, **fields) -> dict:
    """One variant's row: its graph time over ``calls`` (copies of the layer, so that none is read from L2),
    its share of the copy bandwidth on ``nbytes`` and its relative error against ``reference``."""
    from quant import graph_ms  # bench/quant.py

    err = ((calls[0]().float() - reference).norm() / reference.norm()).item()
    ms = graph_ms(calls, iters=40, rounds=5)
    return {**fields, "ms": ms, "fraction_of_copy_bandwidth": nbytes / (ms * 1e-3) / bandwidth, "relative_error": err}


def print_best(rows: list[dict], k: int, n: int, bits: int, names) -> None:
    """The fastest row of each variant on one layer, with its tiles."""
    for name in names:
        best = min((r for r in rows if (r["in"], r["out"], r["bits"], r["variant"]) == (k, n, bits, name)),
                   key=lambda r: r["ms"], default=None)
        if best:
            tiles = " ".join(f"{t}={best[t]}" for t in ("block_n", "words", "chunks", "num_warps") if t in best)
            print(f"{k}->{n} W{bits} {name:16s} {best['ms'] * 1e3:6.1f} us {100 * best['fraction_of_copy_bandwidth']:4.0f}% "
                  f"err {best['relative_error']:.1e} {tiles}")


def layer_with_baselines(k: int, n: int, bits: int, group, device, bandwidth: float, rows: list[dict]):
    """Copies of one random ``k -> n`` layer quantized to ``bits`` (enough that none is read from L2), x at
    batch 1, and ``record(name, calls, **tiles)``, which appends a :func:`timed_row` to ``rows``. Records the
    baselines first: bf16 cuBLAS on the float copies, tinygemm at 4 bits. Returns ``(qs, x, record)``."""
    from quant import Int4PackLinear, copies_for, random_linear  # bench/quant.py

    linears = [random_linear(k, n, device, i) for i in range(copies_for(k * n * bits // 8))]
    qs = [QuantLinear.from_linear(lin, bits, group, impl="triton") for lin in linears]
    nbytes = qs[0].weight_bytes  # the quantized layer's bytes (bf16 reads 16 / bits times more)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    reference = F.linear(x.float(), qs[0].dequantized_weight())

    def record(name, calls, **tiles):
        rows.append(timed_row(calls, reference, nbytes, bandwidth, **{"in": k, "out": n, "bits": bits,
                              "group_size": group, "variant": name}, **tiles))

    record("bf16 cuBLAS", [lambda lin=lin: lin(x) for lin in linears])
    if bits == 4:
        packs = [Int4PackLinear(q) for q in qs]
        record("tinygemm", [lambda p=p: p(x) for p in packs])
    return qs, x, record


def bench(device, out_dir: Path) -> None:
    from effml_lib.kernels import quant_matmul as qm
    from effml_lib.measure import copy_bandwidth, save_result

    bandwidth = copy_bandwidth(device, nbytes=2 * 2**30)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for (k, n), (bits, group) in itertools.product(((4096, 11008), (11008, 4096), (4096, 4096)), ((4, 128), (8, None))):
        qs, x, record = layer_with_baselines(k, n, bits, group, device, bandwidth, rows)
        ts = [TransposedQuant(q) for q in qs]
        record("library", [lambda q=q: qm.quant_matmul(x, q.codes, q.scale, q.zero, None, q.bits, q.group_size, q.in_features)
                           for q in qs])
        only = os.environ.get("EFFML_GEMV_VARIANTS")  # e.g. "unit,pairs": some variants only
        for xmode in XMODES:
            if (xmode == "split" and bits != 4) or (only and xmode not in only.split(",")):
                continue
            for block_n, words, warps in itertools.product((4, 8), (128, 256, 512), (2, 4, 8)):
                if words < 16 * warps:
                    continue
                record(xmode, [lambda t=t: t(x, xmode, block_n, words, warps) for t in ts],
                       block_n=block_n, words=words, num_warps=warps)
        for words, warps, prefetch in itertools.product((128, 256, 512), (2, 4, 8), (False, True)):
            if words < 32 * warps or (only and "unit" not in only.split(",")):
                continue
            record("unit+prefetch" if prefetch else "unit", [lambda t=t: t.unit(x, words, warps, prefetch) for t in ts],
                   words=words, num_warps=warps)
        for words, warps in itertools.product((64, 128, 256), (1, 2, 4)):
            if bits == 4 and words >= 32 * warps and (not only or "pairs" in only.split(",")):
                record("pairs", [lambda t=t: t.pairs(x, words, warps) for t in ts], words=words, num_warps=warps)
                record("pairs x2", [lambda t=t: t.pairs(x, words, warps, 2) for t in ts], words=words, num_warps=warps)
        print_best(rows, k, n, bits, NAMES)
        del qs, ts, record
        torch.cuda.empty_cache()
        save_result(out_dir / "quant_gemv_variants.json", {"copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, device)


def profile(device) -> None:
    """A few calls of the library's GEMV, the unit and pairs variants and tinygemm on 4096 -> 11008, W4 g128."""
    from quant import Int4PackLinear, random_linear

    from effml_lib.kernels import quant_matmul as qm

    q = QuantLinear.from_linear(random_linear(4096, 11008, device, 0), 4, 128, impl="triton")
    t, pack = TransposedQuant(q), Int4PackLinear(q)
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        qm.quant_matmul(x, q.codes, q.scale, q.zero, None, 4, 128, 4096)
        t.unit(x)
        t.pairs(x)
        pack(x)
    torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare the variants' answers with the reference")
    p.add_argument("--profile", action="store_true", help="a few calls of each kernel, for ncu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        if args.profile:
            return profile(device)
        check(device)
        if not args.check:
            from effml_lib.measure import device_slug
            bench(device, Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device))


# --- pairs: two weights per instruction, in PTX (GPU only: the interpreter cannot run inline assembly) ---

# A word's 8 codes become 4 half2 pairs (lanes j and j + 4) with one lop3 each: the code in a float16's low
# mantissa bits under 0x6400 (1024.0) reads 1024 + q, exactly. Subtracting 1024 + z (a half2 of the group's
# zero point) leaves q - z, exactly; products with x / 16 (so that |x| up to 65504 cannot overflow) are summed
# in half2, four per half, then the two halves in float32.
_PAIR_DOT = tl.constexpr("""{
.reg .b32 q0, q1, q2, q3, t, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
lop3.b32 q0, $1, $7, $8, 0xEA;
shr.b32 t, $1, 4;
lop3.b32 q1, t, $7, $8, 0xEA;
shr.b32 t, $1, 8;
lop3.b32 q2, t, $7, $8, 0xEA;
shr.b32 t, $1, 12;
lop3.b32 q3, t, $7, $8, 0xEA;
sub.f16x2 q0, q0, $2;
sub.f16x2 q1, q1, $2;
sub.f16x2 q2, q2, $2;
sub.f16x2 q3, q3, $2;
mul.rn.f16x2 acc, q0, $3;
fma.rn.f16x2 acc, q1, $4, acc;
fma.rn.f16x2 acc, q2, $5, acc;
fma.rn.f16x2 acc, q3, $6, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}""")


@triton.jit
def _half2(lo, hi):
    """Two float32 tensors as float16 pairs in int32: ``lo`` in the low half."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [hi, lo], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _pair_tile(acc, word, s, z, p0, p1, p2, p3, pair_mask, pair_one, WORDS: tl.constexpr):
    """acc + scale * sum_i (q_i - z) x_i / 16 for one (WORDS, 4) tile of words, x as float16 pairs."""
    z2 = (z.to(tl.int32) * 0x10001) | 0x64006400  # (WORDS, 4): 1024 + z in both halves
    d = tl.inline_asm_elementwise(_PAIR_DOT, "=r,r,r,r,r,r,r,r,r",
                                  [word, z2, p0[:, None], p1[:, None], p2[:, None], p3[:, None],
                                   tl.full((WORDS, 4), pair_mask, tl.int32), tl.full((WORDS, 4), pair_one, tl.int32)],
                                  dtype=tl.float32, is_pure=True, pack=1)
    return acc + s.to(tl.float32) * d


@triton.jit
def _gemv_pairs_kernel(x, words, scale, zero, y, N, KW, x_sm, y_sm, pair_mask, pair_one,
                       GROUP: tl.constexpr, WORDS: tl.constexpr, TILES: tl.constexpr):
    # pair_mask = 0x000F000F, pair_one = 0x64006400: arguments, so that they sit in registers once.
    # TILES = 2: a program also takes the 4 outputs N / 2 further on, converting each x pair once for 8.
    pid_n, row = tl.program_id(0), tl.program_id(1)
    n = pid_n * 4 + tl.arange(0, 4)
    half = N // 2
    xrow = x + row * x_sm
    acc = tl.zeros((WORDS, 4), dtype=tl.float32)
    acc2 = tl.zeros((WORDS, 4), dtype=tl.float32)
    for w0 in range(0, KW, WORDS):
        xs, word, s, z = _step_loads(xrow, words, scale, zero, N, KW, n, w0, GROUP, 4, WORDS, False)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xs.to(tl.float32) * 0.0625, WORDS)
        p0, p1, p2, p3 = _half2(x0, x4), _half2(x1, x5), _half2(x2, x6), _half2(x3, x7)  # (WORDS,) each
        acc = _pair_tile(acc, word, s, z, p0, p1, p2, p3, pair_mask, pair_one, WORDS)
        if TILES == 2:
            _, word2, s2, z2 = _step_loads(xrow, words, scale, zero, N, KW, n + half, w0, GROUP, 4, WORDS, False)
            acc2 = _pair_tile(acc2, word2, s2, z2, p0, p1, p2, p3, pair_mask, pair_one, WORDS)
    tl.store(y + row * y_sm + n, (tl.sum(acc, axis=0) * 16.0).to(y.dtype.element_ty))
    if TILES == 2:
        tl.store(y + row * y_sm + n + half, (tl.sum(acc2, axis=0) * 16.0).to(y.dtype.element_ty))


if __name__ == "__main__":
    main()
