"""Lab 03, part 2: KVCache.update(layer, k_new, v_new, positions)."""

import pytest
import torch


def slow_update(k_buffer, k_new, positions):
    """The definition, one token at a time."""
    out = k_buffer.clone()
    for b in range(k_new.shape[0]):
        for t in range(k_new.shape[2]):
            out[b, :, positions[b, t]] = k_new[b, :, t]
    return out


def make(student, n_layers=3, batch=2, max_seq_len=16, n_kv_heads=2, head_dim=8, dtype=torch.float32):
    return student.KVCache(n_layers, batch, max_seq_len, n_kv_heads, head_dim, dtype=dtype)


@pytest.mark.parametrize("n_kv_heads,head_dim", [(1, 4), (2, 8), (8, 64)], ids=["mqa", "gqa", "wide"])
def test_prefill_then_decode_steps(student, gen, n_kv_heads, head_dim):
    cache = make(student, batch=3, n_kv_heads=n_kv_heads, head_dim=head_dim)
    expected_k, expected_v = cache.k[1].clone(), cache.v[1].clone()
    prompt = torch.arange(5).expand(3, 5)
    for positions in [prompt, torch.tensor([[5], [5], [5]]), torch.tensor([[6], [6], [6]])]:
        k_new = torch.randn(3, n_kv_heads, positions.shape[1], head_dim, generator=gen)
        v_new = torch.randn(3, n_kv_heads, positions.shape[1], head_dim, generator=gen)
        k_all, v_all = cache.update(1, k_new, v_new, positions)
        expected_k, expected_v = slow_update(expected_k, k_new, positions), slow_update(expected_v, v_new, positions)
        assert torch.equal(cache.k[1], expected_k) and torch.equal(cache.v[1], expected_v), (
            f"wrong buffer contents after writing positions {positions[0].tolist()} (Hkv={n_kv_heads}, D={head_dim})")
        assert isinstance(k_all, torch.Tensor) and k_all.shape == (3, n_kv_heads, 16, head_dim), (
            "update must return the layer's whole buffers, (B, Hkv, max_seq_len, D)")
        assert torch.equal(k_all, expected_k) and torch.equal(v_all, expected_v), "the returned buffers must hold the cache"


def test_sequences_at_different_positions(student, gen):
    cache = make(student, batch=4, max_seq_len=40)
    positions = torch.tensor([[0, 1], [7, 8], [30, 31], [38, 39]])
    k_new, v_new = torch.randn(4, 2, 2, 8, generator=gen), torch.randn(4, 2, 2, 8, generator=gen)
    cache.update(0, k_new, v_new, positions)
    zeros = torch.zeros(4, 2, 40, 8)
    assert torch.equal(cache.k[0], slow_update(zeros, k_new, positions)), (
        "each sequence's tokens must go to its own positions: positions[b, t] is for sequence b")
    assert torch.equal(cache.v[0], slow_update(zeros, v_new, positions)), "values: each sequence at its own positions"


def test_overwrite_and_other_layers_untouched(student, gen):
    cache = make(student)
    first = torch.randn(2, 2, 1, 8, generator=gen)
    second = torch.randn(2, 2, 1, 8, generator=gen)
    cache.update(2, first, first, torch.tensor([[3], [3]]))
    cache.update(2, second, second, torch.tensor([[3], [4]]))
    assert torch.equal(cache.k[2][0, :, 3], second[0, :, 0]), "writing a position again replaces what was there"
    assert torch.equal(cache.k[2][1, :, 3], first[1, :, 0]), "sequence 1 wrote position 4, not 3"
    assert cache.k[0].abs().sum() == 0 and cache.k[1].abs().sum() == 0, "other layers must stay untouched"


def test_low_precision_buffers(student, gen):
    cache = make(student, dtype=torch.bfloat16)
    k_new = torch.randn(2, 2, 3, 8, generator=gen).bfloat16()
    k_all, _ = cache.update(0, k_new, k_new, torch.arange(3).expand(2, 3))
    assert k_all.dtype == torch.bfloat16, f"a bf16 cache stays bf16, got {k_all.dtype}"
    assert torch.equal(k_all[:, :, :3], k_new), "bf16 values must be stored exactly"


@pytest.mark.parametrize("positions", [[[15, 16]], [[-1, 0]]], ids=["past_the_end", "negative"])
def test_overflow_is_a_clear_error(student, value_error, positions):
    cache = make(student, batch=1)
    k_new = torch.zeros(1, 2, 2, 8)
    value_error(lambda: cache.update(0, k_new, k_new, torch.tensor(positions)), "positions",
                f"positions {positions} in a cache of 16")


@pytest.mark.parametrize("shape,why", [((2, 3, 1, 8), "3 KV heads, the cache has 2"), ((2, 2, 1, 4), "head_dim 4, not 8"),
                                       ((1, 2, 1, 8), "batch 1, the cache has 2"), ((2, 2, 3, 8), "3 tokens, positions has 1")])
def test_wrong_shape_is_a_clear_error(student, value_error, shape, why):
    cache = make(student)
    k_new = torch.zeros(shape)
    value_error(lambda: cache.update(0, k_new, k_new, torch.tensor([[0], [0]])), "k_new", f"k_new of shape {shape} ({why})")
