"""The KV cache: how big it is, and a static, preallocated one for decoding.

During decoding every new token attends to the keys and values of all previous tokens. Recomputing
them each step costs O(T^2) work over a generation; caching them costs memory instead:

    bytes = 2 (K and V) * batch * seq_len * n_layers * n_kv_heads * head_dim * bytes_per_elem
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .attention import decode_attention_unchecked


def kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2) -> int:
    """Bytes of a KV cache holding ``seq_len`` tokens for ``batch_size`` sequences (bytes_per_elem may be
    fractional, 0.5 for int4; the total is rounded down to whole bytes)."""
    for name, value in dict(
        batch_size=batch_size, seq_len=seq_len, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim
    ).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(bytes_per_elem, (int, float)) or bytes_per_elem <= 0:
        raise ValueError(f"bytes_per_elem must be a positive number, got {bytes_per_elem!r}")
    return int(2 * batch_size * seq_len * n_layers * n_kv_heads * head_dim * bytes_per_elem)


# Published shapes of real models, as in each model's config.json on the Hugging Face hub
# (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
# vocab_size, rope_theta). Keys are ModelConfig field names, so ModelConfig(**shape) builds a model of
# that shape (add max_seq_len and norm_eps as needed). For a mixture of experts (Mixtral) the shape is
# that of one expert's dense model: attention, and so the KV cache, is exactly the model's.
MODEL_SHAPES: dict[str, dict] = {
    # meta-llama/Llama-2-7b-hf config.json
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000, rope_theta=10000.0),
    # meta-llama/Llama-2-13b-hf config.json
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824, vocab_size=32000, rope_theta=10000.0),
    # meta-llama/Llama-2-70b-hf config.json (the first Llama to use GQA)
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, vocab_size=32000, rope_theta=10000.0),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256, rope_theta=500000.0),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama-3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, vocab_size=128256, rope_theta=500000.0),
    # mistralai/Mistral-7B-v0.1 config.json (also uses a 4096-token sliding window)
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000, rope_theta=10000.0),
    # mistralai/Mixtral-8x7B-v0.1 config.json (num_local_experts=8, num_experts_per_tok=2: see MODEL_EXPERTS)
    "mixtral-8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000, rope_theta=1000000.0),
    # Qwen/Qwen2.5-7B config.json (q/k/v projections carry a bias)
    "qwen2.5-7b": dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944, vocab_size=152064, rope_theta=1000000.0, qkv_bias=True),
}

# Mixture-of-experts models: each layer's feed-forward is n_experts copies of the dense one, of which a
# router (a dim x n_experts linear layer) picks experts_per_token per token.
MODEL_EXPERTS: dict[str, dict] = {
    "mixtral-8x7b": dict(n_experts=8, experts_per_token=2),  # config.json: num_local_experts, num_experts_per_tok
}

# Parameter counts: "total" is the exact count the Hugging Face hub reports for each repository's
# safetensors weights (embeddings and output head untied in all of these); "active" is what one token
# uses, for the MoE model (Mistral AI's "Mixtral of experts" post, Dec 2023: 46.7B total, 12.9B active).
# tests/test_kvcache.py rebuilds each from MODEL_SHAPES with the course's Transformer.
MODEL_PARAMS: dict[str, dict] = {
    "llama-2-7b": dict(total=6_738_415_616),
    "llama-2-13b": dict(total=13_015_864_320),
    "llama-2-70b": dict(total=68_976_648_192),
    "llama-3-8b": dict(total=8_030_261_248),
    "llama-3-70b": dict(total=70_553_706_496),
    "mistral-7b": dict(total=7_241_732_096),
    "mixtral-8x7b": dict(total=46_702_792_704, active=12_879_925_248),
    "qwen2.5-7b": dict(total=7_615_616_512),
}
for _counts in MODEL_PARAMS.values():
    _counts.setdefault("active", _counts["total"])  # dense: every weight is used by every token


def kv_cache_bytes_per_token(name: str, bytes_per_elem=2) -> int:
    """KV-cache bytes one token of the catalog model ``name`` costs, over all its layers."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model {name!r}; MODEL_SHAPES has {sorted(MODEL_SHAPES)}")
    s = MODEL_SHAPES[name]
    head_dim = s.get("head_dim", s["dim"] // s["n_heads"])
    return kv_cache_bytes(1, 1, s["n_layers"], s["n_kv_heads"], head_dim, bytes_per_elem)


class KVCache(Protocol):
    """What the model needs of a KV cache (static, paged, sink/window caches all implement it).

    A forward pass with a cache gives each sequence b of the batch its own positions: row b of
    ``positions`` (B, T) holds the consecutive positions of its T new tokens. Every layer then calls
    ``update`` to store its keys and values there and get back what attention must see, and
    ``attention`` to attend the queries to it; ``validate`` runs once per checked forward pass.
    """

    def validate(self, model, batch_size: int, end: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise a clear error unless the cache fits ``model``, ``batch_size`` sequences, positions
        below ``end`` (the largest position of the step + 1), and k/v of ``dtype`` on ``device``."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k/v ``(B, Hkv, T, D)`` of ``layer`` at ``positions`` ``(B, T)``; return
        ``(keys, values, context_lens)``: what attention reads, and each sequence's length (B,) int32."""

    def attention(self, q: torch.Tensor, keys, values, context_lens: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """Attention of q ``(B, H, T, D)`` to what ``update`` returned: ``(B, H, T, D)``."""


class StaticKVCache(nn.Module):
    """A preallocated cache: for each layer, K and V of shape (B, Hkv, max_seq_len, D).

    Preallocating keeps every decode step's tensors the same shape and address, which is what lets
    ``torch.compile`` and CUDA graphs replay one decode step over and over. It is an ``nn.Module``
    so the buffers follow ``.to(device)`` and compiled code sees them as fixed buffers. Each layer
    has its own buffers: an in-place write into a slice of one big (n_layers, ...) tensor is
    compiled into a copy of the whole tensor every step (measured: ~17% of a 7B decode step).
    """

    def __init__(self, n_layers, batch_size, max_seq_len, n_kv_heads, head_dim, dtype=torch.float32, device=None):
        super().__init__()
        for name, value in dict(
            n_layers=n_layers, batch_size=batch_size, max_seq_len=max_seq_len, n_kv_heads=n_kv_heads, head_dim=head_dim
        ).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.n_layers = n_layers
        layer_shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        for i in range(n_layers):
            self.register_buffer(f"k{i}", torch.zeros(layer_shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(layer_shape, dtype=dtype, device=device), persistent=False)

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None):
        """A cache shaped for ``model`` (a ``model.Transformer``), on its device and dtype by default."""
        cfg = model.config
        ref = model.tok_embeddings.weight
        return cls(
            n_layers=cfg.n_layers,
            batch_size=batch_size,
            max_seq_len=cfg.max_seq_len if max_seq_len is None else max_seq_len,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            dtype=ref.dtype if dtype is None else dtype,
            device=ref.device if device is None else device,
        )

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) buffers of layer ``i``, each (B, Hkv, max_seq_len, D)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers:
            raise ValueError(f"layer must be an int in [0, {self.n_layers}), got {i!r}")
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    @property
    def shape(self) -> tuple[int, ...]:
        """(n_layers, B, Hkv, max_seq_len, D)"""
        return (self.n_layers, *self.k0.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.k0.dtype

    @property
    def device(self) -> torch.device:
        return self.k0.device

    @property
    def max_seq_len(self) -> int:
        return self.k0.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k0.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def validate(self, model, batch_size: int, end: int, dtype: torch.dtype, device: torch.device) -> None:
        """The cache protocol's once-per-forward check (see :class:`KVCache`)."""
        cfg = model.config
        expected = (cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim)
        got = (self.n_layers, self.batch_size, self.k0.shape[1], self.k0.shape[3])
        if got != expected:
            raise ValueError(
                f"cache has (n_layers, batch, n_kv_heads, head_dim) = {got}, the model and tokens need {expected}"
            )
        if self.dtype != dtype:
            raise TypeError(f"cache dtype {self.dtype} differs from the model's {dtype}")
        if self.device != torch.device(device):
            raise ValueError(f"cache ({self.device}) and model ({device}) must be on one device")
        if end > self.max_seq_len:
            raise ValueError(f"cache overflow: positions up to {end - 1} do not fit the cache's max_seq_len={self.max_seq_len}")

    def update(self, layer: int, k_new, v_new, positions: torch.Tensor):
        """Store k/v_new ``(B, Hkv, T, D)`` at ``positions`` ``(B, T)`` (each row consecutive) of ``layer``.

        Returns ``(K, V, context_lens)``: the layer's whole buffers ``(B, Hkv, max_seq_len, D)`` and,
        per sequence, how many of their positions attention may see (``positions[:, -1] + 1``, int32).
        Shapes and dtypes are checked on every call; positions' values only when they are on the CPU
        (on a GPU that would wait for the device every layer: ``Transformer.forward`` checks them once).
        """
        if k_new.shape != v_new.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        k_layer, _ = self.layer(layer)  # (B, Hkv, S, D)
        b, h_kv, s, d = k_layer.shape
        if k_new.dim() != 4 or (k_new.shape[0], k_new.shape[1], k_new.shape[3]) != (b, h_kv, d):
            raise ValueError(f"k/v must have shape ({b}, {h_kv}, T, {d}) for this cache, got {tuple(k_new.shape)}")
        if k_new.dtype != k_layer.dtype:
            raise TypeError(f"k/v dtype {k_new.dtype} differs from the cache's {k_layer.dtype}")
        t = k_new.shape[2]
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.shape != (b, t):
            raise ValueError(f"positions must be an integer tensor of shape ({b}, {t}), got {positions!r:.80}")
        if t == 0:
            raise ValueError("a step must store at least one token (T >= 1)")
        if positions.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or high >= s:
                raise ValueError(f"cache overflow: positions must lie in [0, max_seq_len={s}), got {low} to {high}")
            if t > 1 and not bool((positions.diff(dim=1) == 1).all()):
                raise ValueError("each row of positions must be consecutive (one step's tokens of one sequence)")
        return self.write(layer, k_new, v_new, positions)

    def write(self, layer: int, k_new, v_new, positions: torch.Tensor):
        """:meth:`update` without its checks: one indexed store per buffer, every sequence at its
        own positions. Returns what :meth:`update` returns."""
        k_layer, v_layer = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")  # (B, Hkv, S, D)
        rows = torch.arange(k_layer.shape[0], device=positions.device)[:, None]  # (B, 1)
        # Indexing dims 0 and 2 by (B, T) index tensors addresses a (B, T, Hkv, D) block.
        k_layer[rows, :, positions] = k_new.transpose(1, 2)
        v_layer[rows, :, positions] = v_new.transpose(1, 2)
        context_lens = (positions[:, -1] + 1).to(torch.int32)  # (B,)
        return k_layer, v_layer, context_lens

    def attention(self, q, keys, values, context_lens, impl: str = "auto") -> torch.Tensor:
        """Each sequence's queries attend to its first ``context_lens[b]`` positions:
        :func:`attention.decode_attention` (the Triton split-K kernel on a GPU)."""
        return decode_attention_unchecked(q, keys, values, context_lens, impl)

    def reset(self) -> None:
        for buffer in self.buffers():
            buffer.zero_()
