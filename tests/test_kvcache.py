import pytest
import torch

from effml_lib.kvcache import MODEL_SHAPES, StaticKVCache, kv_cache_bytes
from effml_lib.model import ModelConfig


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


def test_update_writes_at_positions_and_returns_visible_prefix(gen):
    cache = StaticKVCache(n_layers=2, batch_size=1, max_seq_len=6, n_kv_heads=1, head_dim=2)
    k = torch.randn(1, 1, 3, 2, generator=gen)
    k_all, v_all = cache.update(1, k, -k, torch.tensor([0, 1, 2]), visible=3)
    assert torch.equal(k_all, k) and torch.equal(v_all, -k)
    k_all, _ = cache.update(1, k[:, :, :1] * 5, k[:, :, :1], torch.tensor([3]), visible=4)
    assert torch.equal(k_all[:, :, 3], 5 * k[:, :, 0]) and k_all.shape[2] == 4
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
        cache.update(5, k, k, torch.tensor([0]), visible=1)
    with pytest.raises(ValueError, match="shape"):
        cache.update(0, torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), torch.tensor([0]), visible=1)
    with pytest.raises(TypeError, match="dtype"):
        cache.update(0, k.half(), k.half(), torch.tensor([0]), visible=1)
