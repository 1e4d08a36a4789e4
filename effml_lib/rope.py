"""Rotary position embeddings (RoPE), the PyTorch reference.

RoPE rotates each pair of channels of a query or key by an angle proportional to the token's
position, ``angle = position * theta ** (-2i / head_dim)`` for pair ``i``. A dot product of two
rotated vectors then depends only on the *difference* of their positions.

Two ways of pairing the ``head_dim`` channels exist in the wild:

* half-split (default, Llama/Mistral/Qwen checkpoints on the Hugging Face hub): channel ``i`` is
  paired with channel ``i + head_dim/2``;
* interleaved (the RoFormer paper, Meta's original Llama code): channel ``2i`` with ``2i + 1``.

Both compute the same function up to a fixed permutation of the channels; module 02 shows this.
"""

from __future__ import annotations

import math

import torch

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


def _gather_angles(cos, sin, positions, seq_len, device):
    """Select the rows of cos/sin for each position. Returns (T, D/2) or (B, 1, T, D/2)."""
    if positions is None:
        if seq_len > cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} exceeds the {cos.shape[0]} precomputed positions")
        return cos[:seq_len], sin[:seq_len]
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex():
        raise TypeError("positions must be an integer tensor of shape (T,) or (B, T)")
    if positions.shape[-1] != seq_len or positions.dim() not in (1, 2):
        raise ValueError(f"positions must have shape (T,) or (B, T) with T={seq_len}, got {tuple(positions.shape)}")
    # Values are not range-checked (a device sync per call); they must lie in [0, max_positions).
    positions = positions.to(device)
    if positions.dim() == 1:
        return cos[positions], sin[positions]  # (T, D/2)
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, D/2)


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, T, D)`` by its positions' angles.

    ``positions`` defaults to ``0..T-1``; a ``(T,)`` or ``(B, T)`` integer tensor gives arbitrary,
    even non-contiguous positions (a decode step passes the cache length). The rotation is computed in
    float32 and cast back to ``x.dtype``.
    """
    if impl not in ("auto", "torch"):
        raise ValueError(f"impl must be 'auto' or 'torch' (the Triton path arrives with module 02), got {impl!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, H, T, D), got {tuple(x.shape)}")
    head_dim = x.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] * 2 != head_dim:
        raise ValueError(
            f"cos and sin must both be (max_positions, {head_dim // 2}) for head_dim={head_dim}, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if positions is not None and positions.dim() == 2 and positions.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"positions of shape {tuple(positions.shape)} do not match batch size {x.shape[0]}")
    cos, sin = _gather_angles(cos.to(x.device), sin.to(x.device), positions, x.shape[2], x.device)

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
