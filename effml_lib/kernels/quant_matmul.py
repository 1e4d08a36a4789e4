"""Weight-only quantized matmul: ``y = x Wᵀ`` with ``W`` dequantized inside the kernel (W8A16 / W4A16).

A decode step is bound by the bytes of weights it reads, so a 4-bit weight makes it up to 4x faster
than bf16 only if the weight is never written back to memory at full width. Here each program loads
codes as 32-bit words (eight 4-bit codes or four 8-bit codes each), with their groups' scales and zero
points, turns each word's lanes into weights in registers and multiplies them with the activations: the
full-width weight exists only inside the kernel.

Two kernels, one answer:
- the GEMV (decode, up to ``GEMV_MAX_ROWS`` rows): products on the CUDA cores, one row of x per
  program, each thread a chunk of four words from each of its rows; with 16-bit activations on a GPU,
  two weights per instruction (float16 pairs built from the codes' bits, in inline PTX; a plain-Triton
  copy of the same bit tricks is what the interpreter runs);
- the GEMM (prefill, batches, and layers whose rows or groups are not whole chunks): each dequantized
  tile serves BLOCK_M rows on the tensor cores.

Layout (``effml_lib.quant.QuantLinear``'s buffers): ``codes`` int8 ``(N, K)`` (8 bits) or uint8
``(N, K / 2)`` with element ``2i`` in the low nibble (4 bits), so word ``w`` holds weights
``(32 / bits) * w + lane`` in lane order; ``scale`` float16 ``(N, K / G)``; ``zero`` uint8 ``(N, K / G)``
(4 bits), or instead ``offset`` float16 ``(N, K / G)`` (4 bits, GGUF's Q4_1: ``code * scale + offset``).
The kernels need whole words per row and groups of whole words (``K`` and ``G`` multiples of 8 for 4
bits, of 4 for 8 bits: :func:`fits`); ``QuantLinear`` uses the PyTorch reference otherwise. Runs on
CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI proves it without a GPU). The weight is the
reference's ``(code - zero) * scale`` (or ``code * scale + offset``). With float32 inputs both kernels
compute it in float32 as ``code * scale + shift`` (``shift = -zero * scale``, or the offset) and their
products are float32, equal to the reference up to float32 rounding. With 16-bit inputs the GEMV's
products are float16 pairs of ``(code - zero)`` (exact) and x rounded to float16 (exact for bf16 values
of float16's range, down to its subnormals near 6e-5), summed in float16 over a chunk, scaled and summed
in float32; the GEMM rounds the weight tile to x's dtype for the tensor cores (as the
reference's dequantized weight is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device import triton_interpreter_enabled


@triton.jit
def _as_float(code):
    """Small non-negative int32 codes as exact float32, without the slow int-to-float conversion unit:
    ``0x4B000000`` is 2**23 as a float, whose mantissa's last bits then hold the code."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _word_scales(scale, zero, n, n_ok, k0, K, s_sn, s_sg,
                 GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SEG: tl.constexpr, OFFSET: tl.constexpr):
    """Scale and shift of every word of a step, ``(BLOCK_N, BLOCK_K / per_word)`` each, so that a lane's
    weight is ``float(lane) * scale + shift``. A step is NSEG segments of SEG weights, each inside one
    group: one scale (and zero point) load per segment. With OFFSET, ``zero`` points to the float16
    offsets, which are the shift."""
    PER_WORD: tl.constexpr = 32 // BITS
    NSEG: tl.constexpr = BLOCK_K // SEG
    seg_start = k0 + tl.arange(0, NSEG) * SEG  # (NSEG,)
    seg_ok = n_ok[:, None] & (seg_start[None, :] < K)  # (BLOCK_N, NSEG)
    group = seg_start // GROUP
    s = tl.load(scale + n[:, None] * s_sn + group[None, :] * s_sg, mask=seg_ok, other=0.0).to(tl.float32)
    if OFFSET:  # q * s + offset
        shift = tl.load(zero + n[:, None] * s_sn + group[None, :] * s_sg, mask=seg_ok, other=0.0).to(tl.float32)
    else:
        if BITS == 4:  # (q - z) * s = q * s - z * s
            z = tl.load(zero + n[:, None] * s_sn + group[None, :] * s_sg, mask=seg_ok, other=0).to(tl.float32)
        else:  # int8 lanes are read offset by 128 (0..255), so the zero point is 128
            z = tl.full((BLOCK_N, NSEG), 128.0, tl.float32)
        shift = -z * s
    if NSEG > 1:  # (BLOCK_N, NSEG) -> every word of its segment: (BLOCK_N, BLOCK_K / PER_WORD)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NSEG, SEG // PER_WORD)), (BLOCK_N, BLOCK_K // PER_WORD))
        shift = tl.reshape(tl.broadcast_to(shift[:, :, None], (BLOCK_N, NSEG, SEG // PER_WORD)), (BLOCK_N, BLOCK_K // PER_WORD))
    return s, shift


@triton.jit
def _lane(word, lane: tl.constexpr, BITS: tl.constexpr):
    """Lane ``lane`` of each 32-bit word as an exact float code: 0..15 (4 bits) or int8 + 128 (8 bits)."""
    v = (word >> (BITS * lane)) & ((1 << BITS) - 1)
    if BITS == 8:
        v = v ^ 0x80  # two's complement -> offset binary: -127..127 becomes 1..255
    return _as_float(v)


# --- The GEMV: chunks of four words, two weights per instruction -------------------------------------------
#
# A thread takes a chunk of four consecutive words of codes (32 weights at 4 bits, 16 at 8) from each of
# the BLOCK_N rows of W it owns (one 16-byte load per row), and the chunk's activations once for all of
# them. A chunk lies inside one group (``fits_gemv``), so each row's chunk needs one scale and one zero
# point. Three ways to compute a chunk's sum, one answer (MATH):
#   0  float32: each lane's code as an exact float, one multiply-add for the weight, one for the product
#      (float32 inputs);
#   1  pairs, in plain Triton: the bit manipulation of 2, each half of a float16 pair computed apart in
#      float32 (how CI proves 2's bit tricks on a CPU: the interpreter cannot run inline assembly);
#   2  pairs, in PTX (16-bit inputs on a GPU): one ``lop3`` turns two codes of a word into a float16
#      pair ``(16 + q / 64)`` (4 bits; ``4 + u / 256`` for the offset-binary bytes of 8 bits), one
#      ``sub``/``fma`` removes the magic and the zero point exactly, leaving ``(q - z) / 64``, and one
#      ``fma.rn.f16x2`` multiplies two weights with their activations. The chunk's products are summed in
#      float16, then in float32: 16 products of at most 15/64 |x| per half at 4 bits, 8 of at most
#      128/256 |x| at 8, so a half's sum stays below 4 max|x|, within float16's 65504 for |x| < 16000
#      (beyond, the output is inf or NaN: activations that large need the float32 path).
# x reaches the chunk as 32-bit words of two 16-bit activations, regrouped into the float16 pairs
# that match the codes' pairs: lanes ``(l, l + 4)`` of a 4-bit word, ``(l, l + 2)`` of an 8-bit one.

_W4_MAGIC, _W4_LO, _W4_HI = 0x4C004C00, 0x000F000F, 0x00F000F0  # 16.0 in both halves; lanes l and l + 4
_W8_MAGIC, _W8_MASK = 0x44804480, 0x00FF00FF  # 4.5: 4.0 plus the offset binary's 128 / 256, xor-ed in
_SIXTEENTH = 0x2C002C00  # float16 1/16 in both halves


def _pairs_ptx(bits: int) -> str:
    """PTX for one row's chunk: $0 = sum over four words of ``(q - z) * x``, divided by UNIT, in float32.
    Operands: $1-$4 the words, then the x pairs (4 per word at 4 bits, 2 at 8), then za, nzb, and the
    constants (see ``_chunk4_pairs`` and ``_chunk8_pairs``)."""
    n_pairs = 4 if bits == 4 else 2
    x0 = 5
    za, nzb = x0 + 4 * n_pairs, x0 + 4 * n_pairs + 1
    c = nzb + 1  # constants: magic, mask(s), 1/16
    lines = [".reg .b32 t, e, o, acc;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;"]
    first = True
    for j in range(4):
        w = f"${1 + j}"
        xs = [f"${x0 + n_pairs * j + p}" for p in range(n_pairs)]
        for half, src in enumerate((w, "t")):
            if half:
                lines.append(f"shr.b32 t, {w}, 8;")
            if bits == 4:  # lanes (2h, 2h + 4) and (2h + 1, 2h + 5), h = half
                lines += [f"lop3.b32 e, {src}, ${c + 1}, ${c}, 0xEA;",  # (src & lo) | magic
                          f"lop3.b32 o, {src}, ${c + 2}, ${c}, 0xEA;",
                          f"sub.f16x2 e, e, ${za};",  # 16 + q / 64 - (16 + z / 64)
                          f"fma.rn.f16x2 o, o, ${c + 3}, ${nzb};"]  # (16 + q / 4) / 16 - (1 + z / 64)
                pairs = [("e", xs[2 * half]), ("o", xs[2 * half + 1])]
            else:  # lanes (h, h + 2): bytes into the low halves, the sign bit flipped on the way
                lines += [f"lop3.b32 e, {src}, ${c + 1}, ${c}, 0x6A;",  # mask ? src ^ magic : magic
                          f"sub.f16x2 e, e, ${za};"]  # 4 + u / 256 - 4.5
                pairs = [("e", xs[half])]
            for reg, xp in pairs:
                lines.append(f"mul.rn.f16x2 acc, {reg}, {xp};" if first else f"fma.rn.f16x2 acc, {reg}, {xp}, acc;")
                first = False
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;"]
    return "{\n" + "\n".join(lines) + "\n}"


_PAIRS_PTX_4 = tl.constexpr(_pairs_ptx(4))
_PAIRS_PTX_8 = tl.constexpr(_pairs_ptx(8))


@triton.jit
def _f16_bits(v):
    """float32 -> its float16 (rounded to nearest) as 16 bits in an int32."""
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _f16_value(bits):
    """The low 16 bits of an int32, read as a float16, as float32."""
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _x_pair(u, v, HIGH: tl.constexpr, X_F16: tl.constexpr, MATH: tl.constexpr):
    """A float16 pair from two words of two 16-bit activations: u's low (or, HIGH, high) activation in
    the low half, v's in the high half."""
    if MATH == 2:
        if X_F16:  # already float16: pick the halves
            if HIGH:
                return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [u, v], dtype=tl.int32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [u, v], dtype=tl.int32, is_pure=True, pack=1)
        if HIGH:  # bfloat16 -> float32 is the top 16 bits of a float32; then two float32 -> a float16 pair
            return tl.inline_asm_elementwise(
                "{.reg .b32 a, b; and.b32 a, $1, 0xFFFF0000; and.b32 b, $2, 0xFFFF0000; cvt.rn.f16x2.f32 $0, b, a;}",
                "=r,r,r", [u, v], dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{.reg .b32 a, b; shl.b32 a, $1, 16; shl.b32 b, $2, 16; cvt.rn.f16x2.f32 $0, b, a;}",
            "=r,r,r", [u, v], dtype=tl.int32, is_pure=True, pack=1)
    if HIGH:
        u, v = u >> 16, v >> 16
    if X_F16:
        return (u & 0xFFFF) | (v << 16)
    lo = _f16_bits((u << 16).to(tl.float32, bitcast=True))
    hi = _f16_bits((v << 16).to(tl.float32, bitcast=True))
    return lo | (hi << 16)


@triton.jit
def _word4_pairs(w, X0, X1, X2, X3, za, nzb, MAGIC, LO, HI):
    """Plain Triton of one 4-bit word in _PAIRS_PTX_4: the same bits, each half in float32."""
    d = tl.zeros(w.shape, tl.float32)
    t = w
    for half in tl.static_range(2):
        if half == 1:
            t = w >> 8
        e = (t & LO) | MAGIC  # (16 + q / 64) in both halves
        o = (t & HI) | MAGIC  # (16 + q / 4)
        e_lo, e_hi = _f16_value(e) - _f16_value(za), _f16_value(e >> 16) - _f16_value(za >> 16)
        o_lo, o_hi = _f16_value(o) * 0.0625 + _f16_value(nzb), _f16_value(o >> 16) * 0.0625 + _f16_value(nzb >> 16)
        xa = X0 if half == 0 else X2
        xb = X1 if half == 0 else X3
        d += e_lo * _f16_value(xa) + e_hi * _f16_value(xa >> 16) + o_lo * _f16_value(xb) + o_hi * _f16_value(xb >> 16)
    return d


@triton.jit
def _word8_pairs(w, X0, X1, za, MAGIC, MASK):
    """Plain Triton of one 8-bit word in _PAIRS_PTX_8."""
    e0 = (w & MASK) ^ MAGIC  # bytes 0 and 2 as 4 + u / 256, u the offset-binary code
    e1 = ((w >> 8) & MASK) ^ MAGIC  # bytes 1 and 3
    z_lo, z_hi = _f16_value(za), _f16_value(za >> 16)
    d = (_f16_value(e0) - z_lo) * _f16_value(X0) + (_f16_value(e0 >> 16) - z_hi) * _f16_value(X0 >> 16)
    return d + (_f16_value(e1) - z_lo) * _f16_value(X1) + (_f16_value(e1 >> 16) - z_hi) * _f16_value(X1 >> 16)


@triton.jit
def _x_word_sum(a, X_F16: tl.constexpr):
    """The two 16-bit activations of a word of x, summed in float32."""
    if X_F16:
        return _f16_value(a) + _f16_value(a >> 16)
    lo = tl.cast(a << 16, tl.float32, bitcast=True)  # a bfloat16 is the top half of a float32
    hi = tl.cast((a >> 16) << 16, tl.float32, bitcast=True)
    return lo + hi


@triton.jit
def _x_pairs4(a0, a1, a2, a3, X_F16: tl.constexpr, MATH: tl.constexpr):
    """One 4-bit word's 8 activations (4 words of x, ``(x0, x1) .. (x6, x7)``) as the pairs (l, l + 4),
    l = 0..3, and their float32 sum."""
    total = _x_word_sum(a0, X_F16) + _x_word_sum(a1, X_F16) + _x_word_sum(a2, X_F16) + _x_word_sum(a3, X_F16)
    return (_x_pair(a0, a2, False, X_F16, MATH), _x_pair(a0, a2, True, X_F16, MATH),
            _x_pair(a1, a3, False, X_F16, MATH), _x_pair(a1, a3, True, X_F16, MATH), total)


@triton.jit
def _x_pairs8(a0, a1, X_F16: tl.constexpr, MATH: tl.constexpr):
    """One 8-bit word's 4 activations (2 words of x) as the pairs (0, 2) and (1, 3)."""
    return _x_pair(a0, a1, False, X_F16, MATH), _x_pair(a0, a1, True, X_F16, MATH)


@triton.jit
def _x_words(xw_row, base, ok, CHUNKS: tl.constexpr):
    """Four consecutive words of x from ``base`` (CHUNKS,): one 16-byte load per chunk, split in registers
    (four 4-byte loads instead made the whole GEMV 25% slower on an H200: bench/NOTES.md)."""
    q = tl.load(xw_row + base[:, None] + tl.arange(0, 4)[None, :], mask=ok[:, None], other=0)  # (CHUNKS, 4)
    even, odd = tl.split(tl.reshape(q, (CHUNKS, 2, 2)))  # words (0, 2) and (1, 3)
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    return a0, a1, a2, a3


@triton.jit
def _split4(w4, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """(BLOCK_N, CHUNKS, 4) -> its four (BLOCK_N, CHUNKS) words; in registers when a thread holds all four."""
    even, odd = tl.split(tl.reshape(w4, (BLOCK_N, CHUNKS, 2, 2)))  # words (0, 2) and (1, 3)
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return w0, w1, w2, w3


@triton.jit
def _chunk_float32(x_row, w0, w1, w2, w3, ch, ch_ok, s, shift, BITS: tl.constexpr):
    """sum over a chunk's lanes of (code * scale + shift) * x, all in float32: (BLOCK_N, CHUNKS)."""
    PER_WORD: tl.constexpr = 32 // BITS
    k0 = ch * 4 * PER_WORD  # (CHUNKS,) the chunk's first weight
    acc = tl.zeros(w0.shape, tl.float32)
    for j in tl.static_range(4):
        w = w0 if j == 0 else (w1 if j == 1 else (w2 if j == 2 else w3))
        for lane in tl.static_range(PER_WORD):
            xl = tl.load(x_row + k0 + j * PER_WORD + lane, mask=ch_ok, other=0.0).to(tl.float32)
            acc += (_lane(w, lane, BITS) * s + shift) * xl[None, :]
    return acc


@triton.jit
def _chunk4_pairs(xw_row, w0, w1, w2, w3, ch, ch_ok, za, nzb, MAGIC, LO, HI, SIXTEENTH,
                  X_F16: tl.constexpr, MATH: tl.constexpr):
    """sum over a 4-bit chunk of (q - z) * x (or q * x with z = 0), divided by 64, and the chunk's sum of x."""
    CHUNKS: tl.constexpr = ch.shape[0]
    base = ch * 16  # words of x: 16 per chunk, 4 per word of codes
    a0, a1, a2, a3 = _x_words(xw_row, base, ch_ok, CHUNKS)
    X00, X01, X02, X03, t0 = _x_pairs4(a0, a1, a2, a3, X_F16, MATH)
    a0, a1, a2, a3 = _x_words(xw_row, base + 4, ch_ok, CHUNKS)
    X10, X11, X12, X13, t1 = _x_pairs4(a0, a1, a2, a3, X_F16, MATH)
    a0, a1, a2, a3 = _x_words(xw_row, base + 8, ch_ok, CHUNKS)
    X20, X21, X22, X23, t2 = _x_pairs4(a0, a1, a2, a3, X_F16, MATH)
    a0, a1, a2, a3 = _x_words(xw_row, base + 12, ch_ok, CHUNKS)
    X30, X31, X32, X33, t3 = _x_pairs4(a0, a1, a2, a3, X_F16, MATH)
    if MATH == 2:
        full = tl.zeros(w0.shape, tl.int32)
        d = tl.inline_asm_elementwise(
            _PAIRS_PTX_4, "=r" + ",r" * 26,
            [w0, w1, w2, w3,
             X00[None, :], X01[None, :], X02[None, :], X03[None, :], X10[None, :], X11[None, :], X12[None, :], X13[None, :],
             X20[None, :], X21[None, :], X22[None, :], X23[None, :], X30[None, :], X31[None, :], X32[None, :], X33[None, :],
             za, nzb, full + MAGIC, full + LO, full + HI, full + SIXTEENTH],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        d = _word4_pairs(w0, X00[None, :], X01[None, :], X02[None, :], X03[None, :], za, nzb, MAGIC, LO, HI)
        d += _word4_pairs(w1, X10[None, :], X11[None, :], X12[None, :], X13[None, :], za, nzb, MAGIC, LO, HI)
        d += _word4_pairs(w2, X20[None, :], X21[None, :], X22[None, :], X23[None, :], za, nzb, MAGIC, LO, HI)
        d += _word4_pairs(w3, X30[None, :], X31[None, :], X32[None, :], X33[None, :], za, nzb, MAGIC, LO, HI)
    return d, (t0 + t1) + (t2 + t3)


@triton.jit
def _chunk8_pairs(xw_row, w0, w1, w2, w3, ch, ch_ok, MAGIC, MASK, X_F16: tl.constexpr, MATH: tl.constexpr):
    """sum over an 8-bit chunk of q * x, divided by 256."""
    CHUNKS: tl.constexpr = ch.shape[0]
    base = ch * 8  # words of x: 8 per chunk, 2 per word of codes
    a0, a1, a2, a3 = _x_words(xw_row, base, ch_ok, CHUNKS)
    X00, X01 = _x_pairs8(a0, a1, X_F16, MATH)
    X10, X11 = _x_pairs8(a2, a3, X_F16, MATH)
    a0, a1, a2, a3 = _x_words(xw_row, base + 4, ch_ok, CHUNKS)
    X20, X21 = _x_pairs8(a0, a1, X_F16, MATH)
    X30, X31 = _x_pairs8(a2, a3, X_F16, MATH)
    full = tl.zeros(w0.shape, tl.int32)
    za = full + MAGIC  # 4.5 in both halves: 4 + 128 / 256
    if MATH == 2:  # (za also fills the nzb slot: the 8-bit PTX has no second fix-up)
        return tl.inline_asm_elementwise(
            _PAIRS_PTX_8, "=r" + ",r" * 16,
            [w0, w1, w2, w3, X00[None, :], X01[None, :], X10[None, :], X11[None, :],
             X20[None, :], X21[None, :], X30[None, :], X31[None, :], za, za, full + MAGIC, full + MASK],
            dtype=tl.float32, is_pure=True, pack=1)
    d = _word8_pairs(w0, X00[None, :], X01[None, :], za, MAGIC, MASK)
    d += _word8_pairs(w1, X10[None, :], X11[None, :], za, MAGIC, MASK)
    d += _word8_pairs(w2, X20[None, :], X21[None, :], za, MAGIC, MASK)
    return d + _word8_pairs(w3, X30[None, :], X31[None, :], za, MAGIC, MASK)


@triton.jit
def _per_chunk(rows, at, ok, other, MASKED: tl.constexpr):
    """``rows[n] + at[c]`` loaded as ``(BLOCK_N, CHUNKS)``: a scale, zero point or offset per row and chunk.
    Loaded as ``(CHUNKS, BLOCK_N)`` and transposed, so that the compiler's layout gives each thread one
    chunk of every row, as the words' (its guess for the other order spread a warp across rows)."""
    ptr = rows[None, :] + at[:, None]  # (CHUNKS, BLOCK_N)
    if MASKED:
        v = tl.load(ptr, mask=tl.trans(ok), other=other)
    else:
        v = tl.load(ptr)
    return tl.trans(v)


@triton.jit
def _step_load(w_row, s_row, z_row, c0, n_ok, n_chunks, s_sg, GROUP: tl.constexpr, BITS: tl.constexpr,
               OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
               MASK_N: tl.constexpr, MASK_K: tl.constexpr):
    """One step's loads from memory: the CHUNKS chunks of four words of every row, ``(BLOCK_N, CHUNKS, 4)``,
    their scales and their zero points (int32) or offsets (float32), ``(BLOCK_N, CHUNKS)``. The masks only
    where a row or a chunk can be missing (the last step of a ragged row, a ragged last tile of rows): a
    masked load costs a few instructions more."""
    CK: tl.constexpr = 4 * (32 // BITS)  # weights per chunk
    MASKED: tl.constexpr = MASK_N or MASK_K
    ch = c0 + tl.arange(0, CHUNKS)  # (CHUNKS,)
    ok = (n_ok[:, None] | (not MASK_N)) & ((ch < n_chunks)[None, :] | (not MASK_K))  # (BLOCK_N, CHUNKS)
    # The words as a 2-D tile with a contiguous last dimension, reshaped: so that the compiler gives each
    # thread a chunk's four words in every row (its 3-D guess, Triton 3.6's, spread a warp across rows).
    w_at = w_row[:, None] + (c0 * 4 + tl.arange(0, 4 * CHUNKS))[None, :]  # (BLOCK_N, 4 * CHUNKS)
    if MASKED:
        ok4 = tl.reshape(tl.broadcast_to(ok[:, :, None], (BLOCK_N, CHUNKS, 4)), (BLOCK_N, 4 * CHUNKS))
        w = tl.load(w_at, mask=ok4, other=0)
    else:
        w = tl.load(w_at)
    w4 = tl.reshape(w, (BLOCK_N, CHUNKS, 4))
    g_at = (ch * CK) // GROUP * s_sg  # (CHUNKS,) a chunk lies in one group
    s = _per_chunk(s_row, g_at, ok, 0.0, MASKED).to(tl.float32)
    if OFFSET:  # q * s + offset
        second = _per_chunk(z_row, g_at, ok, 0.0, MASKED).to(tl.float32)
    elif BITS == 4:
        second = _per_chunk(z_row, g_at, ok, 0, MASKED).to(tl.int32)
    else:  # int8 lanes are read offset by 128 (0..255): no zero point to load
        second = tl.zeros((BLOCK_N, CHUNKS), tl.int32)
    return w4, s, second


@triton.jit
def _step_math(acc, w4, s, second, x_row, c0, n_chunks, MAGIC, LO, HI, SIXTEENTH, NZB,
               BITS: tl.constexpr, OFFSET: tl.constexpr, MATH: tl.constexpr, X_F16: tl.constexpr):
    """acc + one step's products, from what _step_load loaded (x is read here: it sits in L1). ``x_row``
    points to x's row as float32 values (MATH 0) or as words of two 16-bit activations (the pairs)."""
    BLOCK_N: tl.constexpr = acc.shape[0]
    CHUNKS: tl.constexpr = acc.shape[1]
    UNIT: tl.constexpr = 64.0 if BITS == 4 else 256.0  # the pairs hold (q - z) / UNIT
    ch = c0 + tl.arange(0, CHUNKS)  # (CHUNKS,)
    ch_ok = ch < n_chunks
    w0, w1, w2, w3 = _split4(w4, BLOCK_N, CHUNKS)
    if MATH == 0:
        if OFFSET:
            shift = second
        elif BITS == 4:
            shift = -second.to(tl.float32) * s
        else:  # int8 lanes are read offset by 128 (0..255), so the zero point is 128
            shift = -128.0 * s
        acc += _chunk_float32(x_row, w0, w1, w2, w3, ch, ch_ok, s, shift, BITS)
    elif BITS == 4:  # (no early returns: Triton would still compile what follows one)
        z = second.to(tl.int32) if not OFFSET else tl.zeros((BLOCK_N, CHUNKS), tl.int32)
        za = z * 0x10001 + MAGIC  # 16 + z / 64 in both halves
        nzb = z * 0x100010 + NZB  # -(1 + z / 64)
        d, xsum = _chunk4_pairs(x_row, w0, w1, w2, w3, ch, ch_ok, za, nzb, MAGIC, LO, HI, SIXTEENTH, X_F16, MATH)
        acc += (s * UNIT) * d
        if OFFSET:
            acc += second * xsum[None, :]
    else:
        acc += (s * UNIT) * _chunk8_pairs(x_row, w0, w1, w2, w3, ch, ch_ok, MAGIC, LO, X_F16, MATH)
    return acc


@triton.jit
def _quant_gemv_kernel(
    x, words, scale, zero, bias, y,
    N, K,
    x_sm, w_sn, s_sn, s_sg, y_sm, y_sn,
    MAGIC, LO, HI, SIXTEENTH, NZB,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr,
    MATH: tl.constexpr, X_F16: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
):
    # One row of x per program (axis 0, so the few rows of a decode step share each weight tile in L2)
    # against BLOCK_N rows of W; each step takes CHUNKS chunks of four words from every row. No tl.dot
    # (it would pad one row to 16): the products go to the CUDA cores, summed once at the end.
    row, pid_n = tl.program_id(0), tl.program_id(1)
    CK: tl.constexpr = 4 * (32 // BITS)  # weights per chunk
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    n_ok = n < N
    w_row, s_row, z_row = words + n * w_sn, scale + n * s_sn, zero + n * s_sn  # (BLOCK_N,) pointers
    x_row = x + row * x_sm  # float32 values (MATH 0) or int32 words of two 16-bit activations
    n_chunks = K // CK
    whole = n_chunks // CHUNKS * CHUNKS
    acc = tl.zeros((BLOCK_N, CHUNKS), dtype=tl.float32)
    if N % BLOCK_N == 0:
        for c0 in range(0, whole, CHUNKS):
            w4, s, second = _step_load(w_row, s_row, z_row, c0, n_ok, n_chunks, s_sg, GROUP, BITS, OFFSET,
                                       BLOCK_N, CHUNKS, False, False)
            acc = _step_math(acc, w4, s, second, x_row, c0, n_chunks, MAGIC, LO, HI, SIXTEENTH,
                             NZB, BITS, OFFSET, MATH, X_F16)
        if whole < n_chunks:
            w4, s, second = _step_load(w_row, s_row, z_row, whole, n_ok, n_chunks, s_sg, GROUP, BITS, OFFSET,
                                       BLOCK_N, CHUNKS, False, True)
            acc = _step_math(acc, w4, s, second, x_row, whole, n_chunks, MAGIC, LO, HI, SIXTEENTH,
                             NZB, BITS, OFFSET, MATH, X_F16)
    else:
        for c0 in range(0, n_chunks, CHUNKS):
            w4, s, second = _step_load(w_row, s_row, z_row, c0, n_ok, n_chunks, s_sg, GROUP, BITS, OFFSET,
                                       BLOCK_N, CHUNKS, True, True)
            acc = _step_math(acc, w4, s, second, x_row, c0, n_chunks, MAGIC, LO, HI, SIXTEENTH,
                             NZB, BITS, OFFSET, MATH, X_F16)
    out = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:
        out += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y + row * y_sm + n * y_sn, out.to(y.dtype.element_ty), mask=n_ok)


def fits_gemv(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the GEMV tiles this layer: whole chunks of four words per row, none across two groups."""
    chunk = 4 * (32 // bits)
    return in_features % chunk == 0 and group_size % chunk == 0


def _i32(c: int) -> int:
    """A 32-bit pattern as the signed int a kernel's int32 argument holds."""
    return c - (1 << 32) if c >= 1 << 31 else c


# The pairs' constants (see _pairs_ptx), passed as arguments so that they sit in registers once.
_PAIR_CONSTANTS = {4: (_W4_MAGIC, _W4_LO, _W4_HI, _SIXTEENTH, _i32(0xBC00BC00)),  # NZB: -1.0 in both halves
                   8: (_W8_MAGIC, _W8_MASK, 0, 0, 0)}


def gemv_math(x: torch.Tensor) -> int:
    """The GEMV's MATH for x: the PTX pairs for 16-bit inputs on a GPU, their plain-Triton copy for
    16-bit inputs under the interpreter, float32 products for float32 inputs."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return 0
    return 2 if x.is_cuda and not triton_interpreter_enabled() else 1


@triton.jit
def _quant_matmul_kernel(
    x, words, scale, zero, bias, y,
    M, N, K,
    x_sm, x_sk, w_sn, w_sk, s_sn, s_sg, y_sm, y_sn,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEG: tl.constexpr,
):
    # Each step dequantizes a (BLOCK_N, BLOCK_K) weight tile once for BLOCK_M rows of x: one product
    # per word lane, of depth BLOCK_K / per_word, with the x columns that lane's weights multiply.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features: rows of W
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        wk = k0 // PER_WORD + tl.arange(0, WORDS)
        word = tl.load(words + n[:, None] * w_sn + wk[None, :] * w_sk,
                       mask=n_ok[:, None] & (wk[None, :] * PER_WORD < K), other=0)  # (BLOCK_N, WORDS)
        s, shift = _word_scales(scale, zero, n, n_ok, k0, K, s_sn, s_sg, GROUP, BITS, BLOCK_N, BLOCK_K, SEG, OFFSET)
        for lane in tl.static_range(PER_WORD):
            k = wk * PER_WORD + lane
            x_lane = tl.load(x + m[:, None] * x_sm + k[None, :] * x_sk,
                             mask=m_ok[:, None] & (k[None, :] < K), other=0.0)  # (BLOCK_M, WORDS)
            w = _lane(word, lane, BITS) * s + shift  # (BLOCK_N, WORDS) float32
            if IEEE:  # float32 inputs: exact float32 products
                acc += tl.dot(x_lane.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:  # 16-bit inputs: the weight rounded to x's dtype, products on the tensor cores
                acc += tl.dot(x_lane, tl.trans(w.to(x_lane.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y + m[:, None] * y_sm + n[None, :] * y_sn, acc.to(y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _segment(group_size: int, block_k: int) -> int:
    """The largest power of two that divides ``group_size``, at most ``block_k``: a segment of that many
    weights never straddles two groups, wherever a step of ``block_k`` weights starts."""
    return min(group_size & -group_size, block_k)


def fits(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the kernels tile this layer: whole 32-bit words per row and per group."""
    per_word = 32 // bits
    return in_features % per_word == 0 and _segment(group_size, 1 << 30) >= per_word


# Tiles from sweeps on an H200. GEMV (bench/quant_gemv_chunks.py: bench/results/nvidia-h200/quant_gemv_chunks.json,
# a sweep of this kernel before its layout fix, not yet repeated): four rows of W and two warps per program
# were within 1% of the fastest tile on each of Llama-2-7B's three shapes at 4 bits, and 0-12% off at 8
# (4.9% on average, the best tile's 3.4%); more rows per thread cost registers and parallelism.
# GEMM: bench/quant.py --parts sweep-gemm.
GEMV_TILES = {4: {"block_n": 4, "chunks": 64, "num_warps": 2}, 8: {"block_n": 4, "chunks": 64, "num_warps": 2}}
GEMM_TILES = {4: {"block_n": 128, "block_k": 256, "num_warps": 8}, 8: {"block_n": 128, "block_k": 256, "num_warps": 8}}
GEMV_MAX_ROWS = 8  # up to this many rows (a decode step's batch), the GEMV; beyond, the GEMM


def _gemv(x2: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None,
          bits: int, group_size: int, offset: bool, tiles: dict, math: int | None = None) -> torch.Tensor:
    """The GEMV's launch: ``x2 (M, K) -> (M, N)``, ``second`` the zero points or offsets (or any tensor)."""
    math = gemv_math(x2) if math is None else math
    x2 = x2.contiguous()
    xk = x2.view(torch.int32) if math else x2  # the pairs read x as (M, K / 2) words of two 16-bit activations
    m, n = x2.shape[0], words.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    _quant_gemv_kernel[(m, triton.cdiv(n, tiles["block_n"]))](
        xk, words, scale, second, y if bias is None else bias, y, n, x2.shape[1],
        xk.stride(0), words.stride(0), scale.stride(0), scale.stride(1), y.stride(0), y.stride(1),
        *_PAIR_CONSTANTS[bits],
        GROUP=group_size, BITS=bits, HAS_BIAS=bias is not None, OFFSET=offset, MATH=math,
        X_F16=x2.dtype == torch.float16, BLOCK_N=tiles["block_n"], CHUNKS=tiles["chunks"],
        num_warps=tiles["num_warps"],
    )
    return y


def _check_math(math: int, x2: torch.Tensor, gemv_path: bool) -> None:
    """A ``math`` asked for must be one the GEMV runs, for this call and these activations."""
    if not gemv_path:
        raise ValueError(f"math chooses the GEMV's arithmetic, but this call goes to the GEMM ({x2.shape[0]} rows, "
                         f"at most {GEMV_MAX_ROWS} for the GEMV, or a layer that is not whole chunks: fits_gemv)")
    if math not in (0, 1, 2):
        raise ValueError(f"math must be 0 (float32), 1 (pairs, plain Triton) or 2 (pairs, PTX), got {math!r}")
    if math and x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"math={math} (float16 pairs) needs float16 or bfloat16 activations, got {x2.dtype}")
    if math == 2 and gemv_math(x2) != 2:
        raise ValueError("math=2 (inline PTX) needs CUDA tensors and Triton's compiler, not its interpreter")


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                 gemv: dict | None = None, gemm: dict | None = None, offset: torch.Tensor | None = None,
                 math: int | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` with the quantized weight. No checks of values (QuantLinear checked its
    buffers); ``gemv`` overrides the GEMV's tiles (``block_n``, ``chunks``, ``num_warps``), ``gemm`` the
    GEMM's (``block_n``, ``block_k``, ``num_warps``), ``math`` the GEMV's arithmetic (0 float32, 1 the pairs
    in plain Triton, 2 in PTX); ``offset`` (float16, 4 bits) replaces the zero point: ``w = code * scale + offset``."""
    if offset is not None and (bits != 4 or zero is not None or offset.stride() != scale.stride()):
        raise ValueError(f"offset (w = code * scale + offset) takes 4 bits, no zero point and scale's layout; got "
                         f"bits={bits}, zero {'given' if zero is not None else 'None'}, strides {offset.stride()} "
                         f"vs scale's {scale.stride()}")
    if not fits(bits, group_size, in_features):
        raise ValueError(f"the kernels need in_features and group_size in whole 32-bit words of codes "
                         f"(multiples of {32 // bits} for {bits} bits), got {in_features} and {group_size}")
    if zero is not None and zero.stride() != scale.stride():
        raise ValueError(f"zero must have scale's layout (strides {scale.stride()}), got strides {zero.stride()}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K)
    m, n = x2.shape[0], codes.shape[0]
    gemv_path = m <= GEMV_MAX_ROWS and fits_gemv(bits, group_size, in_features)
    if math is not None:
        _check_math(math, x2, gemv_path)
    words = codes.contiguous().view(torch.int32)  # (N, K / per_word): the bytes, four at a time
    second = offset if offset is not None else (scale if zero is None else zero)  # zero points or offsets
    bias = None if bias is None else bias.contiguous()
    if gemv_path:
        y = _gemv(x2, words, scale, second, bias, bits, group_size, offset is not None,
                  {**GEMV_TILES[bits], **(gemv or {})}, math)
        return y.reshape(*lead, n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    t = {**GEMM_TILES[bits], **(gemm or {})}
    block_m = 16 if m <= 16 else 32  # tl.dot needs at least 16 rows
    _quant_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, t["block_n"]))](
        x2, words, scale, second, y if bias is None else bias, y, m, n, in_features,
        x2.stride(0), x2.stride(1), words.stride(0), words.stride(1), scale.stride(0), scale.stride(1),
        y.stride(0), y.stride(1),
        GROUP=group_size, BITS=bits, HAS_BIAS=bias is not None, OFFSET=offset is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], SEG=_segment(group_size, t["block_k"]),
        num_warps=t["num_warps"],
    )
    return y.reshape(*lead, n)


# An opaque custom operator, so torch.compile (and its CUDA graph) launches the kernel as it is and
# only needs the output's shape, which the "fake" below gives (as kernels/decode_attention.py does).
@torch.library.custom_op("effml::quant_matmul", mutates_args=())
def quant_matmul_op(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`quant_matmul` with its default tiles, as a custom operator."""
    return quant_matmul(x, codes, scale, zero, bias, bits, group_size, in_features, offset=offset)


@quant_matmul_op.register_fake
def _(x, codes, scale, zero, bias, bits, group_size, in_features, offset=None):
    return x.new_empty(*x.shape[:-1], codes.shape[0])
