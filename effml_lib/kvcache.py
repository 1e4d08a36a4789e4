"""The KV cache: how big it is, and a static, preallocated one for decoding.

During decoding every new token attends to the keys and values of all previous tokens. Recomputing
them each step costs O(T^2) work over a generation; caching them costs memory instead:

    bytes = 2 (K and V) * batch * seq_len * n_layers * n_kv_heads * head_dim * bytes_per_elem
"""

from __future__ import annotations

import torch
from torch import nn

from .grading import guard


def kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2) -> int:
    """Bytes of a KV cache holding ``seq_len`` tokens for ``batch_size`` sequences (bytes_per_elem may be
    fractional, 0.5 for int4; the total is rounded down to whole bytes)."""
    guard("kvcache.kv_cache_bytes")
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

    def update(self, layer: int, k_new, v_new, positions: torch.Tensor, visible: int | None):
        """Store k/v_new (B, Hkv, T, D) at ``positions`` (T,) of ``layer``, after checking them all:
        a clear error for a wrong shape or dtype, or a position outside [0, max_seq_len) (on a GPU
        that check waits for the device). Returns what :meth:`write` returns.
        """
        if k_new.shape != v_new.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        k_layer, _ = self.layer(layer)  # (B, Hkv, S, D)
        b, h_kv, s, d = k_layer.shape
        if k_new.dim() != 4 or (k_new.shape[0], k_new.shape[1], k_new.shape[3]) != (b, h_kv, d):
            raise ValueError(f"k/v must have shape ({b}, {h_kv}, T, {d}) for this cache, got {tuple(k_new.shape)}")
        if k_new.dtype != k_layer.dtype:
            raise TypeError(f"k/v dtype {k_new.dtype} differs from the cache's {k_layer.dtype}")
        if positions.dim() != 1 or positions.shape[0] != k_new.shape[2]:
            raise ValueError(f"positions must have shape ({k_new.shape[2]},), got {tuple(positions.shape)}")
        if positions.numel() and not torch.compiler.is_compiling():
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or high >= s:
                raise ValueError(f"cache overflow: positions must lie in [0, max_seq_len={s}), got {low} to {high}")
        return self.write(layer, k_new, v_new, positions, visible)

    def write(self, layer: int, k_new, v_new, positions: torch.Tensor, visible: int | None):
        """:meth:`update` without its checks, for ``Transformer.forward``, which has checked its positions
        once for all layers: no per-layer checks and no device sync in the decode loop.

        Returns the keys and values attention should see: the first ``visible`` positions, or the
        whole buffer when ``visible`` is None (the caller then masks the unwritten tail).
        """
        guard("kvcache.StaticKVCache")
        k_layer, v_layer = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")  # (B, Hkv, S, D)
        k_layer.index_copy_(2, positions, k_new)
        v_layer.index_copy_(2, positions, v_new)
        if visible is None:
            return k_layer, v_layer
        return k_layer[:, :, :visible], v_layer[:, :, :visible]

    def reset(self) -> None:
        for buffer in self.buffers():
            buffer.zero_()
