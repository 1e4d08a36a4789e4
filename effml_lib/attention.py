"""Scaled dot-product attention: the reference, PyTorch's fused path, and the attention layer.

Shapes used throughout:
  q    (B, H,   Tq, D)   queries of H heads
  k, v (B, Hkv, Tk, D)   keys/values of Hkv heads, H % Hkv == 0 (MHA: Hkv == H, GQA: 1 < Hkv < H, MQA: Hkv == 1)

Causal masking is aligned to the *end* of the keys: query ``i`` sits at absolute position
``Tk - Tq + i`` and may see keys ``0 .. Tk - Tq + i``. That is what a decode step with a KV cache
needs (Tq = 1 new token against Tk cached ones). ``torch.nn.functional.scaled_dot_product_attention``
with ``is_causal=True`` aligns to the *start* instead, which is wrong whenever Tq < Tk; we never
rely on it in that case.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .device import resolve_impl
from .rope import apply_rope_qk_unchecked

ATTENTION_IMPLS = ("auto", "torch", "sdpa")


def _sdpa_supports_gqa() -> bool:
    """enable_gqa arrived in torch 2.5; with it SDPA handles head groups without copying K/V."""
    q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


_SDPA_HAS_GQA = _sdpa_supports_gqa()


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may attend to key j (end-aligned)."""
    if q_len > k_len:
        raise ValueError(f"causal attention needs q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    offset = k_len - q_len
    query_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset  # (Tq, 1)
    key_pos = torch.arange(k_len, device=device).unsqueeze(0)  # (1, Tk)
    return key_pos <= query_pos


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each KV head repeated for its group of query heads.

    This *copies*; it exists to explain GQA and as a test reference. ``attention`` itself never calls it.
    """
    if n_rep == 1:
        return x
    b, h_kv, t, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, t, d).reshape(b, h_kv * n_rep, t, d)


def _check_qkv(q, k, v, mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, H, T, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, h, _, d), (bk, h_kv, _, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch size and head_dim")
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got {getattr(mask, 'dtype', type(mask).__name__)}")
        target = (b, h, q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(mask.shape, target)
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Tq, Tk) = {target}") from None


def attention_reference(q, k, v, causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The readable reference: softmax(q k^T / sqrt(D) + mask) v, in float32 (float64 stays float64),
    GQA by head groups.

    Grouping: the G = H // Hkv query heads that share one KV head are folded into the query-length
    axis, so one ordinary batched matmul serves the whole group and K/V are never repeated per query
    head. (bf16/fp16 inputs are upcast to float32 once, at Hkv heads, for an accurate softmax.)
    ``mask`` is a boolean tensor broadcastable to (B, H, Tq, Tk), True where attention is allowed.
    """
    b, h, tq, d = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    groups = h // h_kv
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)

    q_grouped = qf.reshape(b, h_kv, groups * tq, d)  # heads of a group are adjacent: (B, Hkv, G*Tq, D)
    scores = q_grouped @ kf.transpose(-2, -1) / math.sqrt(d)  # (B, Hkv, G*Tq, Tk)
    scores = scores.view(b, h_kv, groups, tq, tk)

    allowed = causal_mask(tq, tk, q.device) if causal else None  # (Tq, Tk), broadcasts over groups
    if mask is not None:
        # (B|1, H|1, Tq|1, Tk) -> (B, Hkv, G, Tq, Tk), matching the grouped scores
        grouped = torch.broadcast_to(mask, (b, h, tq, tk)).reshape(b, h_kv, groups, tq, tk)
        allowed = grouped if allowed is None else (allowed & grouped)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))

    probs = torch.softmax(scores, dim=-1)
    # A row with no allowed key gives NaN from softmax; define its output as zeros.
    probs = torch.nan_to_num(probs, nan=0.0)
    out = probs.view(b, h_kv, groups * tq, tk) @ vf  # (B, Hkv, G*Tq, D)
    return out.view(b, h, tq, d).to(q.dtype)


def _attention_sdpa(q, k, v, causal, mask):
    """PyTorch's fused SDPA, used only with semantics identical to the reference."""
    tq, tk = q.shape[2], k.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    # SDPA's is_causal is start-aligned and cannot be combined with a mask: build the
    # end-aligned causal mask ourselves unless it is the one case is_causal gets right.
    if causal and (tq != tk or mask is not None):
        causal_part = causal_mask(tq, tk, q.device)
        mask = causal_part if mask is None else (mask & causal_part)
        causal = False
    kwargs = {}
    if n_rep > 1:
        if _SDPA_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **kwargs)


def attention(q, k, v, causal: bool = True, mask: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention. q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (B, H, Tq, D).

    impl: "torch" the reference above; "sdpa" PyTorch's fused kernel; "auto" SDPA when it computes
    exactly the reference's function (no fully masked rows are possible, GQA supported natively),
    otherwise the reference.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    _check_qkv(q, k, v, mask)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={q.shape[2]}, Tk={k.shape[2]}")
    if impl == "auto":
        # SDPA gives NaN for fully masked rows where the reference gives zeros, so only take it when
        # no user mask can create such rows, and when it can group heads without a copy.
        use_sdpa = mask is None and (_SDPA_HAS_GQA or q.shape[1] == k.shape[1])
        impl = "sdpa" if use_sdpa else "torch"
    if impl == "sdpa":
        return _attention_sdpa(q, k, v, causal, mask)
    return attention_reference(q, k, v, causal=causal, mask=mask)


DECODE_IMPLS = ("auto", "torch", "sdpa", "triton")
# Query rows (G = H / Hkv heads x Tq queries) up to which "auto" gives a step to the Triton kernel: it
# holds all of a group's rows in one tile, which suits decode (a few new tokens), not a long prefill.
TRITON_MAX_ROWS = 64


def decode_attention(q, k, v, context_lens=None, impl: str = "auto") -> torch.Tensor:
    """A decode step's attention: q ``(B, H, Tq, D)`` (a few new tokens) against a cache k/v
    ``(B, Hkv, S, D)`` of which sequence b fills the first ``context_lens[b]`` positions (all S if None).

    Causal and end-aligned per sequence: query i of sequence b sits at ``context_lens[b] - Tq + i``
    (the new tokens are already written to the cache) and sees keys up to it; keys past
    ``context_lens[b]`` are masked out, whatever (finite) values they hold, and the Triton kernel
    does not even read them. ``impl``: ``"torch"`` (``attention_reference``
    with a per-sequence mask), ``"sdpa"`` (PyTorch's fused kernel with that mask), ``"triton"`` (the
    split-K kernel of ``kernels/decode_attention.py``, head_dim >= 16), ``"auto"``: Triton on CUDA for
    up to ``TRITON_MAX_ROWS`` query rows per KV head, else SDPA where it groups heads natively, else
    the reference.
    """
    if impl not in DECODE_IMPLS:
        raise ValueError(f"impl must be one of {DECODE_IMPLS}, got {impl!r}")
    _check_qkv(q, k, v, None)
    b, _, tq, d = q.shape
    s = k.shape[2]
    if context_lens is None:
        context_lens = torch.full((b,), s, dtype=torch.int32, device=q.device)
    if not isinstance(context_lens, torch.Tensor) or context_lens.is_floating_point() or context_lens.shape != (b,):
        raise TypeError(f"context_lens must be an integer tensor of shape ({b},), got {context_lens!r:.80}")
    context_lens = context_lens.to(device=q.device, dtype=torch.int32)
    if not torch.compiler.is_compiling():
        low, high = int(context_lens.min()), int(context_lens.max())
        if low < tq or high > s:
            raise ValueError(f"context_lens must lie in [Tq={tq}, S={s}] (the new tokens are in the cache), "
                             f"got values from {low} to {high}")
    if impl == "triton":
        resolve_impl("triton", q.device)  # a clear error where Triton cannot run
        if d < 16:
            raise ValueError(f"the Triton decode kernel needs head_dim >= 16, got {d}; use impl='torch'")
    return decode_attention_unchecked(q, k, v, context_lens, impl)


def _pick_decode_impl(q, k) -> str:
    """What ``impl="auto"`` means for these shapes and this device (no data is looked at)."""
    rows = q.shape[1] // k.shape[1] * q.shape[2]
    if resolve_impl("auto", q.device) == "triton" and q.shape[-1] >= 16 and rows <= TRITON_MAX_ROWS:
        return "triton"
    return "sdpa" if _SDPA_HAS_GQA or q.shape[1] == k.shape[1] else "torch"


def decode_attention_unchecked(q, k, v, context_lens, impl: str = "auto") -> torch.Tensor:
    """:func:`decode_attention` without its checks (``context_lens`` an int32 ``(B,)`` tensor on q's
    device, each in ``[Tq, S]``), for the model, which checks positions once per forward: no
    per-layer device sync, and nothing that stops ``torch.compile`` from capturing the whole step."""
    if impl == "auto":
        impl = _pick_decode_impl(q, k)
    if impl == "triton":
        from .kernels.decode_attention import decode_attention_op  # imports Triton, so only when used

        return decode_attention_op(q, k, v, context_lens)
    tq, s = q.shape[2], k.shape[2]
    key_pos = torch.arange(s, device=q.device)  # (S,)
    query_pos = context_lens[:, None] - tq + torch.arange(tq, device=q.device)  # (B, Tq)
    visible = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # (B, 1, Tq, S)
    if impl == "sdpa":
        # Every query sees at least key 0 (context_lens >= Tq), so no row is fully masked and SDPA
        # computes exactly the reference's function.
        return _attention_sdpa(q, k, v, causal=False, mask=visible)
    return attention_reference(q, k, v, causal=False, mask=visible)


class Attention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` key/value heads (MHA, GQA or MQA) and RoPE.

    Projections are named as in Meta's Llama code: wq, wk, wv, wo.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or n_kv_heads <= 0:
            raise ValueError(f"n_heads and n_kv_heads must be positive, got {n_heads} and {n_kv_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads}) when head_dim is not given")
            head_dim = dim // n_heads
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        self.n_heads, self.n_kv_heads, self.head_dim, self.impl = n_heads, n_kv_heads, head_dim, impl
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=out_bias)

    def qkv_sizes(self) -> list[int]:
        """Output features of q, k and v: where a fused ``wqkv``'s output splits."""
        return [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]

    def fuse_qkv(self) -> "Attention":
        """Replace wq, wk and wv by one linear layer ``wqkv`` (their weights stacked by rows), in place.

        The same outputs from one matrix product instead of three: at decode, one larger kernel where
        there were three small ones. Rows are kept whole, so quantizing ``wqkv`` afterwards gives the
        codes and scales the three layers would have had.
        """
        self.wqkv = concatenated_linear(self.wq, self.wk, self.wv)
        del self.wq, self.wk, self.wv
        return self

    def forward(self, x, cos, sin, positions=None, cache=None, layer: int = 0):
        """x (B, T, dim) -> (B, T, dim). cos/sin: the model's RoPE tables (max_seq_len, D/2).

        Without a cache the T tokens sit at positions 0..T-1 and attend causally to each other.
        With one, ``positions`` (B, T) says where each sequence's tokens sit (consecutive in a row);
        the cache stores this step's keys and values and decides what the queries attend to, through
        the cache protocol (``kvcache.KVCache``): ``update`` then ``attention``.
        """
        b, t, _ = x.shape
        if "wqkv" in self._modules:  # fused (fuse_qkv): one product, its output split
            q, k, v = self.wqkv(x).split(self.qkv_sizes(), dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope_qk_unchecked(q, k, cos, sin, positions)  # one Triton kernel on a GPU
        if cache is None:
            out = attention(q, k, v, causal=True, impl=self.impl)  # (B, H, T, D)
        else:
            keys, values, context_lens = cache.update(layer, k, v, positions)
            out = cache.attention(q, keys, values, context_lens, impl=self.impl)  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def concatenated_linear(*linears: nn.Module) -> nn.Linear:
    """One ``nn.Linear`` whose output is the given layers' outputs side by side (weights stacked by rows)."""
    for m in linears:
        if type(m) is not nn.Linear:
            raise TypeError(f"only plain nn.Linear layers can be fused (fuse before quantizing or adding adapters), "
                            f"got {type(m).__name__}")
    first = linears[0]
    if any(m.in_features != first.in_features or (m.bias is None) != (first.bias is None) for m in linears):
        raise ValueError("fused layers need the same in_features and all or none with a bias, got "
                         + ", ".join(f"({m.in_features}, bias={m.bias is not None})" for m in linears))
    bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))  # (sum of out, in)
        if bias:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


def pool_heads(weight: torch.Tensor, head_dim: int, n_groups: int) -> torch.Tensor:
    """A projection's output heads mean-pooled into ``n_groups`` heads: the GQA paper's conversion.

    ``weight`` is a projection's weight ``(n_heads * head_dim, in)`` (rows ``i*D .. (i+1)*D - 1`` make
    head i) or its bias ``(n_heads * head_dim,)``. New head g is the mean of old heads
    ``g*G .. (g+1)*G - 1``, ``G = n_heads // n_groups``: the adjacent grouping attention uses. Averaged
    in float32 (float64 stays float64) and rounded once to the input's dtype; the input is unchanged.
    Returns ``(n_groups * head_dim, in)`` (or ``(n_groups * head_dim,)``).
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() not in (1, 2):
        raise TypeError(f"weight must be a floating-point tensor (n_heads * head_dim, in) or a bias "
                        f"(n_heads * head_dim,), got {getattr(weight, 'shape', type(weight).__name__)}")
    for name, value in (("head_dim", head_dim), ("n_groups", n_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if weight.shape[0] % head_dim:
        raise ValueError(f"weight's first dimension ({weight.shape[0]}) must be a multiple of head_dim ({head_dim})")
    n_heads = weight.shape[0] // head_dim
    if n_heads % n_groups:
        raise ValueError(f"n_groups ({n_groups}) must divide the {n_heads} heads: "
                         f"each new head is the mean of a whole group of old ones")
    rest = weight.shape[1:]  # (in,) for a weight, () for a bias
    exact = torch.promote_types(weight.dtype, torch.float32)
    grouped = weight.to(exact).reshape(n_groups, n_heads // n_groups, head_dim, *rest)  # (n_groups, G, D, ...)
    return grouped.mean(dim=1).reshape(n_groups * head_dim, *rest).to(weight.dtype)


def _attention_to_gqa(attention: "Attention", n_kv_heads: int) -> None:
    """Pool ``attention``'s K and V projections, in place, down to ``n_kv_heads`` heads."""
    if attention.n_kv_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide the module's {attention.n_kv_heads} KV heads: "
                         f"each new head is the mean of a whole group of old ones")
    for name in ("wk", "wv"):
        old = getattr(attention, name)  # (n_kv_heads_old * D, dim)
        pooled = nn.Linear(old.in_features, n_kv_heads * attention.head_dim, bias=old.bias is not None,
                           device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            pooled.weight.copy_(pool_heads(old.weight, attention.head_dim, n_kv_heads))
            if old.bias is not None:
                pooled.bias.copy_(pool_heads(old.bias, attention.head_dim, n_kv_heads))
        setattr(attention, name, pooled)
    attention.n_kv_heads = n_kv_heads


def mha_to_gqa(module_or_model, n_kv_heads: int):
    """A copy of an ``Attention`` module or a whole ``Transformer`` with ``n_kv_heads`` key/value heads.

    The conversion of the GQA paper (Ainslie et al., 2023): each new K (and V) projection head is the
    mean of the group of heads whose queries will share it, heads ``g*G .. (g+1)*G - 1`` for group g,
    which is the grouping attention uses (query head h reads KV head h // (H / Hkv)). Mean-pooling
    before RoPE equals pooling after it: RoPE rotates every head of a position alike, a linear map.
    Works from MHA or from a GQA model with a multiple of ``n_kv_heads`` heads; the input is unchanged.
    """
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads <= 0:
        raise ValueError(f"n_kv_heads must be a positive int, got {n_kv_heads!r}")
    if isinstance(module_or_model, Attention):
        converted = copy.deepcopy(module_or_model)
        _attention_to_gqa(converted, n_kv_heads)
        return converted
    layers, config = getattr(module_or_model, "layers", None), getattr(module_or_model, "config", None)
    if layers is None or config is None or not all(isinstance(getattr(b, "attention", None), Attention) for b in layers):
        raise TypeError(f"mha_to_gqa takes an attention.Attention or a model.Transformer, "
                        f"got {type(module_or_model).__name__}")
    if config.n_kv_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide the model's {config.n_kv_heads} KV heads: "
                         f"each new head is the mean of a whole group of old ones")
    converted = copy.deepcopy(module_or_model)
    for block in converted.layers:
        _attention_to_gqa(block.attention, n_kv_heads)
    converted.config = dataclasses.replace(config, n_kv_heads=n_kv_heads)
    return converted
