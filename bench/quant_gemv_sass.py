"""The library GEMV's main loop, counted in SASS instructions offline (no GPU): as it is, and with the
RMSNorm's scaling of x patched into its x loads, to see what fusing the norm would cost.

    pip install --target /tmp/t36 triton==3.6.0      # the device's Triton (this machine's may be newer)
    TRITON_ALWAYS_COMPILE=1 PYTHONPATH=/tmp/t36 python bench/quant_gemv_sass.py

Compiles ``_quant_gemv_kernel`` for sm_90 (``triton.compile`` with a ``GPUTarget``, the divisibility-16
attributes Triton gives these sizes, bf16 activations, math 2), disassembles it with the wheel's
``cuobjdump`` and counts the instructions of the longest loop. The patched variants replace ``_x_words``;
``r`` is a stand-in constant and ``g`` is read 2**20 words past x (only the instruction count matters).
Results: bench/NOTES.md (the 2026-12-04 section).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import get_sass

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import effml_lib.kernels.quant_matmul as qm  # noqa: E402

G_OFFSET = tl.constexpr(1 << 20)  # where the stand-in norm weight's words start, past x's


def compile_gemv(bits: int, block_n: int, chunks: int, num_warps: int):
    fn = qm._quant_gemv_kernel
    types = {"x": "*i32", "words": "*i32", "scale": "*fp16", "zero": "*u8", "bias": "*bf16", "y": "*bf16"}
    constexprs = {"GROUP": 128 if bits == 4 else 4096, "BITS": bits, "HAS_BIAS": False, "OFFSET": False, "MATH": 2,
                  "X_F16": False, "BLOCK_N": block_n, "CHUNKS": chunks}
    names = list(fn.arg_names)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = ("x", "words", "scale", "zero", "bias", "y", "N", "K", "x_sm", "w_sn", "y_sm")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(c),): v for c, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def loop_instructions(kernel) -> int:
    """Instructions between a label and the last branch back to it, for the longest such stretch."""
    lines = get_sass(kernel.asm["cubin"]).splitlines()
    labels, longest = {}, 0
    for i, line in enumerate(lines):
        if line.endswith(":") and "\t" not in line:
            labels[line[:-1].strip()] = i
        m = re.search(r"BRA\s+(\S+);", line)
        if m and m.group(1) in labels:
            longest = max(longest, sum("\t" in x for x in lines[labels[m.group(1)]:i + 1]))
    return longest


@triton.jit
def _words(q, CHUNKS: tl.constexpr):
    even, odd = tl.split(tl.reshape(q, (CHUNKS, 2, 2)))  # as qm._x_words splits them
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    return a0, a1, a2, a3


@triton.jit
def _bf16_halves(q):
    return (q << 16).to(tl.float32, bitcast=True), ((q >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_words(lo, hi):
    lo16 = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo16 | (hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _x_and_g(xw_row, base, ok):
    """Four words of x from ``base`` (CHUNKS,) and the norm weight's words at the same place, as float32
    halves, and a stand-in r: what both scaling variants start from."""
    at = base[:, None] + tl.arange(0, 4)[None, :]
    lo, hi = _bf16_halves(tl.load(xw_row + at, mask=ok[:, None], other=0))
    g_lo, g_hi = _bf16_halves(tl.load(xw_row + G_OFFSET + at, mask=ok[:, None], other=0))
    return lo, hi, g_lo, g_hi, 1.2345


@triton.jit
def _x_words_exact(xw_row, base, ok, CHUNKS: tl.constexpr):
    """x * r rounded to bf16, times g rounded to bf16: the reference RMSNorm's roundings."""
    lo, hi, g_lo, g_hi, r = _x_and_g(xw_row, base, ok)
    lo = (lo * r).to(tl.bfloat16).to(tl.float32) * g_lo
    hi = (hi * r).to(tl.bfloat16).to(tl.float32) * g_hi
    return _words(_bf16_words(lo, hi), CHUNKS)


@triton.jit
def _x_words_fast(xw_row, base, ok, CHUNKS: tl.constexpr):
    """x * (r * g), rounded to bf16 once."""
    lo, hi, g_lo, g_hi, r = _x_and_g(xw_row, base, ok)
    return _words(_bf16_words(lo * (g_lo * r), hi * (g_hi * r)), CHUNKS)


@triton.jit
def _x_words_sum_of_squares(xw_row, base, ok, CHUNKS: tl.constexpr):
    """x unchanged, plus a float32 sum of its squares (kept alive by adding 0 * it to the words)."""
    q = tl.load(xw_row + base[:, None] + tl.arange(0, 4)[None, :], mask=ok[:, None], other=0)
    lo, hi = _bf16_halves(q)
    ss = tl.sum(lo * lo + hi * hi, axis=1)  # (CHUNKS,)
    return _words(q + (ss * 0.0).to(tl.int32)[:, None], CHUNKS)


VARIANTS = {"as now": qm._x_words, "x*r rounded, *g rounded": _x_words_exact, "x*(r*g)": _x_words_fast,
            "sum of x^2 only": _x_words_sum_of_squares}


def main():
    original = qm._x_words
    try:
        for bits, block_n, chunks, warps in ((4, 4, 64, 2), (4, 8, 64, 2), (8, 4, 64, 2)):
            counts = {}
            for name, x_words in VARIANTS.items():
                qm._x_words = x_words
                for f in (qm._quant_gemv_kernel, qm._step_math, qm._chunk4_pairs, qm._chunk8_pairs):
                    f.hash = None  # the patched helper changes these kernels' cache keys
                counts[name] = loop_instructions(compile_gemv(bits, block_n, chunks, warps))
            weights = block_n * 4 * (32 // bits)  # per thread and step: a chunk of 4 words from each row
            print(f"W{bits}, {block_n} rows x {chunks} chunks x {warps} warps ({weights} weights a step): "
                  + ", ".join(f"{name} {n} ({n / counts['as now'] - 1:+.0%})" for name, n in counts.items()))
    finally:
        qm._x_words = original


if __name__ == "__main__":
    main()
