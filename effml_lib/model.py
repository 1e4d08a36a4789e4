"""A Llama-style decoder: the model every module of the course builds on.

    tokens (B, T)
      -> token embedding                         (B, T, dim)
      -> n_layers x [ x + Attention(RMSNorm(x))   pre-norm residual blocks, RoPE, n_kv_heads
                      x + SwiGLU(RMSNorm(x)) ]
      -> RMSNorm -> LM head (optionally tied)    (B, T, vocab_size) logits

The same class loads Llama, Mistral and Qwen2 checkpoints (``checkpoints.load_hf``) and the
course's own ``effml-tiny`` models (``checkpoints.pretrained``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, concatenated_linear
from .kvcache import KVCache
from .rope import rope_frequencies


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 384
    n_layers: int = 8
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: same as n_heads (MHA)
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int | None = None  # SwiGLU inner size; None: Llama's rule, 2/3 * 4 * dim rounded up to 64
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # see rope.rope_frequencies
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v
    attn_out_bias: bool = False
    mlp_bias: bool = False
    attn_impl: str = "auto"  # see attention.attention

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("n_kv_heads", "head_dim", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"ModelConfig.{name} must be a positive int or None, got {value!r}")
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0:
            raise ValueError(f"ModelConfig.n_kv_heads must be a positive int, got {self.n_kv_heads!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_dim is None:
            self.hidden_dim = 64 * math.ceil(int(2 * 4 * self.dim / 3) / 64)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def fuse_gate_up(self) -> "FeedForward":
        """Replace w1 and w3 by one linear layer ``w13`` (gate rows, then up rows), in place: one
        matrix product instead of two, the same outputs (see ``Attention.fuse_qkv``)."""
        self.w13 = concatenated_linear(self.w1, self.w3)
        del self.w1, self.w3
        return self

    def forward(self, x):
        if "w13" in self._modules:  # fused (fuse_gate_up)
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One pre-norm decoder block: x + attn(norm(x)), then h + ffn(norm(h)).

    ``ffn`` replaces the SwiGLU feed-forward by any module mapping (B, T, dim) to (B, T, dim): a
    mixture of experts (module 09) is a block with another feed-forward, not another model.
    """

    def __init__(self, cfg: ModelConfig, ffn: nn.Module | None = None):
        super().__init__()
        if ffn is not None and not isinstance(ffn, nn.Module):
            raise TypeError(f"ffn must be an nn.Module mapping (B, T, dim) to (B, T, dim), got {type(ffn).__name__}")
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(
            cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            qkv_bias=cfg.qkv_bias, out_bias=cfg.attn_out_bias, impl=cfg.attn_impl,
        )
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias) if ffn is None else ffn

    def forward(self, x, cos, sin, positions=None, cache=None, layer: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE tables stay float32 even when the model is cast to bf16/fp16 (rounding the angles of
        # late positions to 8 bits of mantissa would shift them), so they are not buffers. Built on the
        # CPU explicitly, so a model created under torch.device("meta") still has real tables.
        self._rope = rope_frequencies(
            config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling, device="cpu"
        )
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                # residual-branch outputs start smaller so the sum over layers keeps unit scale
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied LM head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def set_rope(self, theta: float | None = None, scaling: dict | None = None, max_seq_len: int | None = None) -> "Transformer":
        """Change how positions are rotated, keeping the weights: a new base ``theta``, a context
        ``scaling`` (see ``rope.rope_frequencies``; None removes it) or a longer ``max_seq_len``.
        Module 02 uses it to stretch a model past the context it was trained on. Returns the model."""
        config = dataclasses.replace(
            self.config,
            rope_theta=self.config.rope_theta if theta is None else theta,
            rope_scaling=scaling,
            max_seq_len=self.config.max_seq_len if max_seq_len is None else max_seq_len,
        )  # validated by ModelConfig
        device = self._rope[0].device
        self._rope = rope_frequencies(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling, device=device)
        self.config = config
        return self

    def rope_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope[0].device != torch.device(device):
            self._rope = (self._rope[0].to(device), self._rope[1].to(device))
        return self._rope

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start_pos=0) -> torch.Tensor:
        """tokens (B, T) int -> logits (B, T, vocab_size).

        With a ``cache`` (any ``kvcache.KVCache``), sequence b's tokens sit at positions
        ``start_pos[b] .. start_pos[b] + T - 1``; their keys and values are stored and each token
        attends to everything its own sequence has cached before it. ``start_pos`` is an int (the
        same for every sequence) or an integer tensor of B (or 1) start positions, so a batch of
        sequences of different lengths decodes together.
        """
        self._check_tokens(tokens)
        self._check_positions(tokens, cache, start_pos)
        return self.forward_unchecked(tokens, cache, start_pos)

    def forward_unchecked(self, tokens, cache=None, start_pos=0):
        """``forward`` without argument checks: no host-device syncs, so it can be compiled/graphed
        (a tensor ``start_pos`` keeps the same shapes and addresses at every decode step)."""
        b, t = tokens.shape
        cos, sin = self.rope_tables(tokens.device)
        positions = None if cache is None else step_positions(start_pos, b, t, tokens.device)  # (B, T)
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions, cache, i)
        return self.output(self.norm(x))  # (B, T, vocab_size)

    def _check_tokens(self, tokens):
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq_len), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got min {int(tokens.min())}, "
                f"max {int(tokens.max())}"
            )

    def _check_positions(self, tokens, cache, start_pos):
        b, t = tokens.shape
        if isinstance(start_pos, torch.Tensor):
            if start_pos.is_floating_point() or start_pos.dtype == torch.bool or start_pos.numel() not in (1, b) \
                    or start_pos.dim() > 1:
                raise ValueError(f"a tensor start_pos must hold 1 or B={b} integers (one per sequence), got {start_pos!r:.80}")
            first, last = int(start_pos.min()), int(start_pos.max())
        elif isinstance(start_pos, int) and not isinstance(start_pos, bool):
            first = last = start_pos
        else:
            raise ValueError(f"start_pos must be an int or an integer tensor of start positions, got {start_pos!r}")
        if first < 0:
            raise ValueError(f"start_pos must be >= 0, got {first}")
        if last + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {last + t} tokens (start_pos={last} + {t}) exceeds the model's "
                f"max_seq_len={self.config.max_seq_len}"
            )
        if cache is None:
            if last:
                raise ValueError("start_pos > 0 needs a cache holding the earlier tokens")
            return
        for method in ("validate", "update", "attention"):
            if not callable(getattr(cache, method, None)):
                raise TypeError(f"cache must implement the kvcache.KVCache protocol (validate, update, attention); "
                                f"{type(cache).__name__} has no {method}()")
        weight = self.tok_embeddings.weight
        if weight.device != tokens.device:
            raise ValueError(f"model ({weight.device}) and tokens ({tokens.device}) must be on one device")
        # K and V come out in the activations' dtype, the embeddings' (a quantized wk has no float weight)
        cache.validate(self, b, last + t, weight.dtype, tokens.device)


def step_positions(start_pos, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """(B, T) positions of a step's tokens: row b is ``start_pos[b] .. start_pos[b] + T - 1``."""
    offsets = torch.arange(seq_len, device=device)  # (T,)
    if isinstance(start_pos, torch.Tensor):
        start = start_pos.reshape(-1, 1).to(device=device, dtype=torch.long)  # (B or 1, 1)
    else:
        start = torch.full((1, 1), start_pos, dtype=torch.long, device=device)
    return (start + offsets).expand(batch_size, seq_len)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse each block's q/k/v projections into ``wqkv`` and its gate/up projections into ``w13``, in
    place; returns the model. Outputs are unchanged (up to float rounding of the larger products).

    For decoding: four matrix-vector products per block instead of seven, so fewer and larger
    kernels. Fuse first, then quantize (``quantize_model`` swaps the fused layers, row by row the same
    codes). Names change, so a later ``targets=["wq"]`` no longer matches, the state_dict has
    ``wqkv``/``w13`` keys (an unfused checkpoint loads before fusing, not after), and head conversions
    such as ``mha_to_gqa`` need the separate layers. A block whose feed-forward is not the SwiGLU
    ``FeedForward`` (a mixture of experts) keeps it as it is.
    """
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"fuse_projections needs a model with decoder blocks (effml_lib.model.Block), "
                         f"got {type(model).__name__}")
    for name, block in blocks:  # every check before any change: a refused model is left as it was
        if "wqkv" in block.attention._modules:
            raise ValueError(f"fuse_projections: {name}.attention is already fused (it has wqkv)")
        layers = {f"attention.{w}": getattr(block.attention, w) for w in ("wq", "wk", "wv")}
        if isinstance(block.feed_forward, FeedForward):
            layers.update({f"feed_forward.{w}": getattr(block.feed_forward, w) for w in ("w1", "w3")})
        for layer_name, layer in layers.items():
            if type(layer) is not nn.Linear:
                raise TypeError(f"fuse_projections needs plain nn.Linear projections (fuse before quantizing or "
                                f"adding adapters); {name}.{layer_name} is a {type(layer).__name__}")
    for _, block in blocks:
        block.attention.fuse_qkv()
        if isinstance(block.feed_forward, FeedForward):
            block.feed_forward.fuse_gate_up()
    return model


def replace_linears(model: nn.Module, replace, targets=None) -> list[str]:
    """Swap chosen ``nn.Linear`` layers of ``model`` for other modules, in place; returns their names.

    ``replace(name, linear) -> nn.Module`` builds each replacement (a quantized linear, a linear with
    a LoRA adapter, ...), which must map the same (..., in_features) inputs to (..., out_features).
    ``targets``: None means every linear layer of the decoder blocks (attention and feed-forward
    projections; not the LM head, whose weight may be the tied embedding). Otherwise an iterable of
    patterns, each matched against a module's full name (``fnmatch``, e.g. ``"layers.*.attention.wq"``)
    or its last part (``"wq"``); a pattern that matches no linear layer is an error, so a typo
    cannot silently leave a model unchanged.
    """
    if not callable(replace):
        raise TypeError(f"replace must be a callable (name, linear) -> nn.Module, got {type(replace).__name__}")
    if isinstance(targets, str):
        targets = (targets,)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if targets is None:
        chosen = [name for name in linears if name.startswith("layers.")]
    else:
        patterns = list(targets)
        chosen = [name for name in linears
                  if any(fnmatch.fnmatchcase(name, p) or name.rsplit(".", 1)[-1] == p for p in patterns)]
        for p in patterns:
            if not any(fnmatch.fnmatchcase(name, p) or name.rsplit(".", 1)[-1] == p for name in linears):
                examples = sorted({name.rsplit(".", 1)[-1] for name in linears})
                raise ValueError(f"target {p!r} matches no nn.Linear of the model; its linear layers are named "
                                 f"{examples} (last part) or like {next(iter(linears), '-')!r} (full name)")
    for name in chosen:
        new = replace(name, linears[name])
        if not isinstance(new, nn.Module):
            raise TypeError(f"replace({name!r}, linear) must return an nn.Module, got {type(new).__name__}")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return chosen
