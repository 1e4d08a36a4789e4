import pytest
import torch

from effml_lib.kvcache import (
    MODEL_EXPERTS, MODEL_PARAMS, MODEL_SHAPES, StaticKVCache, kv_cache_bytes, kv_cache_bytes_per_token,
)
from effml_lib.model import ModelConfig, Transformer


def test_llama2_7b_is_512_kib_per_token():
    s = MODEL_SHAPES["llama-2-7b"]
    per_token = kv_cache_bytes(1, 1, s["n_layers"], s["n_kv_heads"], s["dim"] // s["n_heads"], 2)
    assert per_token == 512 * 1024


def test_bytes_equal_a_real_cache_allocation():
    cache = StaticKVCache(n_layers=3, batch_size=2, max_seq_len=7, n_kv_heads=2, head_dim=8, dtype=torch.float16)
    assert cache.nbytes == kv_cache_bytes(2, 7, 3, 2, 8, bytes_per_elem=2)
    assert cache.nbytes == sum(t.untyped_storage().nbytes() for i in range(3) for t in cache.layer(i))


def test_catalog_shapes_build_valid_configs():
    for name, shape in MODEL_SHAPES.items():
        ModelConfig(**shape)  # raises if heads do not divide


def test_the_catalog_covers_the_course_models():
    required = {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b",
                "mixtral-8x7b", "qwen2.5-7b"}
    assert required <= set(MODEL_SHAPES)
    assert set(MODEL_PARAMS) == set(MODEL_SHAPES), "every catalog model needs its parameter count"


@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_published_parameter_counts_match_the_shapes(name):
    """The hub's exact counts, rebuilt from the shapes by instantiating the course's model (no memory: meta)."""
    with torch.device("meta"):
        dense = Transformer(ModelConfig(**MODEL_SHAPES[name])).num_parameters()
    shape = MODEL_SHAPES[name]
    ffn = 3 * shape["dim"] * shape["hidden_dim"]  # w1, w2, w3 of one feed-forward
    experts = MODEL_EXPERTS.get(name)
    if experts is None:
        total = active = dense
    else:  # n_experts feed-forwards and a router per layer; a token uses experts_per_token of them
        router = shape["dim"] * experts["n_experts"]
        total = dense + shape["n_layers"] * ((experts["n_experts"] - 1) * ffn + router)
        active = dense + shape["n_layers"] * ((experts["experts_per_token"] - 1) * ffn + router)
    assert MODEL_PARAMS[name]["total"] == total, f"{name}: published {MODEL_PARAMS[name]['total']:,}, shapes give {total:,}"
    assert MODEL_PARAMS[name]["active"] == active, f"{name}: active {MODEL_PARAMS[name]['active']:,} vs {active:,}"


def test_lecture_figures():
    """Llama-2-70B if it used MHA: 2.5 MiB per token, 160 GiB at batch 16 x 4096 (fp16)."""
    assert kv_cache_bytes_per_token("llama-2-7b") == 512 * 2**10
    s = MODEL_SHAPES["llama-2-70b"]
    mha_per_token = kv_cache_bytes(1, 1, s["n_layers"], s["n_heads"], s["dim"] // s["n_heads"], 2)
    assert mha_per_token == 2.5 * 2**20
    assert kv_cache_bytes(16, 4096, s["n_layers"], s["n_heads"], s["dim"] // s["n_heads"], 2) == 160 * 2**30
    assert kv_cache_bytes_per_token("llama-2-70b") * 8 == mha_per_token, "GQA with 8 of 64 heads: 8x smaller"
    assert kv_cache_bytes_per_token("llama-3-8b", bytes_per_elem=1) == 64 * 2**10  # fp8: 32 layers x 8 x 128 x 2
    with pytest.raises(ValueError, match="unknown model"):
        kv_cache_bytes_per_token("gpt-5")


def test_update_writes_each_sequence_at_its_positions_and_returns_lengths(gen):
    cache = StaticKVCache(n_layers=2, batch_size=2, max_seq_len=8, n_kv_heads=1, head_dim=2)
    k = torch.randn(2, 1, 3, 2, generator=gen)
    k_all, v_all, lens = cache.update(1, k, -k, torch.tensor([[0, 1, 2], [4, 5, 6]]))
    assert k_all.shape == (2, 1, 8, 2), "update returns the layer's whole buffers"
    assert torch.equal(k_all[0, :, :3], k[0]) and torch.equal(v_all[0, :, :3], -k[0])
    assert torch.equal(k_all[1, :, 4:7], k[1]) and k_all[1, :, :4].abs().sum() == 0, "sequence 1 sits at 4..6"
    assert lens.dtype == torch.int32 and lens.tolist() == [3, 7], "each sequence's length: last position + 1"
    k_all, _, lens = cache.update(1, k[:, :, :1] * 5, k[:, :, :1], torch.tensor([[3], [7]]))
    assert torch.equal(k_all[0, :, 3], 5 * k[0, :, 0]) and torch.equal(k_all[1, :, 7], 5 * k[1, :, 0])
    assert lens.tolist() == [4, 8]
    assert cache.layer(0)[0].abs().sum() == 0, "another layer must stay untouched"


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes(1, -1, 1, 1, 1)
    with pytest.raises(ValueError, match="bytes_per_elem"):
        kv_cache_bytes(1, 1, 1, 1, 1, bytes_per_elem=0)
    with pytest.raises(ValueError, match="batch_size"):
        StaticKVCache(1, 0, 4, 1, 2)
    with pytest.raises(TypeError, match="dtype"):
        StaticKVCache(1, 1, 4, 1, 2, dtype="float16")
    cache = StaticKVCache(2, 1, 4, 1, 2)
    k = torch.zeros(1, 1, 1, 2)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        cache.update(5, k, k, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="shape"):
        cache.update(0, torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), torch.tensor([[0]]))
    with pytest.raises(TypeError, match="dtype"):
        cache.update(0, k.half(), k.half(), torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"positions must be an integer tensor of shape \(1, 1\)"):
        cache.update(0, k, k, torch.tensor([0]))  # (T,) is not per sequence
    with pytest.raises(ValueError, match="consecutive"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([[0, 2]]))


def test_update_past_the_end_is_a_clear_error():
    cache = StaticKVCache(n_layers=1, batch_size=1, max_seq_len=4, n_kv_heads=1, head_dim=2)
    k = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"cache overflow: positions must lie in \[0, max_seq_len=4\), got 3 to 4"):
        cache.update(0, k, k, torch.tensor([[3, 4]]))
    with pytest.raises(ValueError, match="cache overflow"):
        cache.update(0, k, k, torch.tensor([[-1, 0]]))
