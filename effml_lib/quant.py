"""Quantization: weights stored as small integers and a scale per group (module 05).

A group of numbers ``w`` becomes integer codes ``c`` and a ``scale`` (and, asymmetric, a zero point
``z``) such that ``w ≈ (c - z) * scale``. Rounding to the nearest code makes every element's error at
most ``scale / 2``; the smaller the group, the smaller its range, its scale and its error, and the more
scales to store. Groups run along the last dimension: ``group_size=None`` is one scale per row (per
output channel of an ``(out, in)`` weight), ``g`` one per ``g`` consecutive elements of a row, and
``per_tensor=True`` one for the whole tensor.

- symmetric: ``scale = absmax / (2**(bits-1) - 1)``, codes in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``,
  no zero point (0.0 is code 0);
- asymmetric: the group's range ``[min, max]`` (widened to hold 0.0, so that zero is exact) over
  ``2**bits - 1`` steps, codes in ``[0, 2**bits - 1]``, an integer zero point ``z`` (the code of 0.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .device import IMPLS, resolve_impl


@dataclass
class QTensor:
    """A quantized tensor: ``dequantize`` gives back ``(codes - zero) * scale`` in ``dtype``, of ``shape``.

    ``codes`` has the tensor's shape (int8 symmetric, uint8 asymmetric); ``scale`` (float32) and ``zero``
    (uint8, None when symmetric) have one entry per group: shape ``(*rows, n_groups)``, or ``()`` per tensor.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int | None
    shape: torch.Size
    dtype: torch.dtype = torch.float32

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def _check(w, bits, group_size, per_tensor) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() == 0 or w.numel() == 0:
        raise ValueError(f"w must have at least one dimension and one element, got shape {tuple(w.shape)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if group_size is not None:
        if per_tensor:
            raise ValueError("give group_size or per_tensor=True, not both")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int or None (one group per row), got {group_size!r}")
        if w.shape[-1] % group_size:
            raise ValueError(f"group_size {group_size} must divide the row length {w.shape[-1]} (w's last dimension)")


def _grouped(w, group_size, per_tensor) -> torch.Tensor:
    """w (..., n) as float32 groups (..., n_groups, group): one scale per group."""
    wf = w.float()
    if per_tensor:
        return wf.reshape(1, -1)
    group = w.shape[-1] if group_size is None else group_size
    return wf.reshape(*w.shape[:-1], w.shape[-1] // group, group)


def quantize(w: torch.Tensor, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
             per_tensor: bool = False) -> QTensor:
    """Round-to-nearest quantization of ``w`` to ``bits``-bit codes, one scale per group (module docstring)."""
    _check(w, bits, group_size, per_tensor)
    groups = _grouped(w, group_size, per_tensor)  # (..., n_groups, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(dim=-1) / qmax  # (..., n_groups)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale, codes 0
        codes = torch.round(groups / scale[..., None]).clamp(-qmax, qmax).to(torch.int8)
        zero = None
    else:
        levels = 2**bits - 1
        low = groups.amin(dim=-1).clamp(max=0.0)  # the range holds 0.0, so that zero has an exact code
        high = groups.amax(dim=-1).clamp(min=0.0)
        scale = (high - low) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
        zero_point = torch.round(-low / scale).clamp(0, levels)  # the code of 0.0
        codes = (torch.round(groups / scale[..., None]) + zero_point[..., None]).clamp(0, levels).to(torch.uint8)
        zero = zero_point.to(torch.uint8)
    if per_tensor:
        scale, zero = scale.reshape(()), None if zero is None else zero.reshape(())
    return QTensor(codes.reshape(w.shape), scale, zero, bits, group_size, w.shape, w.dtype)


def dequantize(qt: QTensor) -> torch.Tensor:
    """``(codes - zero) * scale`` per group, in the original dtype and shape."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"qt must be a QTensor (from quantize), got {type(qt).__name__}")
    per_tensor = qt.scale.dim() == 0
    groups = _grouped(qt.codes, qt.group_size, per_tensor)  # float32 codes (..., n_groups, group)
    scale = qt.scale.reshape(1) if per_tensor else qt.scale
    if qt.zero is not None:
        groups = groups - (qt.zero.reshape(1) if per_tensor else qt.zero).float()[..., None]
    return (groups * scale[..., None]).reshape(qt.shape).to(qt.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two unsigned 4-bit codes (0..15) per byte along the last dim: element ``2i`` in the low nibble of
    byte ``i``, element ``2i + 1`` in its high nibble. ``(..., 2n)`` -> uint8 ``(..., n)``."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"codes' last dimension must be even (two codes per byte), got shape {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"codes must lie in 0..15 for 4 bits, got {codes.min().item()} to {codes.max().item()}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: uint8 ``(..., n)`` -> uint8 codes ``(..., 2n)``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor (from pack_int4), got {getattr(packed, 'dtype', type(packed).__name__)}")
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # (..., n, 2) -> (..., 2n): low nibble first


def kmeans_quantize(w: torch.Tensor, bits: int = 4, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Deep Compression's weight sharing: ``2**bits`` shared values (a codebook) for the whole tensor,
    found by k-means (Lloyd's algorithm, started evenly between min and max), each weight stored as the
    index of its nearest one. Returns ``(codes, centroids)``: uint8 codes of ``w``'s shape and float32
    ``centroids`` ``(2**bits,)`` in increasing order; ``centroids[codes]`` approximates ``w``.

    Unlike linear quantization, the levels crowd where the weights are (around 0 for a bell-shaped
    layer), so at 2-4 bits the error is smaller for the same number of codes.
    """
    _check(w, bits, None, False)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    x = w.detach().float().flatten()  # (N,)
    k = 2**bits
    centroids = torch.linspace(x.min().item(), x.max().item(), k)  # linear start: Deep Compression's best
    for _ in range(iters):
        codes = _nearest(x, centroids)
        sums = torch.zeros(k).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=k)
        # In 1-D the cells are intervals, so the means stay in order; an empty cell keeps its value.
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return _nearest(x, centroids).to(torch.uint8).reshape(w.shape), centroids


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each x's nearest centroid (sorted centroids: the cell boundaries are the midpoints)."""
    return torch.bucketize(x, (centroids[1:] + centroids[:-1]) / 2)


def smoothquant_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel smoothing factors ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``.

    Dividing the activations' channel ``j`` by ``s_j`` and multiplying the weight's column ``j`` by it
    leaves ``X W^T`` unchanged and moves the outliers' range from the activations into the weights:
    ``alpha = 1`` flattens every activation channel to maximum 1 (all the range goes to the weights),
    ``alpha = 0`` flattens the weight's columns instead (all of it stays with the activations), and
    ``0.5`` gives both the same per-channel maximum. ``act_absmax`` and ``w_absmax`` are ``(in_features,)`` channel maxima (of
    calibration activations, and of the weight's columns).
    """
    for name, t in (("act_absmax", act_absmax), ("w_absmax", w_absmax)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D float tensor of per-channel maxima, got {getattr(t, 'shape', t)!r}")
        if (t < 0).any():
            raise ValueError(f"{name} holds maxima of |values|: it cannot be negative")
    if act_absmax.shape != w_absmax.shape:
        raise ValueError(f"act_absmax {tuple(act_absmax.shape)} and w_absmax {tuple(w_absmax.shape)} must have one entry per input channel")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    tiny = 1e-5  # a channel that is zero everywhere: leave it (almost) alone rather than divide by zero
    return (act_absmax.float().clamp(min=tiny) ** alpha / w_absmax.float().clamp(min=tiny) ** (1 - alpha)).clamp(min=tiny)


def awq_scales(weight: torch.Tensor, activations: torch.Tensor, bits: int = 4, group_size: int = 128,
               grid: int = 20) -> torch.Tensor:
    """AWQ's activation-aware per-input-channel scales for a linear layer (Lin et al., 2023).

    A few input channels carry much larger activations than the rest; their weights matter most to the
    output. Scaling weight column ``j`` up by ``s_j`` (and the activation down by it) gives those columns
    more of the quantization grid. AWQ takes ``s = mean|X_j|**a`` and searches ``a`` on ``grid`` points of
    ``[0, 1)`` for the smallest output error ``|Q(W s) (X / s)^T - W X^T|^2``, ``Q`` the weight-only
    quantization (asymmetric, ``bits``, ``group_size``) that will be used. ``a = 0`` (no scaling) is on the
    grid, so the result is never worse than plain quantization on the calibration activations.

    ``weight`` ``(out, in)``, ``activations`` ``(N, in)`` calibration inputs; returns float32 ``(in,)``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor (out, in), got {getattr(weight, 'shape', weight)!r}")
    if not isinstance(activations, torch.Tensor) or activations.dim() != 2 or activations.shape[1] != weight.shape[1]:
        raise ValueError(f"activations must be (N, {weight.shape[1]}): calibration inputs of this layer, "
                         f"got {getattr(activations, 'shape', activations)!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    _check(weight, bits, group_size, False)
    w, x = weight.detach().float(), activations.detach().float()
    reference = x @ w.T  # (N, out): what the layer computes unquantized
    importance = x.abs().mean(dim=0).clamp(min=1e-8)  # (in,)
    best, best_error = torch.ones_like(importance), float("inf")
    for a in torch.arange(grid, dtype=torch.float32) / grid:  # 0, 1/grid, ..., (grid-1)/grid
        s = importance**a
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (only their ratios matter)
        w_q = dequantize(quantize(w * s, bits, group_size, symmetric=False))
        error = ((x / s) @ w_q.T - reference).pow(2).mean().item()
        if error < best_error:
            best, best_error = s, error
    return best


class QuantLinear(nn.Module):
    """A weight-only quantized ``nn.Linear`` (W8A16 / W4A16): the weight is stored as codes and per-group
    scales, and dequantized to the input's dtype in the matmul; activations stay in 16/32 bits.

    - ``bits=8``: symmetric int8 codes, one scale per group, no zero point (W8A16);
    - ``bits=4``: asymmetric 4-bit codes packed two per byte (:func:`pack_int4`), a scale and a uint8
      zero point per group (W4A16; the scheme of AWQ/GPTQ checkpoints), ``w = (code - zero) * scale``;
    - ``bits=4, offset=True``: the same codes and scales with a float16 offset per group instead of the
      zero point, ``w = code * scale + offset``: GGUF's Q4_1 (``w = d * q + m``) exactly, whose ``m`` is
      rarely a whole number of steps (``checkpoints.load_gguf(..., quantized=True)``).

    Buffers: ``codes`` (int8 ``(out, in)`` or uint8 packed ``(out, in / 2)``), ``scale`` float16
    ``(out, in / group_size)``, ``zero`` uint8 (4 bits only) or ``offset`` float16 (4 bits, offset=True),
    ``bias`` (kept in its dtype, if any).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int | None = 128,
                 bias: bool = False, device=None, impl: str = "auto", offset: bool = False):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl  # "auto": the Triton kernel on CUDA, else the PyTorch reference
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 (W4A16) or 8 (W8A16), got {bits!r}")
        if not isinstance(offset, bool):
            raise TypeError(f"offset must be True or False, got {offset!r}")
        if offset and bits != 4:
            raise ValueError(f"offset=True (w = code * scale + offset) is a 4-bit form; bits is {bits}")
        group = in_features if group_size is None else group_size
        if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or in_features % group:
            raise ValueError(f"group_size {group_size!r} must be a positive int dividing in_features={in_features}")
        if bits == 4 and group % 2:
            raise ValueError(f"group_size must be even for packed 4-bit codes, got {group}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group
        groups = (out_features, in_features // group)  # the shape of scale, zero and offset
        if bits == 8:
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        else:
            self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        four_bit_zero = bits == 4 and not offset  # None buffers: absent from the state dict
        self.register_buffer("zero", torch.zeros(groups, dtype=torch.uint8, device=device) if four_bit_zero else None)
        self.register_buffer("offset", torch.zeros(groups, dtype=torch.float16, device=device) if offset else None)
        self.register_buffer("scale", torch.ones(groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128, impl: str = "auto") -> "QuantLinear":
        """Quantize ``linear``'s weight (round to nearest; the bias is kept as it is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                linear.weight.device, impl)
        qt = quantize(linear.weight.detach(), bits, q.group_size, symmetric=(bits == 8))
        with torch.no_grad():
            q.codes.copy_(qt.codes if bits == 8 else pack_int4(qt.codes))
            q.scale.copy_(qt.scale)  # float16: what the kernels read (the error bound uses this scale)
            if bits == 4:
                q.zero.copy_(qt.zero)
            if linear.bias is not None:
                q.bias = linear.bias.detach().clone()
        return q

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The weight ``(out, in)`` the layer computes with: ``(codes - zero) * scale`` per group, or
        ``codes * scale + offset`` in the offset form."""
        codes = self.codes.float() if self.bits == 8 else unpack_int4(self.codes).float()  # (out, in)
        groups = codes.view(self.out_features, -1, self.group_size)  # (out, n_groups, group)
        if self.zero is not None:
            groups = groups - self.zero.float()[..., None]
        weight = groups * self.scale.float()[..., None]
        if self.offset is not None:
            weight = weight + self.offset.float()[..., None]
        return weight.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_impl(self.impl, x.device) == "triton":
            from .kernels.quant_matmul import fits, quant_matmul_op  # imports Triton, so only when used

            if fits(self.bits, self.group_size, self.in_features):  # else: the reference, below
                return quant_matmul_op(x, self.codes, self.scale, self.zero, self.bias, self.bits,
                                       self.group_size, self.in_features, self.offset)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)  # the PyTorch reference

    @property
    def weight_bytes(self) -> int:
        """Bytes the weight takes: codes, scales and zero points or offsets (what a decode step reads)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero, self.offset) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}" + (", offset=True" if self.offset is not None else ""))


def quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 128, targets=None,
                   impl: str = "auto") -> nn.Module:
    """Swap the model's linear layers (by default every block's; not the LM head) for :class:`QuantLinear`,
    in place (``model.replace_linears``); returns the model."""
    from .model import replace_linears

    replace_linears(model, lambda name, linear: QuantLinear.from_linear(linear, bits, group_size, impl), targets)
    return model
