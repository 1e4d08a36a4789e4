"""Lab 03, part 4: generate_greedy(model, prompts, max_new_tokens) -> a list of B lists of new tokens."""

import pytest
import torch

from trusted import describe


def as_ints(tokens):
    """Token ids as ints (a 0-d integer tensor counts as its value), or None."""
    try:
        return [int(t) for t in tokens]
    except (TypeError, ValueError, RuntimeError):
        return None


def check(student, form, model, prompts, n_new, uncached_greedy, what):
    with form(what):
        got = student.generate_greedy(model, prompts, n_new)
    assert isinstance(got, list) and len(got) == len(prompts), (
        f"{what}: return a list of {len(prompts)} lists (one per prompt), got {describe(got)}")
    for b, (tokens, prompt) in enumerate(zip(got, prompts)):
        assert isinstance(tokens, list) and len(tokens) == n_new, (
            f"{what}: prompt {b} (length {len(prompt)}) needs a list of {n_new} new tokens, got {describe(tokens)}")
        tokens = as_ints(tokens)
        assert tokens is not None, f"{what}: prompt {b}'s new tokens should be token ids (ints)"
        expected = uncached_greedy(model, prompt, n_new)
        if tokens != expected:
            first = next(i for i, (x, y) in enumerate(zip(tokens, expected)) if x != y)
            raise AssertionError(f"{what}: prompt {b} (length {len(prompt)}): new token {first + 1} of {n_new} is not "
                                 f"the one the uncached model chooses (the argmax of its logits)")


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_batch_of_different_lengths(student, gen, form, small_model, uncached_greedy, n_heads, n_kv_heads):
    model = small_model(n_heads=n_heads, n_kv_heads=n_kv_heads, seed=n_kv_heads)
    lengths = [11, 3, 7, 1]
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]
    check(student, form, model, prompts, 9, uncached_greedy, f"{n_heads} query / {n_kv_heads} KV heads, prompt lengths {lengths}")


def test_one_prompt(student, gen, form, small_model, uncached_greedy):
    model = small_model(seed=3)
    check(student, form, model, [torch.randint(0, 97, (20,), generator=gen).tolist()], 12, uncached_greedy, "batch of one")


def test_one_new_token_is_the_prefill_alone(student, gen, form, small_model, uncached_greedy):
    model = small_model(seed=4)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (2, 8)]
    check(student, form, model, prompts, 1, uncached_greedy, "max_new_tokens=1 (the first token comes from the prefill)")


def test_float32_model(student, gen, form, small_model, uncached_greedy):
    model = small_model(seed=5, dtype=torch.float32)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (6, 13)]
    check(student, form, model, prompts, 6, uncached_greedy, "a float32 model (the cache takes the model's dtype)")
