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
per_token = kv_cache_bytes(1, 1, llama2["n_layers"], llama2["n_kv_heads"], llama2["dim"] // llama2["n_heads"])
assert per_token == 512 * 2**10, f"Llama-2-7B stores 512 KiB per token in bf16 (2 x 32 layers x 32 heads x 128 x 2 bytes), got {per_token}"
assert isinstance(per_token, int), f"return an int, got {type(per_token).__name__}"
assert kv_cache_bytes(16, 4096, 80, 64, 128) == 160 * 2**30, "Llama-2-70B as MHA, batch 16 x 4096: 160 GiB"
assert kv_cache_bytes(2, 10, 3, 4, 8, bytes_per_elem=1) == 3840, "fp8: one byte per element"
assert isinstance(sequences_that_fit, int) and 100 < sequences_that_fit < 200, (
    f"sequences_that_fit should be an int between 100 and 200, got {sequences_that_fit!r}")
print("part 1: visible tests passed")


# %% nbgrader={"grade_id": "p1_tests"} graded={"part": "bytes"}

# %% [markdown] nbgrader={"grade_id": "p2_intro", "locked": true}
# ## Part 2 · A cache for a batch of different lengths (3 points)
#
# `KVCache` preallocates, for each layer, a K and a V buffer of shape `(B, Hkv, max_seq_len, D)`. Write
# its `update(layer, k_new, v_new, positions)`:
#
# * `k_new` and `v_new` have shape `(B, Hkv, T, D)`: `T` new tokens for each of the `B` sequences;
# * `positions` is an integer tensor of shape `(B, T)`: token `t` of sequence `b` goes to position
#   `positions[b, t]` of **that** sequence's buffer. Sequences may be at different lengths: in one decode
#   step sequence 0 may write position 7 while sequence 1 writes position 30;
# * it writes in place and returns the layer's **whole** buffers `(k, v)`, each `(B, Hkv, max_seq_len, D)`:
#   the caller masks what is not meant to be seen;
# * bad input gets a clear error: a `ValueError` whose message names `positions` when a position lies
#   outside `[0, max_seq_len)` (a cache overflow), and one naming `k_new` when `k_new` or `v_new` does not
#   have the shape `(B, Hkv, T, D)` of this cache with `T` matching `positions`.
#
# Write it without a Python loop over tokens: one indexed assignment can place every token at once.

# %% nbgrader={"grade_id": "p2_solution", "solution": true}
class KVCache:
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
        if positions.shape != (b, t):
            raise ValueError(f"positions must have shape ({b}, T), got {tuple(positions.shape)}")
        for name, new in (("k_new", k_new), ("v_new", v_new)):
            if new.shape != (b, h_kv, t, d):
                raise ValueError(f"{name} must have shape {(b, h_kv, t, d)}, got {tuple(new.shape)}")
        if t and (positions.min() < 0 or positions.max() >= self.max_seq_len):
            raise ValueError(f"positions must lie in [0, {self.max_seq_len}): the cache would overflow, "
                             f"got {positions.min().item()} to {positions.max().item()}")
        rows = torch.arange(b)[:, None]  # (B, 1), broadcast against positions (B, T)
        # Indexing dims 0 and 2 with (B, T) index tensors selects a (B, T, Hkv, D) block.
        k_layer[rows, :, positions] = k_new.transpose(1, 2).to(k_layer.dtype)
        v_layer[rows, :, positions] = v_new.transpose(1, 2).to(v_layer.dtype)
        return k_layer, v_layer
        ### END SOLUTION


# %% nbgrader={"grade_id": "p2_visible", "locked": true}
# Visible tests for part 2
cache = KVCache(n_layers=2, batch_size=2, max_seq_len=8, n_kv_heads=1, head_dim=3)
k_new = torch.arange(12.0).view(2, 1, 2, 3)  # two tokens for each of two sequences
k, v = cache.update(1, k_new, -k_new, torch.tensor([[0, 1], [5, 6]]))
assert k.shape == (2, 1, 8, 3), f"update returns the whole buffer (2, 1, 8, 3), got {tuple(k.shape)}"
assert torch.equal(cache.k[1][0, 0, :2], k_new[0, 0]), "sequence 0's tokens belong at its positions 0 and 1"
assert torch.equal(cache.k[1][1, 0, 5:7], k_new[1, 0]), "sequence 1's tokens belong at its positions 5 and 6"
assert cache.k[1][1, 0, :5].abs().sum() == 0, "sequence 1's positions 0-4 were not written"
assert torch.equal(cache.v[1][1, 0, 5:7], -k_new[1, 0]), "values go to the V buffer at the same positions"
assert cache.k[0].abs().sum() == 0, "layer 0 must stay untouched"
try:
    cache.update(0, k_new, k_new, torch.tensor([[7, 8], [0, 1]]))
    raise AssertionError("position 8 of a cache of 8 must raise a ValueError naming positions")
except ValueError as error:
    assert "positions" in str(error), f"the overflow error should name positions: {error}"
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
# 3. `cache.update(i, k, v, positions)` gives the layer's whole buffers;
# 4. attention of `q` to them where key position `j` is visible to the query at position `p` when
#    `j <= p`: `attention(q, k_all, v_all, causal=False, mask=visible)` with a boolean `visible` of shape
#    `(B, 1, T, max_seq_len)`. The cache may hold stale entries at later positions: the mask hides them;
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
        k_all, v_all = cache.update(i, k, v, positions)  # (B, Hkv, S, D)
        out = attention(q, k_all, v_all, causal=False, mask=visible)  # (B, H, T, D)
        x = x + att.wo(out.transpose(1, 2).reshape(b, t, att.n_heads * att.head_dim))
        x = x + block.feed_forward(block.ffn_norm(x))
    return model.output(model.norm(x))  # (B, T, vocab)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p3_visible", "locked": true}
# Visible tests for part 3
model = pretrained("effml-tiny").double()  # float64, so cached and uncached agree to ~1e-12
config = model.config
text = torch.randint(0, config.vocab_size, (1, 12))
with torch.no_grad():
    expected = model(text)  # (1, 12, vocab): the whole sequence at once
    cache = KVCache(config.n_layers, 1, 16, config.n_kv_heads, config.head_dim, dtype=torch.float64)
    first = forward_with_cache(model, cache, text[:, :9], torch.arange(9)[None])  # a prompt of 9 tokens
    steps = [forward_with_cache(model, cache, text[:, t:t + 1], torch.tensor([[t]])) for t in range(9, 12)]
assert first.shape == (1, 9, config.vocab_size), f"logits should be (1, 9, {config.vocab_size}), got {tuple(first.shape)}"
assert torch.allclose(first, expected[:, :9], atol=1e-8), "the prompt's logits differ from the model's"
for t, step in zip(range(9, 12), steps):
    assert torch.allclose(step[:, 0], expected[:, t], atol=1e-8), f"the cached step at position {t} differs from the model's logits"
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
# 1. a `KVCache` of your part 2 with `max_seq_len = longest prompt + max_new_tokens`, in the model's dtype;
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
    cache = KVCache(config.n_layers, batch, longest + max_new_tokens, config.n_kv_heads, config.head_dim, dtype=dtype)
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
prompts = [[5, 17, 99, 3, 12, 40, 8], [260, 14], [7, 7, 7, 7]]  # different lengths
got = generate_greedy(model, prompts, 6)
assert isinstance(got, list) and len(got) == 3 and all(len(g) == 6 for g in got), (
    f"expected 3 lists of 6 new tokens, got {got!r:.200}")
for b, prompt in enumerate(prompts):
    expected = uncached_greedy(model, prompt, 6)
    assert got[b] == expected, f"prompt {b} (length {len(prompt)}): cached {got[b]} but uncached {expected}"
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
