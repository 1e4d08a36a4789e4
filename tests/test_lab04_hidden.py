"""Lab 04's hidden suites (grading/hidden/lab04) pass the solution and fail realistic mistakes."""

import copy
import dataclasses
import math
import types

import pytest
import torch

from conftest import assert_part_fails, assert_part_passes, lab_solution

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

PARTS = ["attention", "pooling", "conversion", "memory"]


@pytest.fixture(scope="module")
def solution():
    return lab_solution("lab04_gqa")


def fails(part, namespace, mistake):
    """The part's hidden tests must reject a submission with ``mistake``."""
    assert_part_fails("lab04", part, namespace, mistake)


@pytest.mark.parametrize("part", PARTS)
def test_solution_passes(part, solution):
    assert_part_passes("lab04", part, dict(solution))


def test_interleaved_groups(solution):
    def grouped_attention(q, k, v, causal=True):  # query head h reads KV head h % Hkv
        g = q.shape[1] // k.shape[1]
        order = torch.arange(q.shape[1]).view(g, -1).t().reshape(-1)  # heads regrouped by h % Hkv
        out = solution["grouped_attention"](q[:, order], k, v, causal)
        return out[:, torch.argsort(order)]
    fails("attention", dict(solution, grouped_attention=grouped_attention), "h % Hkv")


def test_mask_aligned_to_the_start(solution):
    def grouped_attention(q, k, v, causal=True):
        b, h, tq, d = q.shape
        h_kv, tk = k.shape[1], k.shape[2]
        scores = q.float().reshape(b, h_kv, -1, d) @ k.float().transpose(-2, -1) / math.sqrt(d)
        scores = scores.view(b, h_kv, h // h_kv, tq, tk)
        if causal:
            scores = scores.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(), float("-inf"))
        return (scores.view(b, h_kv, -1, tk).softmax(-1) @ v.float()).view(b, h, tq, d).to(q.dtype)
    fails("attention", dict(solution, grouped_attention=grouped_attention), "start-aligned mask")


def test_repeating_the_cache(solution):
    def grouped_attention(q, k, v, causal=True):  # right answer, but K/V copied per query head
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        return solution["grouped_attention"](q, k, v, causal)
    namespace = dict(solution, grouped_attention=grouped_attention)
    assert_part_passes("lab04", "attention", namespace)  # part 1 checks the function only
    fails("memory", namespace, "repeat_interleave")


def test_pooling_strided_heads(solution):
    def pool_heads(weight, head_dim, n_groups):
        n_heads = weight.shape[0] // head_dim
        grouped = weight.float().reshape(n_heads // n_groups, n_groups, head_dim, *weight.shape[1:])
        return grouped.mean(0).reshape(n_groups * head_dim, *weight.shape[1:]).to(weight.dtype)
    fails("pooling", dict(solution, pool_heads=pool_heads), "heads g, g+n, ... pooled")


def test_pooling_by_sum(solution):
    def pool_heads(weight, head_dim, n_groups):
        g = weight.shape[0] // head_dim // n_groups
        return solution["pool_heads"](weight, head_dim, n_groups) * g
    fails("pooling", dict(solution, pool_heads=pool_heads), "sum")


def test_pooling_without_the_error(solution):
    def pool_heads(weight, head_dim, n_groups):
        n_heads = weight.shape[0] // head_dim
        kept = weight[: (n_heads // n_groups) * n_groups * head_dim]
        return solution["pool_heads"](kept, head_dim, n_groups)
    fails("pooling", dict(solution, pool_heads=pool_heads), "silently drops heads")


def test_conversion_keeping_the_first_head_of_each_group(solution):
    def pool_heads(weight, head_dim, n_groups):  # the naive conversion: drop all but one head per group
        n_heads = weight.shape[0] // head_dim
        return weight.reshape(n_groups, n_heads // n_groups, head_dim, *weight.shape[1:])[:, 0].reshape(
            n_groups * head_dim, *weight.shape[1:]).clone()
    namespace = dict(solution, pool_heads=pool_heads)
    namespace["convert_to_gqa"] = types.FunctionType(solution["convert_to_gqa"].__code__, namespace)
    fails("conversion", namespace, "first head kept")


def test_conversion_in_place(solution):
    def convert_to_gqa(model, n_kv_heads):
        converted = solution["convert_to_gqa"](model, n_kv_heads)
        for mine, theirs in zip(model.layers, converted.layers):
            mine.attention.wk, mine.attention.wv = theirs.attention.wk, theirs.attention.wv
            mine.attention.n_kv_heads = n_kv_heads
        model.config = converted.config
        return model
    fails("conversion", dict(solution, convert_to_gqa=convert_to_gqa), "changes the original")


def test_conversion_forgetting_the_config(solution):
    def convert_to_gqa(model, n_kv_heads):
        converted = solution["convert_to_gqa"](model, n_kv_heads)
        converted.config = copy.deepcopy(model.config)
        return converted
    fails("conversion", dict(solution, convert_to_gqa=convert_to_gqa), "config not updated")


def test_conversion_pooling_keys_only(solution):
    def convert_to_gqa(model, n_kv_heads):  # V keeps every head: the model then fails or mixes shapes
        converted = copy.deepcopy(model)
        for block in converted.layers:
            attn = block.attention
            new = torch.nn.Linear(attn.wk.in_features, n_kv_heads * attn.head_dim, bias=attn.wk.bias is not None,
                                  dtype=attn.wk.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(solution["pool_heads"](attn.wk.weight, attn.head_dim, n_kv_heads))
                if attn.wk.bias is not None:
                    new.bias.copy_(solution["pool_heads"](attn.wk.bias, attn.head_dim, n_kv_heads))
            attn.wk = new
        converted.config = dataclasses.replace(model.config, n_kv_heads=n_kv_heads)
        return converted
    fails("conversion", dict(solution, convert_to_gqa=convert_to_gqa), "V not pooled")
