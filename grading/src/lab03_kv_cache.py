# %% [markdown] nbgrader={"grade_id": "intro", "locked": true}
# # Lab 03 · The KV cache
#
# You will size a KV cache, write one that a batch of sequences of different lengths can share, run the
# course model one step at a time on top of it, and check that cached greedy decoding produces exactly
# the tokens the model produces when it recomputes everything. Part 5 times your decoding against
# recomputation. Notebook `03_kv_cache` explains each piece; read it first.
#
# How this lab is graded: each part has **visible tests** (run them as often as you like; a failure says
# what is wrong) and a **graded cell** whose hidden tests decide that part's points (14 in all). While
# your code is graded, the library's own `kv_cache_bytes` and its cache (`effml_lib.kvcache`) are
# unavailable, so call your own. Do not edit or delete the read-only cells.

# %% shared="colab_setup" nbgrader={"grade_id": "colab_setup", "locked": true}

# %% nbgrader={"grade_id": "imports", "locked": true}
import math

import torch

from effml_lib.attention import attention  # attention is module 01's lab: here you may use the library's
from effml_lib.checkpoints import pretrained
from effml_lib.kvcache import MODEL_PARAMS, MODEL_SHAPES
from effml_lib.model import ModelConfig, Transformer
from effml_lib.rope import apply_rope_qk  # and RoPE is module 02's

torch.manual_seed(0)


def uncached_greedy(model, prompt, max_new_tokens):
    # The definition the tests compare with: recompute the whole sequence for every new token.
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([tokens]))  # (1, T, vocab)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


# %% [markdown] nbgrader={"grade_id": "p1_intro", "locked": true}
# ## Part 1 · How big is a KV cache? (3 points)
#
# Every layer keeps, for every sequence and every token so far, one key and one value vector per KV head:
#
# `bytes = 2 · batch_size · seq_len · n_layers · n_kv_heads · head_dim · bytes_per_elem`
#
# `kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2)` returns that
# number as an `int`. `bytes_per_elem` is 4 for float32, 2 for bf16/fp16, 1 for fp8 or int8, and may be
# fractional (0.5 for int4).
#
# Then answer a question with it. A GPU with **80 GiB** (80 · 2³⁰ bytes) holds Llama-3-8B's weights in
# bf16 (2 bytes per parameter; `MODEL_PARAMS["llama-3-8b"]["total"]` parameters) and nothing else but the
# cache. How many sequences of **4096 tokens** each fit in the rest, with a bf16 cache? Set
# `sequences_that_fit` to that integer, computed from `MODEL_SHAPES["llama-3-8b"]` (`dim // n_heads` is
# the head dimension) with your function, not typed.

# %% nbgrader={"grade_id": "p1_solution", "solution": true}
def kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2):
    ### BEGIN SOLUTION
    return int(2 * batch_size * seq_len * n_layers * n_kv_heads * head_dim * bytes_per_elem)
    ### END SOLUTION


sequences_that_fit = None  # replace with a computation
### BEGIN SOLUTION
llama3 = MODEL_SHAPES["llama-3-8b"]
per_sequence = kv_cache_bytes(1, 4096, llama3["n_layers"], llama3["n_kv_heads"], llama3["dim"] // llama3["n_heads"], 2)
sequences_that_fit = (80 * 2**30 - 2 * MODEL_PARAMS["llama-3-8b"]["total"]) // per_sequence
### END SOLUTION
print("sequences that fit:", sequences_that_fit)

# %% nbgrader={"grade_id": "p1_visible", "locked": true}
# Visible tests for part 1
llama2 = MODEL_SHAPES["llama-2-7b"]
per_token = kv_cache_bytes(batch_size=1, seq_len=1, n_layers=llama2["n_layers"], n_kv_heads=llama2["n_kv_heads"],
                           head_dim=llama2["dim"] // llama2["n_heads"])  # by keyword, bytes_per_elem left at 2
assert isinstance(per_token, int), f"return an int, got {type(per_token).__name__}"
assert per_token == 512 * 2**10, f"Llama-2-7B stores 512 KiB per token in bf16 (2 x 32 layers x 32 heads x 128 x 2 bytes), got {per_token}"
assert kv_cache_bytes(16, 4096, 80, 64, 128) == 160 * 2**30, "Llama-2-70B as MHA (64 KV heads), batch 16 x 4096: 160 GiB"
assert kv_cache_bytes(16, 4096, 80, 8, 128) == 20 * 2**30, "Llama-2-70B as shipped, GQA with 8 KV heads, batch 16 x 4096: 20 GiB"
assert kv_cache_bytes(2, 10, 3, 4, 8, bytes_per_elem=4) == 15360, "float32: four bytes per element, 15360 bytes here"
assert kv_cache_bytes(2, 10, 3, 4, 8, bytes_per_elem=1) == 3840, "fp8 or int8: one byte per element, 3840 bytes here"
int4 = kv_cache_bytes(2, 10, 3, 4, 8, bytes_per_elem=0.5)
assert int4 == 1920 and isinstance(int4, int), f"int4: half a byte per element, the int 1920 here, got {int4!r}"
assert kv_cache_bytes(0, 4096, 32, 8, 128) == 0 and kv_cache_bytes(4, 0, 32, 8, 128) == 0, (
    "an empty batch (batch_size 0) or an empty sequence (seq_len 0) holds 0 bytes")
assert isinstance(sequences_that_fit, int) and 100 < sequences_that_fit < 200, (
    f"sequences_that_fit should be an int between 100 and 200, got {sequences_that_fit!r}")
print("part 1: visible tests passed")


# %% nbgrader={"grade_id": "p1_tests"} graded={"part": "bytes"}

# %% [markdown] nbgrader={"grade_id": "p2_intro", "locked": true}
# ## Part 2 · A cache for a batch of different lengths (3 points)
#
# `StaticKVCache` (the library's name for it: `effml_lib.kvcache.StaticKVCache`, the cache the model
# itself uses) preallocates, for each layer, a K and a V buffer of shape `(B, Hkv, max_seq_len, D)`, here in
# the lists `self.k` and `self.v`. Write its `update(layer, k_new, v_new, positions)`, with the library's
# arguments and results:
#
# * `k_new` and `v_new` have shape `(B, Hkv, T, D)`: `T ≥ 1` new tokens for each of the `B` sequences;
# * `positions` is an integer tensor of shape `(B, T)`: token `t` of sequence `b` goes to position
#   `positions[b, t]` of **that** sequence's buffer. A row holds one step's tokens of one sequence, so its
#   positions are consecutive; but sequences may be at different lengths: in one decode step sequence 0
#   may write position 7 while sequence 1 writes position 30;
# * it writes in place and returns `(keys, values, context_lens)`: the layer's **whole** buffers, each
#   `(B, Hkv, max_seq_len, D)` in the cache's dtype (the caller masks what is not meant to be seen), and
#   each sequence's length after this step, `positions[b, -1] + 1`, as an `int32` tensor of shape `(B,)`;
# * bad input gets a clear error, a `ValueError` whose message names
#   * `positions` when a position lies outside `[0, max_seq_len)` (a cache overflow, or a negative
#     position), or when a row of `positions` is not consecutive (`positions[b, t + 1]` must be
#     `positions[b, t] + 1`; otherwise `positions[b, -1] + 1` would not be the sequence's length);
#   * `k_new` when `k_new` does not have this cache's shape `(B, Hkv, T, D)` with `T` matching
#     `positions`, and `v_new` when `v_new` does not.
#
# Write it without a Python loop over tokens: one indexed assignment can place every token at once. Do not
# import the library's class over yours: it has the same name, and it is unavailable while your code is graded.

# %% nbgrader={"grade_id": "p2_solution", "solution": true}
class StaticKVCache:
    # For each layer, K and V buffers (B, Hkv, max_seq_len, D), preallocated and zero.

    def __init__(self, n_layers, batch_size, max_seq_len, n_kv_heads, head_dim, dtype=torch.float32):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len

    def update(self, layer, k_new, v_new, positions):
        ### BEGIN SOLUTION
        k_layer, v_layer = self.k[layer], self.v[layer]  # (B, Hkv, S, D)
        b, h_kv, _, d = k_layer.shape
        t = positions.shape[-1]
        if positions.shape != (b, t) or t == 0:
            raise ValueError(f"positions must have shape ({b}, T) with T >= 1, got {tuple(positions.shape)}")
        for name, new in (("k_new", k_new), ("v_new", v_new)):
            if new.shape != (b, h_kv, t, d):
                raise ValueError(f"{name} must have shape {(b, h_kv, t, d)}, got {tuple(new.shape)}")
        if positions.min() < 0 or positions.max() >= self.max_seq_len:
            raise ValueError(f"positions must lie in [0, {self.max_seq_len}): the cache would overflow, "
                             f"got {positions.min().item()} to {positions.max().item()}")
        if not bool((positions.diff(dim=1) == 1).all()):  # (B, T - 1): each step of a row is +1
            raise ValueError("each row of positions must be consecutive (one step's tokens of one sequence)")
        rows = torch.arange(b)[:, None]  # (B, 1), broadcast against positions (B, T)
        # Indexing dims 0 and 2 with (B, T) index tensors selects a (B, T, Hkv, D) block.
        k_layer[rows, :, positions] = k_new.transpose(1, 2).to(k_layer.dtype)
        v_layer[rows, :, positions] = v_new.transpose(1, 2).to(v_layer.dtype)
        context_lens = (positions[:, -1] + 1).to(torch.int32)  # (B,): each sequence's length after this step
        return k_layer, v_layer, context_lens
        ### END SOLUTION


# %% nbgrader={"grade_id": "p2_visible", "locked": true}
# Visible tests for part 2
def expect_value_error(call, name, what):
    # call() must raise a ValueError whose message names `name`
    try:
        call()
    except ValueError as error:
        assert name in str(error), f"the ValueError for {what} should name {name}, got: {error}"
    except Exception as error:
        raise AssertionError(f"{what} should raise a ValueError naming {name}, got {type(error).__name__}: {error}")
    else:
        raise AssertionError(f"{what} must raise a ValueError naming {name}")


cache = StaticKVCache(n_layers=2, batch_size=2, max_seq_len=8, n_kv_heads=2, head_dim=3)
k_new = torch.arange(24.0).view(2, 2, 2, 3)  # (B=2, Hkv=2, T=2, D=3): two tokens for each of two sequences
k, v, context_lens = cache.update(1, k_new, -k_new, torch.tensor([[0, 1], [5, 6]]))  # sequences at different positions
assert k.shape == (2, 2, 8, 3) and v.shape == (2, 2, 8, 3), (
    f"update returns the whole buffers (2, 2, 8, 3), got {tuple(k.shape)} and {tuple(v.shape)}")
assert torch.equal(cache.k[1][0, :, :2], k_new[0]), "sequence 0's tokens belong at its positions 0 and 1, in each KV head"
assert torch.equal(cache.k[1][1, :, 5:7], k_new[1]), "sequence 1's tokens belong at its positions 5 and 6, in each KV head"
assert cache.k[1][1, :, :5].abs().sum() == 0, "sequence 1's positions 0-4 were not written"
assert torch.equal(cache.v[1][1, :, 5:7], -k_new[1]), "values go to the V buffer at the same positions"
assert torch.equal(k, cache.k[1]) and torch.equal(v, cache.v[1]), "update returns the layer's buffers, holding what it wrote"
assert cache.k[0].abs().sum() == 0 and cache.v[0].abs().sum() == 0, "layer 0 must stay untouched"
assert isinstance(context_lens, torch.Tensor) and context_lens.shape == (2,) and context_lens.dtype == torch.int32, (
    "context_lens should be an int32 tensor of shape (B,) = (2,), got " + (
        f"{context_lens.dtype} of shape {tuple(context_lens.shape)}" if isinstance(context_lens, torch.Tensor)
        else type(context_lens).__name__))
assert context_lens.tolist() == [2, 7], (
    f"after writing positions 0-1 and 5-6 the sequences hold 2 and 7 positions (positions[:, -1] + 1), got {context_lens.tolist()}")

# A decode step: one token per sequence (T = 1), each at its own position; writing a position again replaces it.
step = torch.full((2, 2, 1, 3), 100.0)  # (B, Hkv, 1, D)
k, v, context_lens = cache.update(1, step, step, torch.tensor([[2], [6]]))
assert torch.equal(cache.k[1][0, :, 2], step[0, :, 0]), "sequence 0's decode token belongs at its position 2"
assert torch.equal(cache.k[1][1, :, 6], step[1, :, 0]), "sequence 1's decode token replaces what its position 6 held"
assert torch.equal(cache.k[1][1, :, 5], k_new[1, :, 0]), "sequence 1's position 5 must keep its earlier token"
assert context_lens.tolist() == [3, 7], f"after the decode step the sequences hold 3 and 7 positions, got {context_lens.tolist()}"

# A bf16 cache stays bf16 and stores bf16 values exactly; its last position, 3 of [0, 4), is inside it.
low = StaticKVCache(n_layers=1, batch_size=1, max_seq_len=4, n_kv_heads=2, head_dim=3, dtype=torch.bfloat16)
k_bf16 = torch.randn(1, 2, 2, 3).bfloat16()
try:
    k, v, context_lens = low.update(0, k_bf16, k_bf16, torch.tensor([[2, 3]]))
except Exception as error:
    raise AssertionError(f"a bf16 cache must take bf16 keys and values, but update raised {type(error).__name__}: {error}")
assert k.dtype == torch.bfloat16 and v.dtype == torch.bfloat16, f"a bf16 cache returns bf16 buffers, got {k.dtype}"
assert torch.equal(k[:, :, 2:4], k_bf16), "bf16 keys must be stored exactly, at positions 2 and 3 (the cache's last)"
assert context_lens.dtype == torch.int32, f"context_lens is int32 whatever the cache's dtype, got {context_lens.dtype}"

# Clear errors: a cache of 8 positions, 2 sequences, 2 KV heads of 3
two = torch.zeros(2, 2, 2, 3)  # (B, Hkv, T=2, D): right for this cache
expect_value_error(lambda: cache.update(0, two, two, torch.tensor([[7, 8], [0, 1]])), "positions",
                   "position 8 in a cache of 8 (an overflow)")
expect_value_error(lambda: cache.update(0, two, two, torch.tensor([[-1, 0], [0, 1]])), "positions", "position -1")
expect_value_error(lambda: cache.update(0, two, two, torch.tensor([[0, 1], [3, 5]])), "positions",
                   "positions [3, 5] in one row (not consecutive)")
expect_value_error(lambda: cache.update(0, two, two, torch.tensor([[1, 0], [0, 1]])), "positions",
                   "positions [1, 0] in one row (not consecutive)")
expect_value_error(lambda: cache.update(0, two, two, torch.tensor([[0, 1], [4, 4]])), "positions",
                   "positions [4, 4] in one row (not consecutive)")
for shape, why in (((2, 3, 2, 3), "3 KV heads, the cache has 2"), ((2, 2, 2, 4), "head_dim 4, the cache has 3"),
                   ((1, 2, 2, 3), "batch 1, the cache has 2"), ((2, 2, 3, 3), "3 tokens, positions has 2")):
    expect_value_error(lambda: cache.update(0, torch.zeros(shape), two, torch.tensor([[0, 1], [0, 1]])), "k_new",
                       f"k_new of shape {shape} ({why})")
expect_value_error(lambda: cache.update(0, two, torch.zeros(2, 3, 2, 3), torch.tensor([[0, 1], [0, 1]])), "v_new",
                   "v_new of shape (2, 3, 2, 3) (3 KV heads, the cache has 2)")
print("part 2: visible tests passed")


# %% nbgrader={"grade_id": "p2_tests"} graded={"part": "cache"}

# %% [markdown] nbgrader={"grade_id": "p3_intro", "locked": true}
# ## Part 3 · The model, one step at a time (3 points)
#
# `forward_with_cache(model, cache, tokens, positions)` runs the course model (a `Transformer`) on
# `tokens` `(B, T)` sitting at `positions` `(B, T)` and returns the logits `(B, T, vocab_size)`; the tokens
# attend to themselves and to everything the cache holds **at earlier positions of their own sequence**.
# For each layer `block = model.layers[i]`:
#
# 1. `h = block.attention_norm(x)`; the projections `block.attention.wq`, `.wk`, `.wv` of `h`, reshaped
#    to `q` `(B, H, T, D)` and `k`, `v` `(B, Hkv, T, D)` (`block.attention.n_heads`, `.n_kv_heads`,
#    `.head_dim`);
# 2. RoPE on `q` and `k` at `positions`: `apply_rope_qk(q, k, cos, sin, positions)` with
#    `cos, sin = model.rope_tables("cpu")`;
# 3. `keys, values, context_lens = cache.update(i, k, v, positions)` gives the layer's whole buffers
#    (`context_lens`, one length per sequence, is not needed here: the mask of step 4 says more, one row
#    per query);
# 4. attention of `q` to them where key position `j` is visible to the query at position `p` when
#    `j <= p`: `attention(q, keys, values, causal=False, mask=visible)` with a boolean `visible` of shape
#    `(B, 1, T, max_seq_len)`. The cache may hold stale entries at later positions (padding, or what an
#    earlier request left): the mask hides them;
# 5. `x = x + block.attention.wo(...)` of the heads put back side by side, then
#    `x = x + block.feed_forward(block.ffn_norm(x))`.
#
# Start from `x = model.tok_embeddings(tokens)` and end with `model.output(model.norm(x))`.

# %% nbgrader={"grade_id": "p3_solution", "solution": true}
def forward_with_cache(model, cache, tokens, positions):
    ### BEGIN SOLUTION
    b, t = tokens.shape
    cos, sin = model.rope_tables("cpu")
    key_pos = torch.arange(cache.max_seq_len)  # (S,)
    visible = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
    x = model.tok_embeddings(tokens)  # (B, T, dim)
    for i, block in enumerate(model.layers):
        att = block.attention
        h = block.attention_norm(x)
        q = att.wq(h).view(b, t, att.n_heads, att.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = att.wk(h).view(b, t, att.n_kv_heads, att.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = att.wv(h).view(b, t, att.n_kv_heads, att.head_dim).transpose(1, 2)
        q, k = apply_rope_qk(q, k, cos, sin, positions)
        keys, values, _ = cache.update(i, k, v, positions)  # (B, Hkv, S, D) each
        out = attention(q, keys, values, causal=False, mask=visible)  # (B, H, T, D)
        x = x + att.wo(out.transpose(1, 2).reshape(b, t, att.n_heads * att.head_dim))
        x = x + block.feed_forward(block.ffn_norm(x))
    return model.output(model.norm(x))  # (B, T, vocab)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p3_visible", "locked": true}
# Visible tests for part 3
model = pretrained("effml-tiny").double()  # float64, so cached and uncached agree to ~1e-12; 6 heads, 6 KV heads
config = model.config
text = torch.randint(0, config.vocab_size, (1, 12))
with torch.no_grad():
    expected = model(text)  # (1, 12, vocab): the whole sequence at once
    cache = StaticKVCache(config.n_layers, 1, 16, config.n_kv_heads, config.head_dim, dtype=torch.float64)
    first = forward_with_cache(model, cache, text[:, :5], torch.arange(5)[None])  # a prompt of 5 tokens
    chunk = forward_with_cache(model, cache, text[:, 5:9], torch.arange(5, 9)[None])  # 4 more in one call
    steps = [forward_with_cache(model, cache, text[:, t:t + 1], torch.tensor([[t]])) for t in range(9, 12)]
assert first.shape == (1, 5, config.vocab_size), f"logits should be (1, 5, {config.vocab_size}), got {tuple(first.shape)}"
assert torch.allclose(first, expected[:, :5], atol=1e-8), "the prompt's logits (positions 0-4) differ from the model's"
assert torch.allclose(chunk, expected[:, 5:9], atol=1e-8), (
    "4 tokens at positions 5-8 after a cached prompt: each must see the prompt and the chunk up to itself")
for t, step in zip(range(9, 12), steps):
    assert torch.allclose(step[:, 0], expected[:, t], atol=1e-8), f"the cached step at position {t} differs from the model's logits"


def small_model(n_kv_heads, seed=0):
    # A random course model with 4 query heads and n_kv_heads KV heads (2: GQA, 1: MQA), in float64
    torch.manual_seed(seed)
    small = Transformer(ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                                    hidden_dim=192, max_seq_len=64)).double().eval()
    with torch.no_grad():
        small.output.weight.mul_(20)  # sharper logits: greedy tokens then vary along a sequence
    return small


# Two sequences at different positions, a GQA and an MQA model, and a cache whose unwritten entries hold garbage
for n_kv_heads in (2, 1):
    small = small_model(n_kv_heads)
    heads = f"4 query heads, {n_kv_heads} KV head{'s' if n_kv_heads > 1 else ''}"
    a, b = torch.randint(0, 97, (4,)), torch.randint(0, 97, (10,))  # sequence 0: 4 tokens, sequence 1: 10
    prompt = torch.zeros(2, 9, dtype=torch.long)  # (B, T): sequence 0's 3 prompt tokens right-padded with 0
    prompt[0, :3], prompt[1] = a[:3], b[:9]
    cache = StaticKVCache(2, 2, 16, n_kv_heads, small.config.head_dim, dtype=torch.float64)  # 2 layers, 2 sequences, 16 positions
    for buffer in cache.k + cache.v:
        buffer.normal_(0, 100)  # stale entries, as an earlier request would leave them: the mask must hide them
    try:
        with torch.no_grad():
            prefill = forward_with_cache(small, cache, prompt, torch.arange(9).expand(2, 9))
            step = forward_with_cache(small, cache, torch.stack([a[3:], b[9:]]), torch.tensor([[3], [9]]))
    except Exception as error:
        raise AssertionError(f"{heads}: forward_with_cache raised {type(error).__name__}: {error}")
    with torch.no_grad():
        alone_a, alone_b = small(a[None])[0], small(b[None])[0]  # (T, vocab): each sequence by itself, no cache
    assert prefill.shape == (2, 9, 97), f"{heads}: logits should be (2, 9, 97), got {tuple(prefill.shape)}"
    assert torch.allclose(prefill[0, :3], alone_a[:3], atol=1e-8) and torch.allclose(prefill[1], alone_b[:9], atol=1e-8), (
        f"{heads}, stale entries in the cache: each prompt token must see its own sequence's positions up to its own only")
    assert torch.allclose(step[0, 0], alone_a[3], atol=1e-8), (
        f"{heads}: sequence 0 at position 3 must see its positions 0-3 only, not the padding written after them")
    assert torch.allclose(step[1, 0], alone_b[9], atol=1e-8), f"{heads}: sequence 1 at position 9 differs from the model's logits"
print("part 3: visible tests passed")


# %% nbgrader={"grade_id": "p3_tests"} graded={"part": "forward"}

# %% [markdown] nbgrader={"grade_id": "p4_intro", "locked": true}
# ## Part 4 · Cached greedy decoding of a batch (3 points)
#
# `generate_greedy(model, prompts, max_new_tokens)` takes `prompts`, a list of `B` lists of token ids
# (each at least one token; **lengths may differ**), and returns a list of `B` lists: each prompt's next
# `max_new_tokens` tokens, chosen greedily (argmax). The tokens must be exactly those that
# `uncached_greedy(model, prompt, max_new_tokens)` gives for each prompt alone.
#
# Do it the way a server would, one cache for the whole batch:
#
# 1. a `StaticKVCache` of your part 2 with `max_seq_len = longest prompt + max_new_tokens`, in the model's dtype;
# 2. **prefill** every prompt in one call of `forward_with_cache`: right-pad the prompts to the longest with
#    any token id (0, say), positions `0 … L-1` in every row. Sequence `b`'s first new token is the argmax
#    of the logits at its **last real token**, index `len(prompts[b]) - 1`, not at the end of the padding;
# 3. **decode**: feed each sequence's latest token at its own position (`len(prompts[b]) + step`), one
#    token per sequence per call.
#
# Why the padding is harmless: a short prompt's padding is written to positions past its end, but its
# first decode step overwrites the first of them before anyone attends to it, and the mask hides the
# ones after. Use `torch.no_grad()`.

# %% nbgrader={"grade_id": "p4_solution", "solution": true}
def generate_greedy(model, prompts, max_new_tokens):
    ### BEGIN SOLUTION
    config, dtype = model.config, model.tok_embeddings.weight.dtype
    lengths = torch.tensor([len(p) for p in prompts])  # (B,)
    longest = int(lengths.max())
    batch = len(prompts)
    cache = StaticKVCache(config.n_layers, batch, longest + max_new_tokens, config.n_kv_heads, config.head_dim, dtype=dtype)
    tokens = torch.zeros(batch, longest, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        tokens[b, : len(prompt)] = torch.tensor(prompt)
    new_tokens = []
    with torch.no_grad():
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        logits = forward_with_cache(model, cache, tokens, torch.arange(longest).expand(batch, longest))
        nxt = logits[torch.arange(batch), lengths - 1].argmax(-1)  # (B,): at each prompt's last real token
        new_tokens.append(nxt)
        for step in range(1, max_new_tokens):
            positions = (lengths + step - 1)[:, None]  # (B, 1): where each sequence's latest token goes
            logits = forward_with_cache(model, cache, nxt[:, None], positions)
            nxt = logits[:, -1].argmax(-1)
            new_tokens.append(nxt)
    return torch.stack(new_tokens, dim=1).tolist()
    ### END SOLUTION


# %% nbgrader={"grade_id": "p4_visible", "locked": true}
# Visible tests for part 4
def check_generate(model, prompts, max_new_tokens, what):
    try:
        got = generate_greedy(model, prompts, max_new_tokens)
    except Exception as error:
        raise AssertionError(f"{what}: generate_greedy raised {type(error).__name__}: {error}")
    assert isinstance(got, list) and len(got) == len(prompts) and all(
        isinstance(g, list) and len(g) == max_new_tokens for g in got), (
        f"{what}: expected {len(prompts)} lists of {max_new_tokens} new tokens, got {got!r:.200}")
    for b, prompt in enumerate(prompts):
        expected = uncached_greedy(model, prompt, max_new_tokens)
        assert got[b] == expected, f"{what}: prompt {b} (length {len(prompt)}): cached {got[b]} but uncached {expected}"


prompts = [[5, 17, 99, 3, 12, 40, 8], [260, 14], [7, 7, 7, 7], [42]]  # different lengths, one of a single token
check_generate(model, prompts, 6, "effml-tiny (float64), prompts of lengths 7, 2, 4 and 1")
check_generate(model, [[5, 17, 99], [260, 14, 3, 3, 9]], 1, "max_new_tokens=1 (the one new token comes from the prefill)")
check_generate(model, [[1, 2, 3, 4, 5, 6, 7, 8]], 5, "a batch of one prompt")
check_generate(pretrained("effml-tiny"), [[5, 17, 99, 3], [260, 14]], 5,
               "effml-tiny in float32 (the cache takes the model's dtype)")
for n_kv_heads in (2, 1):
    check_generate(small_model(n_kv_heads, seed=n_kv_heads), [[3, 1, 4, 1, 5, 9, 2, 6, 5], [35, 89], [79]], 7,
                   f"a random model with 4 query heads and {n_kv_heads} KV head{'s' if n_kv_heads > 1 else ''}")
print("part 4: visible tests passed")

# %% nbgrader={"grade_id": "p4_tests"} graded={"part": "generate"}

# %% [markdown] nbgrader={"grade_id": "p5_intro", "locked": true}
# ## Part 5 · What the cache buys (2 points)
#
# Nothing new to write: this part times your `generate_greedy` against `uncached_greedy`. Without a
# cache, the model recomputes keys and values for the whole prefix at every step, so each new token costs
# work proportional to the context; with a cache, a step processes one token per sequence and reads the
# cached keys and values.
#
# **The rule:** on the grading machine (its CPU, one thread), with a small model (4 layers, dim 256, 4
# query and 2 KV heads, float32), a batch of one prompt and 16 new tokens, your `generate_greedy` must give
# the uncached tokens and take **at most half** the time of `uncached_greedy` with a 384-token prompt.
# The cell below makes the same comparison on your machine and plots it.

# %% nbgrader={"grade_id": "p5_visible", "locked": true}
# Your cached decoding against recomputation on this machine (not graded)
import pandas as pd

from effml_lib.measure import benchmark
from effml_lib.plots import latency_vs_size

small = Transformer(ModelConfig(vocab_size=512, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=768, max_seq_len=512)).eval()
rows = []
for prompt_len in (64, 128, 256, 384):
    prompt = torch.randint(0, 512, (prompt_len,)).tolist()
    for name, fn in (("your generate_greedy (cached)", lambda: generate_greedy(small, [prompt], 16)),
                     ("uncached_greedy", lambda: uncached_greedy(small, prompt, 16))):
        t = benchmark(fn, warmup=1, reps=3)
        rows.append({"prompt_len": prompt_len, "implementation": name, **t.to_dict()})
timings = pd.DataFrame(rows)
latency_vs_size(timings, "prompt_len", hue="implementation", xlabel="prompt length (tokens)",
                title="16 new tokens, greedy, batch 1: time per generation")
at_384 = timings[timings.prompt_len == 384].set_index("implementation").median_ms
print(f"with a 384-token prompt yours takes {at_384.iloc[0] / at_384.iloc[1]:.2f}× the uncached time (graded: at most 0.5×)")

# %% [markdown] nbgrader={"grade_id": "p5_plot_note", "locked": true}
# The plot shows the median time to generate 16 tokens at each prompt length, on log–log axes. The
# uncached line climbs with the prompt, since every step reprocesses it; the cached line stays far below
# it and rises slowly, since only the prefill (once) and the attention over the cache grow with the prompt.

# %% nbgrader={"grade_id": "p5_tests"} graded={"part": "performance"}
