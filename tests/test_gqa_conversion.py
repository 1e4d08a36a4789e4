"""pool_heads and mha_to_gqa: mean-pooling K/V projection heads (the GQA paper's conversion), on a
weight, a layer and a model."""

import pytest
import torch
import torch.nn.functional as F

from effml_lib.attention import Attention, mha_to_gqa, pool_heads
from effml_lib.kvcache import StaticKVCache
from effml_lib.model import ModelConfig, Transformer
from effml_lib.rope import rope_frequencies
from conftest import assert_close

DIM, HEADS, HEAD_DIM = 48, 6, 8


def layer(n_kv_heads=HEADS, bias=False, seed=0):
    torch.manual_seed(seed)
    return Attention(DIM, HEADS, n_kv_heads, qkv_bias=bias).double()


def expected_output(original, x, n_kv_heads, cos, sin):
    """The converted layer's output, built from the original's own K/V: each group's heads averaged,
    then plain SDPA with the groups repeated to every query head (float64)."""
    b, t, _ = x.shape
    group = original.n_kv_heads // n_kv_heads

    def heads(proj, n):  # (B, n, T, D)
        return proj(x).view(b, t, n, HEAD_DIM).transpose(1, 2)

    from effml_lib.rope import rotate_reference

    q = rotate_reference(heads(original.wq, HEADS), cos[:t], sin[:t])
    k = heads(original.wk, original.n_kv_heads).unflatten(1, (n_kv_heads, group)).mean(2)  # (B, n, T, D)
    v = heads(original.wv, original.n_kv_heads).unflatten(1, (n_kv_heads, group)).mean(2)
    k = rotate_reference(k, cos[:t], sin[:t])
    repeat = HEADS // n_kv_heads
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), is_causal=True)
    return original.wo(out.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM))


def pooled_by_loop(weight, head_dim, n_groups):
    """The definition, one head at a time, in float64: new head g = the mean of old heads g*G .. g*G+G-1."""
    n_heads = weight.shape[0] // head_dim
    group = n_heads // n_groups
    heads = [weight[i * head_dim:(i + 1) * head_dim].double() for i in range(n_heads)]  # (D, ...) each
    return torch.cat([sum(heads[g * group + j] for j in range(group)) / group for g in range(n_groups)])


@pytest.mark.parametrize("n_heads,head_dim,n_groups", [(8, 4, 2), (6, 8, 3), (6, 8, 1), (4, 2, 4), (32, 16, 8)],
                         ids=["8to2", "6to3", "6to1_mqa", "4to4_same", "32to8_llama3"])
def test_pool_heads_equals_the_loop(n_heads, head_dim, n_groups, gen):
    weight = torch.randn(n_heads * head_dim, 24, generator=gen)
    bias = torch.randn(n_heads * head_dim, generator=gen)
    got_weight, got_bias = pool_heads(weight, head_dim, n_groups), pool_heads(bias, head_dim, n_groups)
    assert got_weight.shape == (n_groups * head_dim, 24) and got_bias.shape == (n_groups * head_dim,)
    assert_close(got_weight, pooled_by_loop(weight, head_dim, n_groups).float(), what="pooled weight")
    assert_close(got_bias, pooled_by_loop(bias, head_dim, n_groups).float(), what="pooled bias")


def test_pool_heads_dtypes_and_the_input():
    weight = torch.randn(8 * 16, 32, generator=torch.Generator().manual_seed(0))
    low = weight.to(torch.bfloat16)
    before = low.clone()
    got = pool_heads(low, 16, 2)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, pooled_by_loop(low.float(), 16, 2).float().to(torch.bfloat16)), "average in float32, round once"
    assert torch.equal(low, before), "the input must not change"
    exact = pool_heads(weight.double(), 16, 2)
    assert exact.dtype == torch.float64, "float64 stays float64"
    assert_close(exact, pooled_by_loop(weight.double(), 16, 2), what="float64 pooling")


def test_pool_heads_bad_arguments():
    with pytest.raises(ValueError, match=r"n_groups \(4\) must divide the 6 heads"):
        pool_heads(torch.randn(12, 3), 2, 4)
    with pytest.raises(ValueError, match="n_groups must be a positive int"):
        pool_heads(torch.randn(12, 3), 2, 0)
    with pytest.raises(ValueError, match=r"multiple of head_dim \(5\)"):
        pool_heads(torch.randn(12, 3), 5, 1)
    with pytest.raises(TypeError, match="floating-point"):
        pool_heads(torch.ones(12, 3, dtype=torch.int64), 2, 1)


@pytest.mark.parametrize("n_kv_heads", [6, 3, 2, 1], ids=["mha", "gqa3", "gqa2", "mqa"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "qkv_bias"])
def test_layer_equals_attention_to_averaged_heads(n_kv_heads, bias, gen):
    original = layer(bias=bias)
    x = torch.randn(2, 7, DIM, generator=gen, dtype=torch.float64)
    cos, sin = rope_frequencies(HEAD_DIM, 16)
    converted = mha_to_gqa(original, n_kv_heads)
    assert converted.n_kv_heads == n_kv_heads and converted.wk.out_features == n_kv_heads * HEAD_DIM
    with torch.no_grad():
        got = converted(x, cos[:7], sin[:7])
        assert_close(got, expected_output(original, x, n_kv_heads, cos, sin), torch.float64, what=f"{n_kv_heads} KV heads")


def test_pooled_weights_are_group_means_and_the_input_is_untouched():
    original = layer(bias=True)
    before = {n: p.clone() for n, p in original.named_parameters()}
    converted = mha_to_gqa(original, 2)
    for g in range(2):  # group g = old heads 3g, 3g+1, 3g+2
        rows = [original.wk.weight[h * HEAD_DIM:(h + 1) * HEAD_DIM] for h in range(3 * g, 3 * g + 3)]
        assert torch.allclose(converted.wk.weight[g * HEAD_DIM:(g + 1) * HEAD_DIM], sum(rows) / 3)
        biases = [original.wv.bias[h * HEAD_DIM:(h + 1) * HEAD_DIM] for h in range(3 * g, 3 * g + 3)]
        assert torch.allclose(converted.wv.bias[g * HEAD_DIM:(g + 1) * HEAD_DIM], sum(biases) / 3)
    assert torch.equal(converted.wq.weight, original.wq.weight) and torch.equal(converted.wo.weight, original.wo.weight)
    assert all(torch.equal(p, before[n]) for n, p in original.named_parameters()), "the input must not change"
    assert original.n_kv_heads == HEADS


def test_converting_in_steps_equals_converting_at_once():
    original = layer()
    in_steps, at_once = mha_to_gqa(mha_to_gqa(original, 3), 1), mha_to_gqa(original, 1)
    assert torch.allclose(in_steps.wk.weight, at_once.wk.weight, atol=1e-15)
    assert torch.allclose(in_steps.wv.weight, at_once.wv.weight, atol=1e-15)


def test_low_precision_weights_are_averaged_in_float32():
    original = layer().to(torch.bfloat16)
    converted = mha_to_gqa(original, 1)
    exact = original.wk.weight.float().view(1, HEADS, HEAD_DIM, DIM).mean(1).reshape(HEAD_DIM, DIM)
    assert converted.wk.weight.dtype == torch.bfloat16
    assert torch.equal(converted.wk.weight, exact.to(torch.bfloat16)), "average in float32, round once"


def test_whole_model(gen):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, dim=DIM, n_layers=3, n_heads=HEADS, n_kv_heads=HEADS, hidden_dim=96, max_seq_len=32)
    model = Transformer(config).double().eval()
    converted = mha_to_gqa(model, 2)
    assert converted.config.n_kv_heads == 2 and model.config.n_kv_heads == HEADS
    assert all(block.attention.n_kv_heads == 2 for block in converted.layers)
    tokens = torch.randint(0, 64, (2, 9), generator=gen)
    with torch.no_grad():
        full = converted(tokens)
        # the converted model decodes with a cache of its own (smaller) shape, to the same logits
        cache = StaticKVCache.for_model(converted, batch_size=2, max_seq_len=16)
        assert cache.shape[2] == 2
        converted(tokens[:, :8], cache, 0)
        step = converted(tokens[:, 8:], cache, 8)
        # each layer alone matches the reference conversion on that layer's input
        x = converted.layers[0].attention_norm(model.tok_embeddings(tokens))
        cos, sin = model.rope_tables("cpu")
        got = converted.layers[0].attention(x, cos[:9], sin[:9])
        expected = expected_output(model.layers[0].attention, x, 2, cos, sin)
    assert_close(step[:, 0], full[:, 8], torch.float64, what="cached decode of the converted model")
    assert_close(got, expected, torch.float64, what="layer 0 of the converted model")
    assert not torch.allclose(full, model(tokens)), "pooling heads changes the function (a sanity check)"


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"n_kv_heads \(4\) must divide the module's 6 KV heads"):
        mha_to_gqa(layer(), 4)
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\) must divide the module's 3 KV heads"):
        mha_to_gqa(layer(n_kv_heads=3), 2)
    with pytest.raises(ValueError, match="positive int"):
        mha_to_gqa(layer(), 0)
    with pytest.raises(ValueError, match="positive int"):
        mha_to_gqa(layer(), 2.0)
    with pytest.raises(TypeError, match="takes an attention.Attention or a model.Transformer"):
        mha_to_gqa(torch.nn.Linear(4, 4), 2)
    config = ModelConfig(vocab_size=16, dim=DIM, n_layers=1, n_heads=HEADS, n_kv_heads=HEADS, hidden_dim=32, max_seq_len=8)
    with pytest.raises(ValueError, match=r"must divide the model's 6 KV heads"):
        mha_to_gqa(Transformer(config), 5)
