"""Rotary position embeddings (RoPE), the PyTorch reference.

RoPE rotates each pair of channels of a query or key by an angle proportional to the token's
position, ``angle = position * theta ** (-2i / head_dim)`` for pair ``i``. A dot product of two
rotated vectors then depends only on the *difference* of their positions.

Two ways of pairing the ``head_dim`` channels exist in the wild:

* half-split (default, Llama/Mistral/Qwen checkpoints on the Hugging Face hub): channel ``i`` is
  paired with channel ``i + head_dim/2``;
* interleaved (the RoFormer paper, Meta's original Llama code): channel ``2i`` with ``2i + 1``.

Both compute the same function up to a fixed permutation of the channels: ``permute_qk_weight``
reorders a q/k projection from one pairing to the other, as checkpoint converters do.

``apply_rope`` rotates one tensor; ``apply_rope_qk`` rotates a step's queries and keys together,
which on a GPU is one Triton kernel (``kernels/rope.py``) reading each tensor once.
"""

from __future__ import annotations

import math

import torch

from .device import resolve_impl

SCALING_TYPES = ("linear", "ntk")


def rope_frequencies(
    head_dim: int,
    max_positions: int,
    theta: float = 10000.0,
    scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute ``(cos, sin)``, each ``(max_positions, head_dim // 2)`` float32.

    ``scaling`` stretches the usable context:
      * ``{"type": "linear", "factor": s}``: position interpolation, positions are divided by ``s``;
      * ``{"type": "ntk", "factor": s}``: NTK-aware scaling, the base ``theta`` is raised to
        ``theta * s ** (head_dim / (head_dim - 2))`` so low frequencies stretch and high ones barely move.
    """
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not isinstance(max_positions, int) or max_positions <= 0:
        raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")

    position_scale = 1.0
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise TypeError(f"scaling must be a dict like {{'type': 'linear', 'factor': 4}}, got {scaling!r}")
        kind, factor = scaling.get("type"), scaling.get("factor")
        if kind not in SCALING_TYPES:
            raise ValueError(f"scaling['type'] must be one of {SCALING_TYPES}, got {kind!r}")
        if not isinstance(factor, (int, float)) or factor < 1:
            raise ValueError(f"scaling['factor'] must be a number >= 1, got {factor!r}")
        if kind == "linear":
            position_scale = 1.0 / factor
        else:
            if head_dim <= 2:
                raise ValueError(f"NTK scaling needs head_dim > 2, got {head_dim}")
            theta = theta * factor ** (head_dim / (head_dim - 2))

    # Same arithmetic as the Hugging Face reference (int exponents, then float32) so logits match.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (head_dim/2,)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float() * position_scale
    angles = torch.outer(positions, inv_freq)  # (max_positions, head_dim/2)
    return angles.cos(), angles.sin()


def wavelengths(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Wavelength in tokens of each rotation pair: ``2*pi / inv_freq``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return 2 * math.pi * theta**exponents


PAIRINGS = ("half_split", "interleaved")


def _check_x(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(x.shape)}")


def _check_tables(cos, sin, head_dim: int) -> None:
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or not table.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor from rope_frequencies, got {type(table).__name__}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] * 2 != head_dim:
        raise ValueError(
            f"cos and sin must both be (max_positions, {head_dim // 2}) for head_dim={head_dim}, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )


def _check_positions(positions, batch_size: int, seq_len: int, max_positions: int) -> None:
    if positions is None:
        if seq_len > max_positions:
            raise ValueError(f"sequence length {seq_len} exceeds the {max_positions} precomputed positions")
        return
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex() \
            or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor of shape (T,) or (B, T), got "
                        f"{getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.dim() not in (1, 2) or positions.shape[-1] != seq_len:
        raise ValueError(f"positions must have shape (T,) or (B, T) with T={seq_len}, got {tuple(positions.shape)}")
    if positions.dim() == 2 and positions.shape[0] not in (1, batch_size):
        raise ValueError(f"positions of shape {tuple(positions.shape)} do not match batch size {batch_size}")
    # One device sync when positions live on a GPU (skipped under torch.compile, where it would
    # break the graph); the model's own forward passes positions=None.
    if positions.numel() and not torch.compiler.is_compiling() and (int(positions.min()) < 0 or int(positions.max()) >= max_positions):
        raise ValueError(f"positions must lie in [0, {max_positions}) (the precomputed table), "
                         f"got values from {int(positions.min())} to {int(positions.max())}")


def _gather_angles(cos, sin, positions, seq_len):
    """The cos/sin rows of each token: (T, D/2), or (B, 1, T, D/2) for per-sequence positions."""
    if positions is None:
        return cos[:seq_len], sin[:seq_len]
    if positions.dim() == 1:
        return cos[positions], sin[positions]  # (T, D/2)
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, D/2)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """The readable rotation: x ``(B, H, T, D)`` by angles whose cos/sin broadcast to ``(..., T, D/2)``."""
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # pairs (2i, 2i+1)
    else:
        x1, x2 = xf.chunk(2, dim=-1)  # pairs (i, i + D/2)
    # (x1 + i x2) * (cos + i sin), written out in real arithmetic
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    if interleaved:
        out = torch.stack((out1, out2), dim=-1).flatten(-2)
    else:
        out = torch.cat((out1, out2), dim=-1)
    return out.to(x.dtype)


def apply_rope_qk(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate a step's queries ``(B, H, T, D)`` and keys ``(B, Hkv, T, D)`` by their positions' angles.

    ``positions`` defaults to ``0..T-1`` (row t of cos/sin); a ``(T,)`` or ``(B, T)`` integer tensor
    gives arbitrary, even non-contiguous positions (a decode step passes the cache length), each in
    ``[0, max_positions)``. The rotation is computed in float32 and cast back to the input's dtype.
    ``k`` may be None. ``impl``: ``"torch"`` (the reference), ``"triton"`` (one kernel for q and k),
    or ``"auto"``: Triton on CUDA, except under torch.compile, whose own fusion of the reference
    does the same job.
    """
    _check_x("q", q)
    if k is not None:
        _check_x("k", k)
        if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, T and D")
        if k.device != q.device:
            raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    _check_tables(cos, sin, q.shape[-1])
    _check_positions(positions, q.shape[0], q.shape[2], cos.shape[0])
    return apply_rope_qk_unchecked(q, k, cos, sin, positions, interleaved, impl)


def apply_rope_qk_unchecked(q, k, cos, sin, positions=None, interleaved=False, impl="auto"):
    """:func:`apply_rope_qk` without its checks, for ``Transformer.forward``, which has checked its
    positions once for all layers: no per-layer device sync in the decode loop."""
    impl = resolve_impl(impl, q.device) if not (impl == "auto" and torch.compiler.is_compiling()) else "torch"
    cos, sin = cos.to(q.device, torch.float32), sin.to(q.device, torch.float32)
    if positions is not None:
        positions = positions.to(q.device)
    if impl == "triton":
        from .kernels.rope import rope_qk_triton  # imports Triton, so only when asked for

        return rope_qk_triton(q, k, cos, sin, positions, interleaved)
    cos, sin = _gather_angles(cos, sin, positions, q.shape[2])
    q_rot = rotate_reference(q, cos, sin, interleaved)
    k_rot = rotate_reference(k, cos, sin, interleaved) if k is not None else None
    return q_rot, k_rot


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, T, D)`` by its positions' angles (see ``apply_rope_qk``)."""
    return apply_rope_qk(x, None, cos, sin, positions, interleaved, impl)[0]


def permute_qk_weight(weight: torch.Tensor, n_heads: int, to: str = "half_split") -> torch.Tensor:
    """Reorder a q or k projection's output rows from one RoPE pairing to the other.

    ``weight`` is ``(n_heads * head_dim, in_features)`` (or a bias, ``(n_heads * head_dim,)``).
    Within each head, ``to="half_split"`` moves the interleaved pairs ``(2i, 2i+1)`` to
    ``(i, i + D/2)``; ``to="interleaved"`` undoes it. Rotating the permuted projection with the
    other pairing gives the same channels, permuted alike in q and k, so every q·k score is unchanged.
    """
    if to not in PAIRINGS:
        raise ValueError(f"to must be one of {PAIRINGS}, got {to!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        raise ValueError(f"weight must be a 1-D bias or 2-D (out, in) tensor, got {getattr(weight, 'shape', weight)!r}")
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads <= 0:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    rows = weight.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"weight's {rows} rows must be n_heads ({n_heads}) x an even head_dim")
    head_dim = rows // n_heads
    pair = torch.arange(head_dim // 2, device=weight.device)
    if to == "half_split":
        order = torch.cat((2 * pair, 2 * pair + 1))  # new channel j takes old channel order[j]
    else:
        order = torch.stack((pair, pair + head_dim // 2), dim=-1).flatten()
    per_head = weight.reshape(n_heads, head_dim, *weight.shape[1:])
    return per_head[:, order].reshape(weight.shape)
