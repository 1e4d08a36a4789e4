"""Decode attention as a split-K Triton kernel: a few new queries against a long KV cache.

A decode step has 1 (or a few) query tokens per sequence and thousands of cached keys. Giving one
program per (sequence, KV head) leaves most of a GPU idle at small batch, so the keys are split into
chunks, one program per (sequence, KV head, chunk) — "flash decoding":

1. ``_partial_kernel``: each program attends its group's G = H / Hkv query heads (x Tq queries) to
   its chunk of keys with an online softmax, and writes the chunk's normalised output and its
   log-sum-exp (LSE) of scores.
2. ``_combine_kernel``: one program per output row merges the chunks: with
   ``w_s = exp(lse_s - max lse)``, ``out = sum_s w_s * out_s / sum_s w_s`` — exactly the softmax over
   all keys, because each chunk's output is its own softmax-weighted average.

GQA comes for free: the G query heads of a group are rows of one tile, so each K/V tile is read once
for the whole group. Masking is causal and end-aligned per sequence: with ``context_lens[b]`` valid
keys, query i sits at position ``context_lens[b] - Tq + i`` and sees keys ``0 .. that position``.
Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI proves it without a GPU).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _partial_kernel(
    q, k, v, context_lens, part_out, part_lse,
    q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd, v_sb, v_sh, v_st, v_sd,
    po_sb, po_sh, po_ss, po_sm, pl_sb, pl_sh, pl_ss,
    n_kv_heads, q_len, keys_per_split, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, kv_head = (bh // n_kv_heads).to(tl.int64), bh % n_kv_heads
    rows = tl.arange(0, BLOCK_M)  # row r: query head kv_head * G + r // Tq, query r % Tq
    row_ok = rows < GROUP * q_len
    head, query = kv_head * GROUP + rows // q_len, rows % q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q_tile = tl.load(q + b * q_sb + head[:, None] * q_sh + query[:, None] * q_st + d[None, :] * q_sd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
    if DOT_IN_FP32:
        q_tile = q_tile.to(tl.float32)
    n_keys = tl.load(context_lens + b)
    query_pos = n_keys - q_len + query  # (M,): the last key each row may see
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)

    k_base, v_base = k + b * k_sb + kv_head * k_sh, v + b * v_sb + kv_head * v_sh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of scores
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(score - max)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # running sum of exp(score - max) * v
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k_tile = tl.load(k_base + n[:, None] * k_st + d[None, :] * k_sd, mask=kv_mask, other=0.0)  # (N, D)
        if DOT_IN_FP32:
            k_tile = k_tile.to(tl.float32)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) * scale  # (M, N) fp32
        visible = n_ok[None, :] & (n[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_tile = tl.load(v_base + n[:, None] * v_st + d[None, :] * v_sd, mask=kv_mask, other=0.0)  # (N, D)
        if DOT_IN_FP32:
            v_tile = v_tile.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    po = part_out + b * po_sb + kv_head * po_sh + split * po_ss
    tl.store(po + rows[:, None] * po_sm + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(part_lse + b * pl_sb + kv_head * pl_sh + split * pl_ss + rows, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_out, part_lse, out,
    po_sb, po_sh, po_ss, po_sm, pl_sb, pl_sh, pl_ss, o_sb, o_sh, o_st, o_sd,
    n_kv_heads, q_len, n_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per output row (sequence, query head, query): its chunks are merged BLOCK_S at a
    # time, so a long context split many ways is still read with wide loads, by many programs.
    bh, row = tl.program_id(0), tl.program_id(1)
    b, kv_head = (bh // n_kv_heads).to(tl.int64), bh % n_kv_heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    lse_base = part_lse + b * pl_sb + kv_head * pl_sh + row
    po_base = part_out + b * po_sb + kv_head * po_sh + row * po_sm

    max_lse = float("-inf")
    for s0 in range(0, n_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        max_lse = tl.maximum(max_lse, tl.max(tl.load(lse_base + s * pl_ss, mask=s < n_splits, other=float("-inf"))))
    max_safe = tl.where(max_lse == float("-inf"), 0.0, max_lse)
    total = 0.0
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < n_splits
        weight = tl.exp(tl.load(lse_base + s * pl_ss, mask=s_ok, other=float("-inf")) - max_safe)  # (S,)
        part = tl.load(po_base + s[:, None] * po_ss + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * part, axis=0)
        total += tl.sum(weight)
    result = acc / tl.where(total > 0, total, 1.0)  # no visible key at all: zeros, as the reference

    head, query = kv_head * GROUP + row // q_len, row % q_len
    tl.store(out + b * o_sb + head * o_sh + query * o_st + d * o_sd, result.to(out.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_block_n(block_d: int, element_size: int, num_stages: int, device: torch.device) -> int:
    """Keys per tile: 128 where ``num_stages`` buffered K and V tiles fit in ~200 KB of shared memory
    (an H100 has 227 KB per block), else halved: bf16 at head_dim 128 takes 128, fp32 or head_dim 256
    take 64. The interpreter runs per element, so small tiles keep CI fast there."""
    if device.type != "cuda":
        return 16
    block_n = 128
    while block_n > 16 and num_stages * 2 * block_n * block_d * element_size > 200 * 1024:
        block_n //= 2
    return block_n


def _num_splits(batch_heads: int, max_keys: int, block_n: int, device: torch.device, programs_per_sm: int) -> int:
    """How many chunks to split each sequence's keys into: enough for ``programs_per_sm`` programs per
    SM (a handful on the interpreter), each chunk at least one tile. Rounded down, never up: one
    program too many would run alone in a second wave and nearly double the time."""
    if device.type == "cuda":
        target = programs_per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(target // batch_heads, math.ceil(max_keys / block_n)))


def decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_lens: torch.Tensor,
    n_splits: int | None = None,
    *,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    programs_per_sm: int = 1,
) -> torch.Tensor:
    """Attention of q ``(B, H, Tq, D)`` to the first ``context_lens[b]`` keys of k/v ``(B, Hkv, S, D)``.

    Inputs are checked by ``attention.decode_attention``: H % Hkv == 0, 16 <= D, context_lens an int32
    ``(B,)`` tensor on q's device with ``Tq <= context_lens[b] <= S``. ``n_splits`` is for tests;
    ``block_n`` (keys per tile), ``num_warps``, ``num_stages`` and ``programs_per_sm`` are for tuning;
    the defaults come from ``python bench/decode_attention.py --sweep`` on an H100 and an H200 (within
    5% of each shape's best on geometric mean over six shapes; results in bench/results/).
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, max_keys = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    block_m = max(16, triton.next_power_of_2(group * q_len))
    block_d = triton.next_power_of_2(head_dim)
    if block_n is None:
        block_n = _default_block_n(block_d, q.element_size(), num_stages, q.device)
    splits = n_splits or _num_splits(batch * n_kv_heads, max_keys, block_n, q.device, programs_per_sm)
    keys_per_split = math.ceil(math.ceil(max_keys / splits) / block_n) * block_n

    part_out = torch.empty(batch, n_kv_heads, splits, block_m, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, n_kv_heads, splits, block_m, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    # Triton's interpreter (3.9) returns garbage from tl.dot on bfloat16 tiles: there, and only there,
    # bf16 tiles are upcast first. On a GPU the tensor cores take bf16 as it is.
    dot_in_fp32 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    if dot_in_fp32:
        precision = "ieee"
    _partial_kernel[(batch * n_kv_heads, splits)](
        q, k, v, context_lens, part_out, part_lse,
        *q.stride(), *k.stride(), *v.stride(), *part_out.stride()[:4], *part_lse.stride()[:3],
        n_kv_heads, q_len, keys_per_split, 1.0 / math.sqrt(head_dim),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
        DOT_IN_FP32=dot_in_fp32, num_warps=num_warps, num_stages=num_stages,
    )
    _combine_kernel[(batch * n_kv_heads, group * q_len)](
        part_out, part_lse, out,
        *part_out.stride()[:4], *part_lse.stride()[:3], *out.stride(),
        n_kv_heads, q_len, splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_S=min(32, triton.next_power_of_2(splits)), BLOCK_D=block_d,
    )
    return out


# torch.compile cannot trace into a Python launcher that asks the device for its SM count, so the
# model calls the kernel as an opaque custom operator: compiled code (and its CUDA graph) launches
# it as it is, and the compiler only needs its output's shape, which the "fake" below gives.
@torch.library.custom_op("effml::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """``decode_attention_triton`` with its default tuning, as a custom operator."""
    return decode_attention_triton(q, k, v, context_lens)


@decode_attention_op.register_fake
def _(q, k, v, context_lens):
    return torch.empty_like(q)
