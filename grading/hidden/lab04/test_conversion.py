"""Lab 04, part 3: mha_to_gqa(model, n_kv_heads), against the library's mha_to_gqa."""

import pytest
import torch

from effml_lib.attention import mha_to_gqa
from effml_lib.model import ModelConfig, Transformer
from trusted import StudentGone, describe


def model(n_kv_heads=6, qkv_bias=False, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=50, dim=48, n_layers=3, n_heads=6, n_kv_heads=n_kv_heads, hidden_dim=96,
                         max_seq_len=32, qkv_bias=qkv_bias)
    model = Transformer(config).eval()  # float32: pool_heads averages in float32
    if qkv_bias:  # the biases start at zero: give them values, so that pooling them matters
        with torch.no_grad():
            for block in model.layers:
                for proj in (block.attention.wq, block.attention.wk, block.attention.wv):
                    proj.bias.normal_(0.0, 0.5)
    return model


def logits(converted, tokens, what):
    """The converted model's logits for ``tokens``; a model that does not run fails with what was expected."""
    try:
        with torch.no_grad():
            return converted(tokens)
    except StudentGone:
        raise
    except Exception:  # noqa: BLE001 - the student's model, rebuilt here from the library's classes
        raise AssertionError(f"{what}: the converted model does not run; each layer needs wk and wv of "
                             f"n_kv_heads * head_dim outputs and attention.n_kv_heads set to match") from None


@pytest.mark.parametrize("n_kv_heads", [3, 2, 1], ids=["gqa3", "gqa2", "mqa"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no_bias", "qkv_bias"])
def test_logits_equal_the_reference_conversion(student, gen, close, n_kv_heads, qkv_bias):
    original = model(qkv_bias=qkv_bias)
    tokens = torch.randint(0, 50, (2, 12), generator=gen)
    what = f"6 query heads, 6 KV heads to {n_kv_heads}{' with q/k/v biases' if qkv_bias else ''}"
    got = logits(student.mha_to_gqa(original, n_kv_heads), tokens, what)
    with torch.no_grad():
        expected = mha_to_gqa(original, n_kv_heads)(tokens)
    assert close(got, expected, 1e-5, 1e-5), (
        f"{what}: the converted model's logits differ from mean-pooling each group's K and V heads "
        f"(weights{' and biases' if qkv_bias else ''}) in every layer")


def test_every_layer_and_the_config(student):
    original = model()
    converted = student.mha_to_gqa(original, 2)
    assert converted.config.n_kv_heads == 2, f"the copy's config must say 2 KV heads, got {describe(converted.config.n_kv_heads)}"
    for i, block in enumerate(converted.layers):
        assert block.attention.n_kv_heads == 2, f"layer {i}: attention.n_kv_heads must be 2"
        assert block.attention.wk.weight.shape == (2 * 8, 48) and block.attention.wv.weight.shape == (2 * 8, 48), (
            f"layer {i}: wk and wv must become (2 heads x 8, 48)")


def test_original_untouched_and_other_weights_kept(student):
    original = model()
    before = {n: p.clone() for n, p in original.named_parameters()}
    converted = student.mha_to_gqa(original, 3)
    assert all(torch.equal(p, before[n]) for n, p in original.named_parameters()), (
        "the model passed in must not change: convert a copy")
    assert original.config.n_kv_heads == 6 and original.layers[0].attention.n_kv_heads == 6, (
        "nor its config, nor its layers' attention.n_kv_heads")
    for n, p in converted.named_parameters():
        if ".wk." not in n and ".wv." not in n:
            assert torch.equal(p, before[n]), f"{n} must be copied unchanged"


def test_from_gqa_to_fewer_heads(student, gen, close):
    """A model that already has 2 KV heads, converted to 1: the mean of its two groups."""
    original = model(n_kv_heads=2, seed=1)
    tokens = torch.randint(0, 50, (1, 9), generator=gen)
    what = "a GQA model (6 query heads, 2 KV heads) to 1 KV head"
    got = logits(student.mha_to_gqa(original, 1), tokens, what)
    with torch.no_grad():
        expected = mha_to_gqa(original, 1)(tokens)
    assert close(got, expected, 1e-5, 1e-5), (
        f"{what}: its logits differ from averaging the two KV heads of each layer's wk and wv")
