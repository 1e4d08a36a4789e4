"""Weight-only quantized matmul: ``y = x Wᵀ`` with ``W`` dequantized inside the kernel (W8A16 / W4A16).

A decode step is bound by the bytes of weights it reads, so a 4-bit weight makes it up to 4x faster
than bf16 only if the weight is never written back to memory at full width. Here each program loads
codes as 32-bit words (eight 4-bit codes or four 8-bit codes each), with their groups' scales and zero
points, turns each word's lanes into float weights in registers and multiplies them with the
activations: the full-width weight exists only inside the kernel.

Two kernels, one answer:
- the GEMV (decode, up to ``GEMV_MAX_ROWS`` rows): products on the CUDA cores, one row of x per
  program; memory bound, so what matters is many bytes in flight in few registers (packed words);
- the GEMM (prefill, batches): each dequantized tile serves BLOCK_M rows on the tensor cores.

Layout (``effml_lib.quant.QuantLinear``'s buffers): ``codes`` int8 ``(N, K)`` (8 bits) or uint8
``(N, K / 2)`` with element ``2i`` in the low nibble (4 bits), so word ``w`` holds weights
``(32 / bits) * w + lane`` in lane order; ``scale`` float16 ``(N, K / G)``; ``zero`` uint8 ``(N, K / G)``
(4 bits), or instead ``offset`` float16 ``(N, K / G)`` (4 bits, GGUF's Q4_1: ``code * scale + offset``). The kernels need whole words per row and groups of whole words (``K`` and ``G``
multiples of 8 for 4 bits, of 4 for 8 bits: :func:`fits`); ``QuantLinear`` uses the PyTorch reference
otherwise. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI proves it without a
GPU). The weight is the reference's ``(code - zero) * scale`` (or ``code * scale + offset``), computed in
float32 as ``code * scale + shift`` with ``shift = -zero * scale`` (or the offset): one fused multiply-add
per weight, equal up to float32 rounding. With
float32 inputs the products are float32; with 16-bit inputs the GEMM rounds the weight tile to x's dtype
for the tensor cores (as the reference's dequantized weight is); sums accumulate in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


@triton.jit
def _quant_gemv_kernel(
    x, words, scale, zero, bias, y,
    N, K,
    x_sm, x_sk, w_sn, w_sk, s_sn, s_sg, y_sm, y_sn,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEG: tl.constexpr,
):
    # One row of x per program (axis 0, so the few rows of a decode step share each weight tile in L2)
    # against BLOCK_N rows of W. No tl.dot (it would pad one row to 16): the products go to the CUDA
    # cores, one accumulator per word position, summed once at the end.
    row, pid_n = tl.program_id(0), tl.program_id(1)
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD  # words per row and step
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    n_ok = n < N
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        wk = k0 // PER_WORD + tl.arange(0, WORDS)  # (WORDS,) word index along the row
        word = tl.load(words + n[:, None] * w_sn + wk[None, :] * w_sk,
                       mask=n_ok[:, None] & (wk[None, :] * PER_WORD < K), other=0)  # (BLOCK_N, WORDS) int32
        s, shift = _word_scales(scale, zero, n, n_ok, k0, K, s_sn, s_sg, GROUP, BITS, BLOCK_N, BLOCK_K, SEG, OFFSET)
        for lane in tl.static_range(PER_WORD):
            k = wk * PER_WORD + lane  # (WORDS,) the weights this lane holds
            x_lane = tl.load(x + row * x_sm + k * x_sk, mask=k < K, other=0.0).to(tl.float32)
            acc += (_lane(word, lane, BITS) * s + shift) * x_lane[None, :]
    out = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:
        out += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y + row * y_sm + n * y_sn, out.to(y.dtype.element_ty), mask=n_ok)


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


# Tiles from a sweep on an H200 (bench/quant.py --parts sweep: bench/results/nvidia-h200/quant_sweep.json).
# GEMV: 8 rows of W per program was the fastest or within 2% of it on both shapes and both widths; 32
# rows leave a 4096-output layer only 128 programs for 132 SMs (11008 -> 4096 at W4: 21.3 vs 34.4 us).
GEMV_TILES = {4: {"block_n": 8, "block_k": 1024, "num_warps": 4}, 8: {"block_n": 8, "block_k": 1024, "num_warps": 4}}
GEMM_TILES = {4: {"block_n": 128, "block_k": 256, "num_warps": 8}, 8: {"block_n": 128, "block_k": 256, "num_warps": 8}}
GEMV_MAX_ROWS = 8  # up to this many rows (a decode step's batch), the GEMV; beyond, the GEMM


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                 gemv: dict | None = None, gemm: dict | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` with the quantized weight. No checks of values (QuantLinear checked its
    buffers); ``gemv`` / ``gemm`` override the tiles (``block_n``, ``block_k``, ``num_warps``); ``offset``
    (float16, 4 bits) replaces the zero point: ``w = code * scale + offset``."""
    if offset is not None and (bits != 4 or zero is not None or offset.stride() != scale.stride()):
        raise ValueError(f"offset (w = code * scale + offset) takes 4 bits, no zero point and scale's layout; got "
                         f"bits={bits}, zero {'given' if zero is not None else 'None'}, strides {offset.stride()} "
                         f"vs scale's {scale.stride()}")
    if not fits(bits, group_size, in_features):
        raise ValueError(f"the kernels need in_features and group_size in whole 32-bit words of codes "
                         f"(multiples of {32 // bits} for {bits} bits), got {in_features} and {group_size}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K)
    m, n = x2.shape[0], codes.shape[0]
    words = codes.contiguous().view(torch.int32)  # (N, K / per_word): the bytes, four at a time
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    common = (x2.stride(0), x2.stride(1), words.stride(0), words.stride(1), scale.stride(0), scale.stride(1),
              y.stride(0), y.stride(1))
    second = offset if offset is not None else (scale if zero is None else zero)  # zero points or offsets
    args = (x2, words, scale, second, y if bias is None else bias, y)
    if m <= GEMV_MAX_ROWS:
        t = {**GEMV_TILES[bits], **(gemv or {})}
        _quant_gemv_kernel[(m, triton.cdiv(n, t["block_n"]))](
            *args, n, in_features, *common,
            GROUP=group_size, BITS=bits, HAS_BIAS=bias is not None, OFFSET=offset is not None,
            BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], SEG=_segment(group_size, t["block_k"]),
            num_warps=t["num_warps"], num_stages=t.get("num_stages", 3),
        )
    else:
        t = {**GEMM_TILES[bits], **(gemm or {})}
        block_m = 16 if m <= 16 else 32  # tl.dot needs at least 16 rows
        _quant_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, t["block_n"]))](
            *args, m, n, in_features, *common,
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
