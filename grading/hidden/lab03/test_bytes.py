"""Lab 03, part 1: kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2)
and sequences_that_fit."""

import pytest

from effml_lib.kvcache import MODEL_PARAMS, MODEL_SHAPES
from trusted import describe


def formula(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem):
    return int(2 * batch_size * seq_len * n_layers * n_kv_heads * head_dim * bytes_per_elem)


@pytest.mark.parametrize("name", ["llama-2-70b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "mixtral-8x7b"])
def test_gqa_models(student, form, name):
    s = MODEL_SHAPES[name]
    args = (3, 1000, s["n_layers"], s["n_kv_heads"], s["dim"] // s["n_heads"])
    with form(f"{name}'s shape, batch 3 x 1000 tokens"):
        got = student.kv_cache_bytes(*args, 2)
    assert got == formula(*args, 2), (
        f"{name} (GQA, {s['n_kv_heads']} KV heads), batch 3 x 1000 tokens: expected 2 x batch x seq_len x n_layers x "
        f"n_kv_heads x head_dim x 2 bytes, got {describe(got)}")


@pytest.mark.parametrize("bytes_per_elem,label", [(4, "float32"), (1, "fp8 / int8"), (0.5, "int4")])
def test_element_widths(student, form, bytes_per_elem, label):
    with form(f"{label} ({bytes_per_elem} bytes per element)"):
        got = student.kv_cache_bytes(2, 4096, 32, 8, 128, bytes_per_elem)
    assert got == formula(2, 4096, 32, 8, 128, bytes_per_elem), (
        f"{label}: expected the formula with bytes_per_elem={bytes_per_elem}, got {describe(got)}")
    assert isinstance(got, int), f"return an int of bytes, got {type(got).__name__} for {label}"


def test_default_is_two_bytes_and_keywords_work(student, form):
    with form("arguments by keyword, bytes_per_elem left at its default"):
        got = student.kv_cache_bytes(batch_size=1, seq_len=1, n_layers=32, n_kv_heads=32, head_dim=128)
    assert got == 512 * 2**10, f"with the default bytes_per_elem (2) Llama-2-7B costs 512 KiB per token, got {describe(got)}"


def test_empty_cache(student, form):
    with form("batch_size 0"):
        assert student.kv_cache_bytes(0, 4096, 32, 8, 128) == 0, "batch_size 0 holds no bytes"
    with form("seq_len 0"):
        assert student.kv_cache_bytes(4, 0, 32, 8, 128) == 0, "seq_len 0 holds no bytes"


def test_sequences_that_fit(student):
    s = MODEL_SHAPES["llama-3-8b"]
    per_sequence = formula(1, 4096, s["n_layers"], s["n_kv_heads"], s["dim"] // s["n_heads"], 2)
    expected = (80 * 2**30 - 2 * MODEL_PARAMS["llama-3-8b"]["total"]) // per_sequence
    got = student.sequences_that_fit
    assert isinstance(got, int) and not isinstance(got, bool), f"sequences_that_fit should be an int, got {describe(got)}"
    assert got == expected, (
        f"sequences_that_fit is {describe(got)}: whole 4096-token sequences in what 80 GiB leave after bf16 weights")
