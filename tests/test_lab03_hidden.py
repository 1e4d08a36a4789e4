"""Lab 03's hidden suites (grading/hidden/lab03) pass the solution and fail realistic mistakes."""

import types

import pytest
import torch

from conftest import assert_part_fails, assert_part_passes, lab_solution

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

PARTS = ["bytes", "cache", "forward", "generate", "performance"]


@pytest.fixture(scope="module")
def solution():
    return lab_solution("lab03_kv_cache")


def rebound(namespace, **functions):
    """``namespace`` with some functions replaced, and every solution function rebound to it, so that
    generate_greedy calls the replaced forward_with_cache or KVCache, as in a student's notebook."""
    out = dict(namespace, **functions)
    for name in ("forward_with_cache", "generate_greedy"):
        if name not in functions:
            out[name] = types.FunctionType(namespace[name].__code__, out)
    return out


def fails(part, namespace, mistake):
    """The part's hidden tests must reject a submission with ``mistake``."""
    assert_part_fails("lab03", part, namespace, mistake)


@pytest.mark.parametrize("part", PARTS)
def test_solution_passes(part, solution):
    assert_part_passes("lab03", part, dict(solution))


# --- realistic mistakes, each must cost its part -----------------------------------------------

def test_bytes_without_the_factor_two(solution):
    fails("bytes", dict(solution, kv_cache_bytes=lambda b, s, l, h, d, e=2: int(b * s * l * h * d * e)), "K only")


def test_bytes_with_query_heads(solution):
    # Counting n_heads where n_kv_heads belongs is a formula bug the tests see through GQA shapes; here the
    # student's function is right but the answer to the question is computed for MHA.
    fails("bytes", dict(solution, sequences_that_fit=(80 * 2**30 - 2 * 8_030_261_248) // (2 * 4096 * 32 * 32 * 128 * 2)),
          "question answered with 32 KV heads")


def test_bytes_integer_division_of_a_fraction(solution):
    fails("bytes", dict(solution, kv_cache_bytes=lambda b, s, l, h, d, e=2: 2 * b * s * l * h * d * int(e)), "int4 as 0")


def test_sequences_typed_as_a_float(solution):
    fails("bytes", dict(solution, sequences_that_fit=float(solution["sequences_that_fit"])), "a float")


class _CacheWith:
    """A KVCache class whose update is replaced."""

    def __init__(self, base, update):
        self.cls = type("KVCache", (base,), {"update": update})


def test_cache_ignoring_per_sequence_positions(solution):
    base = solution["KVCache"]

    def update(self, layer, k_new, v_new, positions):  # every sequence written at sequence 0's positions
        return base.update(self, layer, k_new, v_new, positions[:1].expand_as(positions))
    fails("cache", dict(solution, KVCache=_CacheWith(base, update).cls), "positions[0] for all")


def test_cache_returning_only_the_new_entries(solution):
    base = solution["KVCache"]

    def update(self, layer, k_new, v_new, positions):
        base.update(self, layer, k_new, v_new, positions)
        return k_new, v_new
    fails("cache", dict(solution, KVCache=_CacheWith(base, update).cls), "returns the new tokens")


def test_cache_without_errors(solution):
    base = solution["KVCache"]

    def update(self, layer, k_new, v_new, positions):  # no checks: overflow raises IndexError, if anything
        rows = torch.arange(k_new.shape[0])[:, None]
        self.k[layer][rows, :, positions] = k_new.transpose(1, 2)
        self.v[layer][rows, :, positions] = v_new.transpose(1, 2)
        return self.k[layer], self.v[layer]
    fails("cache", dict(solution, KVCache=_CacheWith(base, update).cls), "no clear errors")


def test_forward_without_a_mask(solution):
    forward = solution["forward_with_cache"]
    from effml_lib.attention import attention

    def forward_with_cache(model, cache, tokens, positions):
        ns = dict(solution, attention=lambda q, k, v, causal=True, mask=None: attention(q, k, v, causal=False))
        return types.FunctionType(forward.__code__, ns)(model, cache, tokens, positions)
    fails("forward", rebound(solution, forward_with_cache=forward_with_cache), "no mask")


def test_forward_with_positions_of_sequence_zero(solution):
    forward = solution["forward_with_cache"]

    def forward_with_cache(model, cache, tokens, positions):  # one position row for the whole batch
        return forward(model, cache, tokens, positions[:1].expand_as(positions))
    fails("forward", rebound(solution, forward_with_cache=forward_with_cache), "positions[0] for all")


def test_forward_without_rope(solution):
    forward = solution["forward_with_cache"]

    def forward_with_cache(model, cache, tokens, positions):
        ns = dict(solution, apply_rope_qk=lambda q, k, cos, sin, positions: (q, k))
        return types.FunctionType(forward.__code__, ns)(model, cache, tokens, positions)
    fails("forward", rebound(solution, forward_with_cache=forward_with_cache), "no RoPE")


def test_generate_reading_the_padding(solution):
    """The first new token taken at the end of the padded prompt, not at each prompt's last token."""
    def generate_greedy(model, prompts, max_new_tokens):
        longest = max(map(len, prompts))
        padded = [p + [0] * (longest - len(p)) for p in prompts]
        return solution["generate_greedy"](model, padded, max_new_tokens)
    fails("generate", dict(solution, generate_greedy=generate_greedy), "padding read as prompt")


def test_generate_one_prompt_at_a_time_is_fine_but_a_shared_position_is_not(solution):
    forward = solution["forward_with_cache"]

    def forward_with_cache(model, cache, tokens, positions):  # decode steps at the longest prompt's position
        if tokens.shape[1] == 1:
            positions = positions.max().expand_as(positions)
        return forward(model, cache, tokens, positions)
    fails("generate", rebound(solution, forward_with_cache=forward_with_cache), "one position for the batch")


def test_recomputing_everything(solution):
    def generate_greedy(model, prompts, max_new_tokens):
        out = []
        with torch.no_grad():
            for prompt in prompts:
                tokens = list(prompt)
                for _ in range(max_new_tokens):
                    tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
                out.append(tokens[len(prompt):])
        return out
    fails("performance", dict(solution, generate_greedy=generate_greedy), "no cache")
