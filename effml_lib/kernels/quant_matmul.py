"""Weight-only quantized matmul: ``y = x Wᵀ`` with ``W`` dequantized inside the kernel (W8A16 / W4A16).

A decode step is bound by the bytes of weights it reads, so a 4-bit weight should make it up to 4x
faster than bf16 only if the weight is never written back to memory at full width. Here each program
loads a tile of codes (one byte holds two 4-bit codes), their groups' scales and zero points, turns
them into a float tile in registers and multiplies it with the activations' tile: the full-width weight
exists only inside the kernel.

Layout (``effml_lib.quant.QuantLinear``'s buffers): ``codes`` int8 ``(N, K)`` (8 bits) or uint8
``(N, K / 2)`` with element ``2i`` in the low nibble (4 bits); ``scale`` float16 ``(N, K / G)``; ``zero``
uint8 ``(N, K / G)`` (4 bits only). Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how
CI proves it without a GPU). The weight is the reference's, ``(code - zero) * scale`` in float32; with
float32 inputs the products are exact float32, with 16-bit inputs the weight tile is rounded to x's dtype
for the tensor cores (as the reference's dequantized weight is); sums accumulate in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_matmul_kernel(
    x, codes, scale, zero, bias, y,
    M, N, K,
    x_sm, x_sk, c_sn, c_sk, s_sn, s_sg, y_sm, y_sn,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features: rows of W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        x_tile = tl.load(x + m[:, None] * x_sm + k[None, :] * x_sk,
                         mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K), x's dtype
        ok = (k[:, None] < K) & (n[None, :] < N)  # the weight tile, transposed: (BLOCK_K, BLOCK_N)
        if BITS == 4:
            byte = tl.load(codes + n[None, :] * c_sn + (k[:, None] // 2) * c_sk, mask=ok, other=0).to(tl.int32)
            code = ((byte >> ((k[:, None] % 2) * 4)) & 0xF).to(tl.float32)  # low nibble for even k
        else:
            code = tl.load(codes + n[None, :] * c_sn + k[:, None] * c_sk, mask=ok, other=0).to(tl.float32)
        group = k[:, None] // GROUP
        s = tl.load(scale + n[None, :] * s_sn + group * s_sg, mask=ok, other=0.0).to(tl.float32)
        if BITS == 4:
            code = code - tl.load(zero + n[None, :] * s_sn + group * s_sg, mask=ok, other=0).to(tl.float32)
        w_tile = code * s  # (BLOCK_K, BLOCK_N) float32: the dequantized weight, only in registers
        if IEEE:  # float32 inputs: exact float32 products
            acc += tl.dot(x_tile.to(tl.float32), w_tile, input_precision="ieee")
        else:  # 16-bit inputs: the weight rounded to x's dtype once, products on the tensor cores
            acc += tl.dot(x_tile, w_tile.to(x_tile.dtype))
    if HAS_BIAS:
        acc += tl.load(bias + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y + m[:, None] * y_sm + n[None, :] * y_sn, acc.to(y.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _quant_gemv_kernel(
    x, codes, scale, zero, bias, y,
    N, K,
    x_sm, x_sk, c_sn, c_sk, s_sn, s_sg, y_sm, y_sn,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEG: tl.constexpr,
):
    # One row of x per program (axis 0, so the few rows of a decode step share each weight tile in L2)
    # against BLOCK_N rows of W. A step covers BLOCK_K weights of each row as BLOCK_K // SEG segments of
    # SEG weights, each inside one group, so a segment needs one scale and one zero point:
    #   sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k).
    # No tl.dot (it would pad one row to 16): products and sums on the CUDA cores, which is what a
    # memory-bound GEMV needs; the weight never exists at full width, not even in registers.
    row, pid_n = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    n_ok = n < N
    NSEG: tl.constexpr = BLOCK_K // SEG
    seg = tl.arange(0, NSEG)  # (NSEG,)
    acc = tl.zeros((BLOCK_N, NSEG), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        seg_start = k0 + seg * SEG  # (NSEG,) first weight of each segment
        seg_ok = seg_start < K
        ok = n_ok[:, None] & seg_ok[None, :]  # (BLOCK_N, NSEG)
        group = seg_start // GROUP
        s = tl.load(scale + n[:, None] * s_sn + group[None, :] * s_sg, mask=ok, other=0.0).to(tl.float32)
        if BITS == 4:
            j = tl.arange(0, SEG // 2)  # byte j of a segment holds weights 2j (low nibble) and 2j + 1
            byte_k = seg_start[:, None] // 2 + j[None, :]  # (NSEG, SEG / 2)
            byte = tl.load(codes + n[:, None, None] * c_sn + byte_k[None, :, :] * c_sk,
                           mask=ok[:, :, None], other=0)  # (BLOCK_N, NSEG, SEG / 2) uint8
            x_even = tl.load(x + row * x_sm + (2 * byte_k) * x_sk, mask=seg_ok[:, None], other=0.0).to(tl.float32)
            x_odd = tl.load(x + row * x_sm + (2 * byte_k + 1) * x_sk, mask=seg_ok[:, None], other=0.0).to(tl.float32)
            low, high = (byte & 0xF).to(tl.float32), (byte >> 4).to(tl.float32)
            xq = tl.sum(low * x_even[None, :, :] + high * x_odd[None, :, :], axis=2)  # (BLOCK_N, NSEG)
            x_sum = tl.sum(x_even + x_odd, axis=1)  # (NSEG,)
            z = tl.load(zero + n[:, None] * s_sn + group[None, :] * s_sg, mask=ok, other=0).to(tl.float32)
            acc += s * (xq - z * x_sum[None, :])
        else:
            k = seg_start[:, None] + tl.arange(0, SEG)[None, :]  # (NSEG, SEG)
            q = tl.load(codes + n[:, None, None] * c_sn + k[None, :, :] * c_sk,
                        mask=ok[:, :, None], other=0).to(tl.float32)  # (BLOCK_N, NSEG, SEG)
            xk = tl.load(x + row * x_sm + k * x_sk, mask=seg_ok[:, None], other=0.0).to(tl.float32)
            acc += s * tl.sum(q * xk[None, :, :], axis=2)
    out = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:
        out += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y + row * y_sm + n * y_sn, out.to(y.dtype.element_ty), mask=n_ok)


def _segment(group_size: int, block_k: int) -> int:
    """The largest power of two that divides ``group_size``, at most ``block_k``: a segment of that many
    weights never straddles two groups, wherever a step of ``block_k`` weights starts."""
    return min(group_size & -group_size, block_k)


GEMV_TILES = {"block_n": 16, "block_k": 256, "num_warps": 4}  # placeholder until the H200 sweep
GEMV_MAX_ROWS = 8  # up to this many rows (a decode step's batch), the GEMV; beyond, the tiled GEMM


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                 block_n: int = 32, block_k: int = 64, num_warps: int = 4, gemv: dict | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` with the quantized weight; no checks (QuantLinear checked its buffers).

    Up to ``GEMV_MAX_ROWS`` rows run the GEMV (tiles ``gemv``: ``block_n``, ``block_k``, ``num_warps``),
    more run the tiled GEMM (``block_n``, ``block_k``, ``num_warps``: the fastest of a sweep on an H200 at
    batch 64, 4096 -> 11008 bf16)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K)
    m, k, n = x2.shape[0], in_features, codes.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m <= GEMV_MAX_ROWS:
        tiles = {**GEMV_TILES, **(gemv or {})}
        grid = (m, triton.cdiv(n, tiles["block_n"]))
        _quant_gemv_kernel[grid](
            x2, codes, scale, scale if zero is None else zero, y if bias is None else bias, y,
            n, k,
            x2.stride(0), x2.stride(1), codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1),
            y.stride(0), y.stride(1),
            GROUP=group_size, BITS=bits, HAS_BIAS=bias is not None,
            BLOCK_N=tiles["block_n"], BLOCK_K=tiles["block_k"], SEG=_segment(group_size, tiles["block_k"]),
            num_warps=tiles["num_warps"],
        )
        return y.reshape(*lead, n)
    block_m = 16 if m <= 16 else 32  # tl.dot needs at least 16 rows; a decode step pads its one row
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_matmul_kernel[grid](
        x2, codes, scale, scale if zero is None else zero, y if bias is None else bias, y,
        m, n, k,
        x2.stride(0), x2.stride(1), codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1),
        y.stride(0), y.stride(1),
        GROUP=group_size, BITS=bits, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return y.reshape(*lead, n)
