"""Lab 03, part 2: StaticKVCache.update(layer, k_new, v_new, positions) -> (keys, values, context_lens)."""

import pytest
import torch

from trusted import describe


def slow_update(k_buffer, k_new, positions):
    """The definition, one token at a time."""
    out = k_buffer.clone()
    for b in range(k_new.shape[0]):
        for t in range(k_new.shape[2]):
            out[b, :, positions[b, t]] = k_new[b, :, t]
    return out


def make(student, n_layers=3, batch=2, max_seq_len=16, n_kv_heads=2, head_dim=8, dtype=torch.float32):
    return student.StaticKVCache(n_layers, batch, max_seq_len, n_kv_heads, head_dim, dtype=dtype)


def update(form, cache, what, *args):
    """cache.update(*args) as (keys, values, context_lens), or a failure that says what was expected."""
    with form(what):
        result = cache.update(*args)
    assert isinstance(result, (tuple, list)) and len(result) == 3, (
        f"{what}: update must return (keys, values, context_lens), got {describe(result)}")
    return result


def check_context_lens(context_lens, positions, what):
    expected = (positions[:, -1] + 1).to(torch.int32)
    assert isinstance(context_lens, torch.Tensor) and context_lens.dtype == torch.int32 and context_lens.shape == expected.shape, (
        f"{what}: context_lens must be an int32 tensor of shape (B,) = {tuple(expected.shape)}, got {describe(context_lens)}")
    assert torch.equal(context_lens, expected), (
        f"{what}: context_lens[b] must be sequence b's own length after the step, positions[b, -1] + 1")


@pytest.mark.parametrize("n_kv_heads,head_dim", [(1, 4), (2, 8), (8, 64)], ids=["mqa", "gqa", "wide"])
def test_prefill_then_decode_steps(student, gen, form, n_kv_heads, head_dim):
    cache = make(student, batch=3, n_kv_heads=n_kv_heads, head_dim=head_dim)
    expected_k, expected_v = cache.k[1].clone(), cache.v[1].clone()
    steps = [("the prefill (T=5)", torch.arange(5).expand(3, 5)), ("decode step 1 (T=1)", torch.tensor([[5], [5], [5]])),
             ("decode step 2 (T=1)", torch.tensor([[6], [6], [6]]))]
    for step, positions in steps:
        what = f"{step}, batch 3, Hkv={n_kv_heads}, D={head_dim}"
        k_new = torch.randn(3, n_kv_heads, positions.shape[1], head_dim, generator=gen)
        v_new = torch.randn(3, n_kv_heads, positions.shape[1], head_dim, generator=gen)
        k_all, v_all, context_lens = update(form, cache, what, 1, k_new, v_new, positions)
        expected_k, expected_v = slow_update(expected_k, k_new, positions), slow_update(expected_v, v_new, positions)
        assert torch.equal(cache.k[1], expected_k) and torch.equal(cache.v[1], expected_v), (
            f"{what}: wrong buffer contents: token t of sequence b belongs at position positions[b, t], in every KV head")
        assert isinstance(k_all, torch.Tensor) and k_all.shape == (3, n_kv_heads, 16, head_dim), (
            f"{what}: update must return the layer's whole buffers, (B, Hkv, max_seq_len, D) = {(3, n_kv_heads, 16, head_dim)}, "
            f"got {describe(k_all)}")
        assert torch.equal(k_all, expected_k) and torch.equal(v_all, expected_v), (
            f"{what}: the returned keys and values must be the layer's buffers, holding what was written")
        check_context_lens(context_lens, positions, what)


def test_sequences_at_different_positions(student, gen, form):
    cache = make(student, batch=4, max_seq_len=40)
    positions = torch.tensor([[0, 1], [7, 8], [30, 31], [38, 39]])  # the last sequence fills the cache's last position
    k_new, v_new = torch.randn(4, 2, 2, 8, generator=gen), torch.randn(4, 2, 2, 8, generator=gen)
    what = "4 sequences at different positions, T=2"
    _, _, context_lens = update(form, cache, what, 0, k_new, v_new, positions)
    zeros = torch.zeros(4, 2, 40, 8)
    assert torch.equal(cache.k[0], slow_update(zeros, k_new, positions)), (
        "each sequence's tokens must go to its own positions: positions[b, t] is for sequence b")
    assert torch.equal(cache.v[0], slow_update(zeros, v_new, positions)), "values: each sequence at its own positions"
    check_context_lens(context_lens, positions, what)


def test_overwrite_and_other_layers_untouched(student, gen, form):
    cache = make(student)
    first = torch.randn(2, 2, 1, 8, generator=gen)
    second = torch.randn(2, 2, 1, 8, generator=gen)
    update(form, cache, "a decode step (T=1) into layer 2 of 3", 2, first, first, torch.tensor([[3], [3]]))
    positions = torch.tensor([[3], [4]])
    _, _, context_lens = update(form, cache, "a second decode step", 2, second, second, positions)
    assert torch.equal(cache.k[2][0, :, 3], second[0, :, 0]), "writing a position again replaces what was there"
    assert torch.equal(cache.k[2][1, :, 3], first[1, :, 0]), "sequence 1's second step wrote its next position, not the same one"
    assert cache.k[0].abs().sum() == 0 and cache.k[1].abs().sum() == 0, "other layers must stay untouched"
    check_context_lens(context_lens, positions, "a second decode step, sequences at different positions")


def test_low_precision_buffers(student, gen, form):
    cache = make(student, dtype=torch.bfloat16)
    k_new = torch.randn(2, 2, 3, 8, generator=gen).bfloat16()
    v_new = torch.randn(2, 2, 3, 8, generator=gen).bfloat16()
    positions = torch.arange(3).expand(2, 3)
    k_all, v_all, context_lens = update(form, cache, "a bf16 cache, bf16 keys and values", 0, k_new, v_new, positions)
    assert isinstance(k_all, torch.Tensor) and k_all.dtype == torch.bfloat16 and v_all.dtype == torch.bfloat16, (
        f"a bf16 cache returns bf16 keys and values, got {describe(k_all)}")
    assert torch.equal(k_all[:, :, :3], k_new) and torch.equal(v_all[:, :, :3], v_new), "bf16 values must be stored exactly"
    check_context_lens(context_lens, positions, "a bf16 cache")


@pytest.mark.parametrize("positions,what", [([[15, 16]], "a position past the end of a cache of 16"),
                                            ([[-1, 0]], "a negative position")], ids=["past_the_end", "negative"])
def test_overflow_is_a_clear_error(student, value_error, positions, what):
    cache = make(student, batch=1)
    k_new = torch.zeros(1, 2, 2, 8)
    value_error(lambda: cache.update(0, k_new, k_new, torch.tensor(positions)), "positions", what)


@pytest.mark.parametrize("positions,what", [([[0, 1, 2], [5, 6, 8]], "a row of positions with a gap"),
                                            ([[4, 3, 2], [0, 1, 2]], "a row of positions going backwards"),
                                            ([[0, 1, 2], [6, 6, 7]], "a row of positions repeating one")],
                         ids=["gap", "backwards", "repeated"])
def test_rows_must_be_consecutive(student, value_error, positions, what):
    cache = make(student)
    k_new = torch.zeros(2, 2, 3, 8)
    value_error(lambda: cache.update(0, k_new, k_new, torch.tensor(positions)), "positions", f"{what} (batch 2, T=3)")


@pytest.mark.parametrize("shape,why", [((2, 3, 1, 8), "3 KV heads, the cache has 2"), ((2, 2, 1, 4), "head_dim 4, not 8"),
                                       ((1, 2, 1, 8), "batch 1, the cache has 2"), ((2, 2, 3, 8), "3 tokens, positions has 1")])
def test_wrong_shape_is_a_clear_error(student, value_error, shape, why):
    cache = make(student)
    right = torch.zeros(2, 2, 1, 8)  # (B, Hkv, T, D) of this cache and positions
    value_error(lambda: cache.update(0, torch.zeros(shape), right, torch.tensor([[0], [0]])), "k_new",
                f"k_new of shape {shape} ({why})")


def test_wrong_value_shape_is_a_clear_error(student, value_error):
    cache = make(student)
    right = torch.zeros(2, 2, 1, 8)
    value_error(lambda: cache.update(0, right, torch.zeros(2, 3, 1, 8), torch.tensor([[0], [0]])), "v_new",
                "v_new of shape (2, 3, 1, 8) (3 KV heads, the cache has 2), k_new right")
