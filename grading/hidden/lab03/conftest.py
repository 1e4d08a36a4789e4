"""Shared pieces of lab 03's hidden tests. Every assertion carries a message: with --assert=plain
(how grading/trusted.py runs these files) the message is all a student sees. The fixtures
student, gen, close, value_error, timing and form come from grading/trusted.py, shared by every lab."""

import pytest
import torch

from effml_lib.model import ModelConfig, Transformer


def _small_model(n_heads=4, n_kv_heads=2, dim=64, n_layers=2, vocab_size=97, max_seq_len=256, seed=0,
                 dtype=torch.float64):
    """A random course Transformer; float64 by default, so cached and uncached logits agree to ~1e-13
    and no argmax can flip between them."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         hidden_dim=3 * dim, max_seq_len=max_seq_len)
    model = Transformer(config).to(dtype).eval()
    with torch.no_grad():  # larger logits than the default init: greedy tokens then vary along a sequence
        model.output.weight.mul_(20)
    return model


@pytest.fixture
def small_model():
    """``small_model(n_heads=4, n_kv_heads=2, ..., dtype=torch.float64)``."""
    return _small_model


class ReferenceCache:
    """A correct cache with the lab's StaticKVCache interface (update returns keys, values and
    context_lens, as the library's does), so part 3's tests do not depend on part 2."""

    def __init__(self, n_layers, batch_size, max_seq_len, n_kv_heads, head_dim, dtype=torch.float32):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        # Unwritten entries hold large garbage, not zeros: attending to one by mistake shows in the output.
        garbage = torch.Generator().manual_seed(7)
        self.k = [100 * torch.randn(shape, generator=garbage, dtype=dtype) for _ in range(n_layers)]
        self.v = [100 * torch.randn(shape, generator=garbage, dtype=dtype) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len

    def update(self, layer, k_new, v_new, positions):
        for b in range(k_new.shape[0]):
            for t in range(k_new.shape[2]):
                self.k[layer][b, :, positions[b, t]] = k_new[b, :, t]
                self.v[layer][b, :, positions[b, t]] = v_new[b, :, t]
        return self.k[layer], self.v[layer], (positions[:, -1] + 1).to(torch.int32)


@pytest.fixture
def reference_cache():
    return ReferenceCache


def _uncached_greedy(model, prompt, max_new_tokens):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.fixture
def uncached_greedy():
    """``uncached_greedy(model, prompt, max_new_tokens)``: the tokens every cached decoder must match."""
    return _uncached_greedy


