"""RoPE as one Triton kernel that rotates the queries and the keys of a step in a single pass.

RoPE does almost no arithmetic (4 multiplies and 2 adds per channel pair), so its speed is set by
memory traffic: read q and k once, write them once. The PyTorch reference moves far more than that
(an fp32 copy, two halves, two products each, a concatenation), and calling it on q and k launches
two sets of kernels. Here one program handles one token (b, t): it loads that token's cos/sin row
once and uses it for every query head and every key head.

Layout: any strides. The model's q and k are views ``(B, T, H, D) -> (B, H, T, D)``, where all
heads of one token are adjacent in memory; passing strides lets the kernel read them in place.

The arithmetic is the reference's, in float32, rounded once to the output dtype. Runs on CUDA, or
on CPU tensors under ``TRITON_INTERPRET=1`` (how CI proves it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src, dst, n_heads, src_stride_h, src_stride_d, dst_stride_h, dst_stride_d, cos, sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    """Rotate all heads of one token. src/dst point at head 0, channel 0; cos/sin are (BLOCK_D,) fp32."""
    d = tl.arange(0, BLOCK_D)  # index of the pair
    if INTERLEAVED:
        first, second = 2 * d, 2 * d + 1  # pairs (2i, 2i+1)
    else:
        first, second = d, d + HALF  # pairs (i, i + D/2)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        ok = (h < n_heads)[:, None] & (d < HALF)[None, :]  # (BLOCK_H, BLOCK_D)
        src_row = src + h[:, None] * src_stride_h
        x1 = tl.load(src_row + first[None, :] * src_stride_d, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src_row + second[None, :] * src_stride_d, mask=ok, other=0.0).to(tl.float32)
        # (x1 + i x2) * (cos + i sin)
        out1 = x1 * cos[None, :] - x2 * sin[None, :]
        out2 = x2 * cos[None, :] + x1 * sin[None, :]
        dst_row = dst + h[:, None] * dst_stride_h
        tl.store(dst_row + first[None, :] * dst_stride_d, out1.to(dst.dtype.element_ty), mask=ok)
        tl.store(dst_row + second[None, :] * dst_stride_d, out2.to(dst.dtype.element_ty), mask=ok)


@triton.jit
def _rope_qk_kernel(
    q, q_out, k, k_out, cos, sin, positions,
    seq_len, n_q_heads, n_k_heads,
    q_sb, q_sh, q_st, q_sd, qo_sb, qo_sh, qo_st, qo_sd,
    k_sb, k_sh, k_st, k_sd, ko_sb, ko_sh, ko_st, ko_sd,
    pos_sb, pos_st,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_K: tl.constexpr,
):
    # One program per token. int64 so offsets stay right past 2^31 elements (large batch x context).
    token = tl.program_id(0).to(tl.int64)
    b, t = token // seq_len, token % seq_len
    if HAS_POSITIONS:
        pos = tl.load(positions + b * pos_sb + t * pos_st).to(tl.int64)
    else:
        pos = t
    d = tl.arange(0, BLOCK_D)
    cos_row = tl.load(cos + pos * HALF + d, mask=d < HALF, other=0.0)  # (BLOCK_D,) fp32
    sin_row = tl.load(sin + pos * HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(q + b * q_sb + t * q_st, q_out + b * qo_sb + t * qo_st, n_q_heads,
                  q_sh, q_sd, qo_sh, qo_sd, cos_row, sin_row, HALF, BLOCK_H, BLOCK_D, INTERLEAVED)
    if HAS_K:
        _rotate_heads(k + b * k_sb + t * k_st, k_out + b * ko_sb + t * ko_st, n_k_heads,
                      k_sh, k_sd, ko_sh, ko_sd, cos_row, sin_row, HALF, BLOCK_H, BLOCK_D, INTERLEAVED)


def rope_qk_triton(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    interleaved: bool,
    block_h: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotated copies of q ``(B, H, T, D)`` and k ``(B, Hkv, T, D)`` (k may be None), in one launch.

    Inputs are already checked by ``rope.apply_rope_qk``: cos/sin are float32 ``(P, D/2)`` on the
    device, positions is None (token t uses row t) or an integer ``(T,)``/``(B|1, T)`` tensor.
    ``block_h`` (heads per loop step, a power of two) is for tests; by default it is chosen here.
    """
    batch, n_q_heads, seq_len, head_dim = q.shape
    half = head_dim // 2
    q_out = torch.empty_like(q)  # same memory layout as q, so stores follow the loads
    k_out = torch.empty_like(k) if k is not None else None
    if batch * seq_len == 0:
        return q_out, k_out
    cos, sin = cos.contiguous(), sin.contiguous()  # (P, D/2), row stride D/2 (no copy if already so)

    if positions is None:
        pos_arg, pos_sb, pos_st = cos, 0, 0  # any pointer: never read
    else:
        positions = positions.reshape(-1, seq_len)  # (1 or B, T)
        pos_arg, pos_st = positions, positions.stride(1)
        pos_sb = 0 if positions.shape[0] == 1 else positions.stride(0)

    has_k = k is not None
    k_arg, ko_arg = (k, k_out) if has_k else (q, q_out)  # placeholders when there is no k
    n_k_heads = k.shape[1] if has_k else 0
    block_d = triton.next_power_of_2(half)
    # Heads per loop step: enough to give each program a few KiB of work without spilling registers.
    block_h = block_h or max(1, min(triton.next_power_of_2(max(n_q_heads, n_k_heads)), max(1, 4096 // block_d)))
    _rope_qk_kernel[(batch * seq_len,)](
        q, q_out, k_arg, ko_arg, cos, sin, pos_arg,
        seq_len, n_q_heads, n_k_heads,
        *q.stride(), *q_out.stride(), *k_arg.stride(), *ko_arg.stride(),
        pos_sb, pos_st,
        HALF=half, BLOCK_H=block_h, BLOCK_D=block_d,
        INTERLEAVED=bool(interleaved), HAS_POSITIONS=positions is not None, HAS_K=has_k,
    )
    return q_out, k_out
