"""load_hf against Hugging Face transformers' own forward, on small random checkpoints made here."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference (pip install -e '.[dev]')")

from effml_lib.checkpoints import load_hf  # noqa: E402

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
             vocab_size=211, max_position_embeddings=128, initializer_range=0.2)

CASES = {  # name: (config class, model class, extra config)
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa-theta": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=5000.0)),
    "llama-mqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "qwen2-gqa-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-mqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1, rope_theta=1e6)),
}


def save_random_hf_model(kind, tmp_path, seed=0):
    config_cls, model_cls, extra = CASES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**SIZES, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    if "bias" in kind:  # random biases, so a dropped bias cannot pass
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("attn_impl", ["torch", "auto"])
def test_logits_equal_transformers(kind, attn_impl, tmp_path, gen):
    hf = save_random_hf_model(kind, tmp_path)
    ours = load_hf(tmp_path)
    for layer in ours.layers:
        layer.attention.impl = attn_impl
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 45), generator=gen)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"{kind}: max |logits difference| {diff:.2e} > 1e-4 against transformers"
    assert expected.abs().max() > 1.0, "logits too small for the comparison to mean anything"


def test_greedy_decode_with_cache_equals_transformers_generate(tmp_path, gen):
    from effml_lib.decoding import generate

    hf = save_random_hf_model("llama-gqa-theta", tmp_path)
    ours = load_hf(tmp_path)
    prompt = torch.randint(0, SIZES["vocab_size"], (1, 7), generator=gen)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, prompt, 20), expected)


def test_sharded_checkpoint_loads(tmp_path, gen):
    hf = save_random_hf_model("llama-mha", tmp_path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, SIZES["vocab_size"], (1, 9), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "sharded")(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_dtype_argument(tmp_path):
    save_random_hf_model("llama-mha", tmp_path)
    model = load_hf(tmp_path, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    save_random_hf_model("llama-mha", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gpt2.*llama, mistral, qwen2"):
        load_hf(tmp_path)


def test_missing_weight_file_is_named(tmp_path):
    save_random_hf_model("llama-mha", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)


def test_missing_shard_is_named(tmp_path):
    hf = save_random_hf_model("llama-mha", tmp_path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf(tmp_path / "sharded")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_random_hf_model("llama-mha", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.feed_forward.w3.weight"):
        load_hf(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")


def test_bfloat16_model_is_as_close_to_float32_as_transformers_bfloat16(tmp_path, gen):
    """In bf16 the two implementations round differently; ours must not be the less accurate one."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                                      intermediate_size=704, vocab_size=500, max_position_embeddings=256)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, 500, (2, 96), generator=gen)
    with torch.no_grad():
        reference = hf(tokens).logits.double()
        hf_bf16 = hf.to(torch.bfloat16)(tokens).logits.double()
        ours_bf16 = load_hf(tmp_path, dtype=torch.bfloat16)(tokens).double()
    def rel(a):
        return ((a - reference).norm() / reference.norm()).item()
    assert rel(ours_bf16) < 0.05, f"bf16 logits {rel(ours_bf16):.3%} away from float32"
    assert rel(ours_bf16) <= 1.1 * rel(hf_bf16), f"ours {rel(ours_bf16):.3%} vs transformers {rel(hf_bf16):.3%}"


def test_tensor_the_config_does_not_describe_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_random_hf_model("llama-mha", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.full((64,), 5.0)  # config says attention_bias=False
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layers.0.attention.wq.bias"):
        load_hf(tmp_path)


@pytest.mark.parametrize("kind,extra", [("mistral-gqa", {"sliding_window": 16}),
                                        ("qwen2-mqa", {"use_sliding_window": True, "sliding_window": 16})])
def test_sliding_window_caps_the_context_where_logits_stay_exact(kind, extra, tmp_path, gen):
    config_cls, model_cls, base = CASES[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SIZES, **{**base, **extra})
    if kind.startswith("qwen2"):
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers  # transformers >= 4.53 reads this
    hf = getattr(transformers, model_cls)(config).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.max_seq_len == 16
    tokens = torch.randint(0, SIZES["vocab_size"], (1, 16), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        ours(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding_window=16"):
        load_hf(tmp_path, max_seq_len=64)


def test_config_problems_are_named(tmp_path):
    save_random_hf_model("llama-mha", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="intermediate_size"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_hf(tmp_path)


def test_mistyped_relative_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf("checkpoints/llama/small")


def test_effml_load_errors(tmp_path):
    from effml_lib.checkpoints import load, pretrained

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    save_random_hf_model("llama-mha", tmp_path)
    with pytest.raises(ValueError, match="load_hf"):
        load(tmp_path)
    with pytest.raises(TypeError, match="dtype"):
        pretrained(dtype="float16")
