"""Lab 03, part 4: generate_greedy(model, prompts, max_new_tokens) -> a list of B lists of new tokens."""

import pytest
import torch


def check(student, model, prompts, n_new, uncached_greedy, what):
    got = student.generate_greedy(model, prompts, n_new)
    assert isinstance(got, list) and len(got) == len(prompts), f"{what}: return a list of {len(prompts)} lists"
    got = [list(map(int, g)) for g in got]
    for b, prompt in enumerate(prompts):
        expected = uncached_greedy(model, prompt, n_new)
        assert got[b] == expected, (
            f"{what}: prompt {b} (length {len(prompt)}) continued as {got[b]}, the uncached model gives {expected}")


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_batch_of_different_lengths(student, gen, small_model, uncached_greedy, n_heads, n_kv_heads):
    model = small_model(n_heads=n_heads, n_kv_heads=n_kv_heads, seed=n_kv_heads)
    lengths = [11, 3, 7, 1]
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]
    check(student, model, prompts, 9, uncached_greedy, f"{n_heads} query / {n_kv_heads} KV heads, prompt lengths {lengths}")


def test_one_prompt(student, gen, small_model, uncached_greedy):
    model = small_model(seed=3)
    check(student, model, [torch.randint(0, 97, (20,), generator=gen).tolist()], 12, uncached_greedy, "batch of one")


def test_one_new_token_is_the_prefill_alone(student, gen, small_model, uncached_greedy):
    model = small_model(seed=4)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (2, 8)]
    check(student, model, prompts, 1, uncached_greedy, "max_new_tokens=1 (the first token comes from the prefill)")


def test_float32_model(student, gen, small_model, uncached_greedy):
    model = small_model(seed=5, dtype=torch.float32)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (6, 13)]
    check(student, model, prompts, 6, uncached_greedy, "a float32 model (the cache takes the model's dtype)")
