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


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                 block_n: int = 32, block_k: int = 64, num_warps: int = 4) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` with the quantized weight; no checks (QuantLinear checked its buffers).

    The default tiles were the fastest of a small sweep on an H200 at batch 1 and 64, 4096 -> 11008 bf16
    (BLOCK_N 32-128, BLOCK_K 32-128, 2-8 warps); a split-K GEMV for decode is still to come."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K)
    m, k, n = x2.shape[0], in_features, codes.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
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
