"""The shipped course models: they load, they are the sizes promised, and they have learned the corpus."""

import math

import pytest
import torch

from effml_lib import data
from effml_lib.checkpoints import CHECKPOINTS_DIR, PRETRAINED, pretrained, pretrained_info
from effml_lib.decoding import generate
from effml_lib.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def models():
    return {name: pretrained(name) for name in PRETRAINED}


def test_sizes(models):
    tiny, draft = models["effml-tiny"].num_parameters(), models["effml-tiny-draft"].num_parameters()
    assert 10e6 <= tiny <= 20e6, tiny
    assert draft <= tiny / 4, (draft, tiny)
    assert models["effml-tiny"].config.n_kv_heads == models["effml-tiny"].config.n_heads, "effml-tiny must be MHA"
    on_disk = sum(f.stat().st_size for f in CHECKPOINTS_DIR.rglob("*.safetensors"))
    assert on_disk <= 48e6, f"shipped weights are {on_disk / 1e6:.1f} MB > 48 MB"


def test_same_tokenizer(models):
    tok = load_tokenizer()
    for name, model in models.items():
        assert model.config.vocab_size == tok.vocab_size
        assert pretrained_info(name)["training"]["tokenizer"] == tok.name


def unigram_perplexity(train_tokens, eval_tokens, vocab_size):
    """An independent baseline: each token's frequency in the training split (add-one smoothed)."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[eval_tokens].mean().item())


def test_models_beat_a_unigram_baseline_by_far(models):
    heldout = data.load_tokens("heldout", progress=False)[:8193]
    train = data.load_tokens("train", progress=False)
    baseline = unigram_perplexity(train, heldout[1:], 4096)
    for name, model in models.items():
        with torch.no_grad():
            x, y = heldout[:-1].view(8, 1024), heldout[1:].view(8, 1024)
            loss = torch.nn.functional.cross_entropy(model(x[:, :512]).flatten(0, 1), y[:, :512].flatten())
        ppl = loss.exp().item()
        assert ppl < baseline / 10, f"{name}: held-out perplexity {ppl:.1f} vs unigram {baseline:.1f}"


def test_greedy_generation_looks_like_python(models):
    tok = load_tokenizer()
    prompt = tok.encode("class Stack:\n    def")
    for name, model in models.items():
        out = generate(model, prompt, 40)
        assert torch.equal(out, generate(model, prompt, 40, use_cache=False)), f"{name}: cached decode differs"
        text = tok.decode(out[0].tolist())
        assert text.startswith("class Stack:\n    def")
        continuation = text[len("class Stack:\n    def"):]
        assert "self" in continuation and "(" in continuation, f"{name} wrote {text!r}"


def test_unknown_name():
    with pytest.raises(ValueError, match="effml-tiny"):
        pretrained("gpt-5")
