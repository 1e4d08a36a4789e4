"""Lab 03, part 3: forward_with_cache(model, cache, tokens, positions) -> logits (B, T, vocab).

Run on a correct test-side cache, so this part does not depend on part 2's StaticKVCache. Its unwritten
entries hold large garbage (conftest.ReferenceCache)."""

import pytest
import torch

from trusted import describe

SHAPES = [(4, 4), (4, 2), (4, 1)]
SHAPE_IDS = ["mha", "gqa", "mqa"]


def forward(student, form, what, *args):
    """student.forward_with_cache(*args); if it raises, the failure names the input form."""
    with form(what):
        return student.forward_with_cache(*args)


def cache_for(reference_cache, model, batch, max_seq_len):
    c = model.config
    return reference_cache(c.n_layers, batch, max_seq_len, c.n_kv_heads, c.head_dim, dtype=torch.float64)


@pytest.mark.parametrize("n_heads,n_kv_heads", SHAPES, ids=SHAPE_IDS)
def test_prompt_then_one_token_at_a_time(student, gen, form, close, small_model, reference_cache, n_heads, n_kv_heads):
    model = small_model(n_heads=n_heads, n_kv_heads=n_kv_heads)
    text = torch.randint(0, 97, (2, 14), generator=gen)
    with torch.no_grad():
        expected = model(text)  # (2, 14, vocab)
        cache = cache_for(reference_cache, model, 2, 20)
        heads = f"{n_heads} query, {n_kv_heads} KV heads"
        got = forward(student, form, f"a prompt of 10 tokens, batch 2 ({heads})", model, cache, text[:, :10],
                      torch.arange(10).expand(2, 10))
        assert isinstance(got, torch.Tensor) and got.shape == (2, 10, 97), (
            f"a prompt of 10 tokens, batch 2: logits must have shape (B, T, vocab_size) = (2, 10, 97), got {describe(got)}")
        assert close(got, expected[:, :10], 1e-9, 1e-9), (
            f"a prompt of 10 tokens, batch 2 ({heads}): the logits must be the model's own")
        for t in range(10, 14):
            step = forward(student, form, f"a decode step at position {t} ({heads})", model, cache, text[:, t:t + 1],
                           torch.tensor([[t], [t]]))
            assert close(step, expected[:, t:t + 1], 1e-9, 1e-9), (
                f"the cached step at position {t} ({heads}): the logits must be the model's "
                f"for the whole sequence so far")


def test_sequences_at_different_positions(student, gen, form, close, small_model, reference_cache):
    """Sequence 0 has 3 tokens cached, sequence 1 has 9: one step writes positions 3 and 9."""
    model = small_model()
    a, b = torch.randint(0, 97, (4,), generator=gen), torch.randint(0, 97, (10,), generator=gen)
    with torch.no_grad():
        cache = cache_for(reference_cache, model, 2, 16)
        prompt = torch.zeros(2, 9, dtype=torch.long)
        prompt[0, :3], prompt[1] = a[:3], b[:9]  # sequence 0 right-padded
        forward(student, form, "a right-padded prompt, batch 2", model, cache, prompt, torch.arange(9).expand(2, 9))
        step = forward(student, form, "a decode step of two sequences at different positions", model, cache,
                       torch.stack([a[3:], b[9:]]), torch.tensor([[3], [9]]))
        assert close(step[0, 0], model(a[None])[0, -1], 1e-9, 1e-9), (
            "sequence 0 at position 3: it must see its positions 0-3 only, not sequence 1's or the padding after it")
        assert close(step[1, 0], model(b[None])[0, -1], 1e-9, 1e-9), (
            "sequence 1 at position 9: its logits must be the model's for its own 10 tokens")


def test_stale_entries_are_masked(student, gen, form, close, small_model, reference_cache):
    """The test cache holds large garbage where nothing was written: a query must not see later positions."""
    model = small_model()
    text = torch.randint(0, 97, (1, 6), generator=gen)
    with torch.no_grad():
        cache = cache_for(reference_cache, model, 1, 32)
        got = forward(student, form, "a prompt of 6 tokens in a cache of 32 holding stale data", model, cache, text,
                      torch.arange(6)[None])
        assert close(got, model(text), 1e-9, 1e-9), (
            "positions past each query's own hold stale data here: the mask must hide every key position j > p")


def test_a_chunk_after_a_prefix(student, gen, form, close, small_model, reference_cache):
    """Tokens 0-4 cached, then 5-8 in one call: causal within the chunk, and seeing the prefix."""
    model = small_model(n_kv_heads=1)
    text = torch.randint(0, 97, (1, 9), generator=gen)
    with torch.no_grad():
        cache = cache_for(reference_cache, model, 1, 12)
        forward(student, form, "a prompt of 5 tokens (MQA)", model, cache, text[:, :5], torch.arange(5)[None])
        got = forward(student, form, "4 tokens in one call after a cached prefix (MQA)", model, cache, text[:, 5:],
                      torch.arange(5, 9)[None])
        assert close(got, model(text)[:, 5:], 1e-9, 1e-9), (
            "four tokens at positions 5-8 after a cached prefix: each sees the prefix and the chunk up to itself")
