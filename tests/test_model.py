import pytest
import torch

from effml_lib.kvcache import StaticKVCache
from effml_lib.model import ModelConfig, RMSNorm, Transformer


def small_model(**overrides):
    cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=48)
    cfg.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg)).eval()


def test_rmsnorm_matches_formula(gen):
    x = torch.randn(3, 5, 16, generator=gen)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_causality_future_tokens_do_not_change_past_logits(gen):
    model = small_model()
    tokens = torch.randint(0, 97, (2, 20), generator=gen)
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8), generator=gen)
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_cached_forward_equals_full_forward(n_kv_heads, gen):
    model = small_model(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 97, (2, 30), generator=gen)
    cache = StaticKVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full = model(tokens)
        chunks = [model(tokens[:, :17], cache, 0)]  # prefill
        for t in range(17, 30):  # then token by token, int positions
            chunks.append(model(tokens[:, t : t + 1], cache, t))
        stepped = torch.cat(chunks, dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_per_sequence_start_positions_equal_each_sequence_alone(gen):
    """Two sequences of different lengths in one cache, each at its own positions, give each
    sequence's own logits (as computed alone, without a cache)."""
    model = small_model()
    long, short = torch.randint(0, 97, (1, 14), generator=gen), torch.randint(0, 97, (1, 9), generator=gen)
    cache = StaticKVCache.for_model(model, batch_size=2, max_seq_len=20)
    with torch.no_grad():
        prompts = torch.cat([long[:, :10], torch.cat([short[:, :5], torch.zeros(1, 5, dtype=torch.long)], 1)])
        model(prompts, cache, 0)  # prefill, right-padded: row 1's real tokens are its first 5
        steps = []
        for i in range(4):  # row 0 decodes positions 10..13, row 1 positions 5..8
            token = torch.stack([long[0, 10 + i], short[0, 5 + i]])[:, None]  # (2, 1)
            steps.append(model(token, cache, torch.tensor([10 + i, 5 + i]))[:, 0])
        stepped = torch.stack(steps, dim=1)  # (2, 4, V)
        torch.testing.assert_close(stepped[0], model(long)[0, 10:14], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stepped[1], model(short)[0, 5:9], atol=1e-5, rtol=1e-5)


def test_stale_cache_entries_past_a_sequence_are_ignored(gen):
    """Attention reads each sequence's cache only up to its own length: what lies past it (padding,
    an earlier longer generation) changes nothing."""
    model = small_model()
    tokens = torch.randint(0, 97, (1, 8), generator=gen)
    clean = StaticKVCache.for_model(model, batch_size=1, max_seq_len=16)
    stale = StaticKVCache.for_model(model, batch_size=1, max_seq_len=16)
    for buffer in stale.buffers():
        buffer.normal_(0, 100.0, generator=gen)
    with torch.no_grad():
        expected = model(tokens, clean, 0)
        got = model(tokens, stale, 0)
    torch.testing.assert_close(got, expected)


def test_tensor_start_pos_of_one_element_applies_to_every_sequence(gen):
    model = small_model()
    tokens = torch.randint(0, 97, (2, 12), generator=gen)
    cache = StaticKVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full = model(tokens)
        model(tokens[:, :8], cache, 0)
        rows = [model.forward_unchecked(tokens[:, t : t + 1], cache, torch.tensor([t])) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(rows, 1), full[:, 8:], atol=1e-5, rtol=1e-5)


class RecordingCache(StaticKVCache):
    """A cache that records what the model asks of it through the protocol."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def update(self, layer, k, v, positions):
        self.calls.append(("update", layer, positions.clone()))
        return super().update(layer, k, v, positions)

    def attention(self, q, keys, values, context_lens, impl="auto"):
        self.calls.append(("attention", q.shape[2], context_lens.clone()))
        return super().attention(q, keys, values, context_lens, impl)


def test_model_uses_the_cache_only_through_its_protocol(gen):
    model = small_model()
    cache = RecordingCache(2, 2, 16, 2, 8)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 1), generator=gen), cache, torch.tensor([3, 6]))
    updates = [c for c in cache.calls if c[0] == "update"]
    attends = [c for c in cache.calls if c[0] == "attention"]
    assert [c[1] for c in updates] == [0, 1], "one update per layer, in order"
    assert all(torch.equal(c[2], torch.tensor([[3], [6]])) for c in updates), "positions (B, T) per sequence"
    assert all(torch.equal(c[2], torch.tensor([4, 7], dtype=torch.int32)) for c in attends), \
        "each sequence attends to its own length: its position + 1"


def test_tied_embeddings_share_one_tensor_and_count_once():
    tied, untied = small_model(tie_embeddings=True), small_model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32


def test_bfloat16_model_keeps_float32_rope_tables(gen):
    model = small_model().to(torch.bfloat16)
    assert model.rope_tables("cpu")[0].dtype == torch.float32
    logits = model(torch.randint(0, 97, (1, 8), generator=gen))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4)
    for field, bad in (("head_dim", 0), ("head_dim", 64.0), ("n_kv_heads", True), ("hidden_dim", -1)):
        with pytest.raises(ValueError, match=field):
            ModelConfig(**{field: bad})
    model = small_model()
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a cache"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=3)


def test_wrong_cache_raises():
    model = small_model()
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="n_kv_heads"):
        model(tokens, StaticKVCache(2, 2, 48, 4, 8))  # 4 KV heads, model has 2
    with pytest.raises(ValueError, match="batch"):
        model(tokens, StaticKVCache.for_model(model, batch_size=1))
    with pytest.raises(TypeError, match="dtype"):
        model(tokens, StaticKVCache.for_model(model, batch_size=2, dtype=torch.float16))
    with pytest.raises(ValueError, match="overflow"):
        model(tokens, StaticKVCache.for_model(model, batch_size=2, max_seq_len=4), start_pos=2)
    with pytest.raises(TypeError, match="KVCache protocol"):
        model(tokens, cache={"k": None})
    with pytest.raises(ValueError, match="overflow"):
        model(tokens, StaticKVCache.for_model(model, batch_size=2, max_seq_len=8), start_pos=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="one per sequence"):
        model(tokens, StaticKVCache.for_model(model, batch_size=2), start_pos=torch.tensor([0, 1, 2]))
    if torch.device("meta") != tokens.device:
        with pytest.raises(ValueError, match="one device"):
            model(tokens, StaticKVCache.for_model(model, batch_size=2, device="meta"))


def test_set_rope_changes_positions_not_weights(gen):
    from effml_lib.rope import rope_frequencies

    model = small_model()
    tokens = torch.randint(0, 97, (1, 12), generator=gen)
    with torch.no_grad():
        before = model(tokens)
        model.set_rope(scaling={"type": "linear", "factor": 2}, max_seq_len=2 * model.config.max_seq_len)
        stretched = model(tokens)
    assert model.config.rope_scaling == {"type": "linear", "factor": 2}
    cos, _ = rope_frequencies(model.config.head_dim, model.config.max_seq_len, model.config.rope_theta,
                              {"type": "linear", "factor": 2})
    torch.testing.assert_close(model.rope_tables("cpu")[0], cos)
    assert not torch.allclose(before, stretched, atol=1e-4), "position interpolation must change the logits"
    with torch.no_grad():
        model.set_rope(scaling=None)
        torch.testing.assert_close(model(tokens), before)  # undone: same weights, same logits
    with pytest.raises(ValueError, match="factor"):
        model.set_rope(scaling={"type": "ntk", "factor": 0.5})


class Doubled(torch.nn.Module):
    """Twice what the wrapped module gives: a swap whose effect is known exactly."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def test_block_takes_its_feed_forward_as_a_module(gen):
    from effml_lib.model import Block, FeedForward

    cfg = small_model().config
    plain = Block(cfg)
    swapped = Block(cfg, ffn=Doubled(plain.feed_forward))
    swapped.load_state_dict({k.replace("feed_forward.", "feed_forward.inner."): v for k, v in plain.state_dict().items()})
    x = torch.randn(2, 5, cfg.dim, generator=gen)
    cos, sin = small_model().rope_tables("cpu")
    with torch.no_grad():
        h = x + plain.attention(plain.attention_norm(x), cos, sin)
        expected = h + 2 * plain.feed_forward(plain.ffn_norm(h))
        torch.testing.assert_close(swapped(x, cos, sin), expected)
    assert isinstance(Block(cfg).feed_forward, FeedForward), "without ffn, the SwiGLU feed-forward"
    with pytest.raises(TypeError, match="ffn must be an nn.Module"):
        Block(cfg, ffn=lambda x: x)


def test_replace_linears_by_pattern_on_the_course_model(gen):
    from effml_lib.checkpoints import pretrained
    from effml_lib.model import replace_linears

    model = pretrained("effml-tiny")
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=gen)
    with torch.no_grad():
        before = model(tokens)
    n = model.config.n_layers
    names = replace_linears(model, lambda name, linear: Doubled(linear), targets=("wq", "layers.*.attention.wv"))
    assert names == [f"layers.{i}.attention.{w}" for i in range(n) for w in ("wq", "wv")]
    assert all(isinstance(b.attention.wq, Doubled) and isinstance(b.attention.wk, torch.nn.Linear) for b in model.layers)
    with torch.no_grad():
        assert not torch.allclose(model(tokens), before, atol=1e-3), "doubled q and v projections change the logits"
    with pytest.raises(ValueError, match="'wq' matches no nn.Linear"):
        replace_linears(model, lambda name, linear: linear, targets=("wq",))  # every wq is a Doubled now


def test_replace_linears_defaults_to_every_block_projection_and_checks_its_arguments():
    from effml_lib.model import replace_linears

    model = small_model(tie_embeddings=True)
    seen = replace_linears(model, lambda name, linear: linear)  # identity: only the names matter
    per_layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    assert seen == [f"layers.{i}.{p}" for i in range(2) for p in per_layer], "not the (tied) LM head"
    with pytest.raises(ValueError, match="'wqq' matches no nn.Linear"):
        replace_linears(model, lambda name, linear: linear, targets=["wqq"])
    with pytest.raises(TypeError, match="must return an nn.Module"):
        replace_linears(model, lambda name, linear: None, targets="output")
    with pytest.raises(TypeError, match="replace must be a callable"):
        replace_linears(model, None)


# --- fused projections (decode: one q/k/v product and one gate/up product per block) ---------------

@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1, "qkv_bias": True, "mlp_bias": True}])
def test_fused_projections_give_the_same_logits_with_and_without_a_cache(overrides, gen):
    import copy

    from effml_lib.model import fuse_projections

    model = small_model(**overrides)
    fused = fuse_projections(copy.deepcopy(model))
    tokens = torch.randint(0, 97, (2, 12), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), model(tokens), atol=1e-5, rtol=1e-5)
        caches = [StaticKVCache.for_model(m, batch_size=2) for m in (model, fused)]
        for m, cache in zip((model, fused), caches):
            m(tokens[:, :8], cache, 0)
        steps = [m(tokens[:, 8:9], cache, 8) for m, cache in zip((model, fused), caches)]
    torch.testing.assert_close(steps[1], steps[0], atol=1e-5, rtol=1e-5)
    attention, ffn = fused.layers[0].attention, fused.layers[0].feed_forward
    kv = model.config.n_kv_heads * model.config.head_dim
    assert attention.wqkv.out_features == model.config.dim + 2 * kv and not hasattr(attention, "wq")
    assert ffn.w13.out_features == 2 * model.config.hidden_dim and not hasattr(ffn, "w1")


def test_quantizing_fused_projections_gives_the_separate_layers_codes():
    import copy

    from effml_lib.model import fuse_projections
    from effml_lib.quant import quantize_model

    model = small_model()
    separate = quantize_model(copy.deepcopy(model), 4, 16)
    fused = quantize_model(fuse_projections(copy.deepcopy(model)), 4, 16)
    for a, b in zip(separate.layers, fused.layers):
        for name in ("codes", "scale", "zero"):
            att = [getattr(getattr(a.attention, w), name) for w in ("wq", "wk", "wv")]
            ffn = [getattr(getattr(a.feed_forward, w), name) for w in ("w1", "w3")]
            assert torch.equal(getattr(b.attention.wqkv, name), torch.cat(att)), f"wqkv.{name}"
            assert torch.equal(getattr(b.feed_forward.w13, name), torch.cat(ffn)), f"w13.{name}"


def test_fuse_projections_checks_what_it_fuses():
    from effml_lib.model import fuse_projections
    from effml_lib.quant import quantize_model

    model = fuse_projections(small_model())
    with pytest.raises(ValueError, match=r"layers\.0\.attention is already fused"):
        fuse_projections(model)
    partly = quantize_model(small_model(), 8, None, targets=["layers.1.feed_forward.w3"])
    with pytest.raises(TypeError, match=r"fuse before quantizing.*layers\.1\.feed_forward\.w3 is a QuantLinear"):
        fuse_projections(partly)
    assert all(hasattr(b.attention, "wq") and hasattr(b.feed_forward, "w1") for b in partly.layers), \
        "a refused model is left unfused, not half fused"
    with pytest.raises(ValueError, match="needs a model with decoder blocks"):
        fuse_projections(torch.nn.Linear(4, 4))
