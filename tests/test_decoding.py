import pytest
import torch

from effml_lib.decoding import generate, sample_next
from test_model import small_model


def naive_greedy(model, prompt, n):
    """Independent reference: full forward over the whole sequence for every new token."""
    seq = prompt.clone()
    for _ in range(n):
        with torch.no_grad():
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_greedy_with_cache_equals_naive_loop(n_kv_heads, gen):
    model = small_model(n_kv_heads=n_kv_heads)
    prompt = torch.randint(0, 97, (3, 6), generator=gen)
    assert torch.equal(generate(model, prompt, 25), naive_greedy(model, prompt, 25))
    assert torch.equal(generate(model, prompt, 25, use_cache=False), naive_greedy(model, prompt, 25))


RAGGED = [[5, 17, 90, 3, 12, 40, 8], [60, 14], [7, 7, 7, 7], [33]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_batch_greedy_equals_each_prompt_alone(use_cache):
    model = small_model(n_kv_heads=2)
    got = generate(model, RAGGED, 12, use_cache=use_cache)
    assert isinstance(got, list) and len(got) == len(RAGGED), "a list of prompts gives a list of sequences"
    for prompt, seq in zip(RAGGED, got):
        alone = naive_greedy(model, torch.tensor([prompt]), 12)[0]
        assert torch.equal(seq, alone), f"prompt of length {len(prompt)}: batched {seq.tolist()} != alone {alone.tolist()}"


def test_ragged_batch_sampling_is_seeded_and_each_sequence_ends_at_its_eos():
    model = small_model()
    a = generate(model, RAGGED, 10, temperature=1.0, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, generate(model, RAGGED, 10, temperature=1.0, seed=3)))
    greedy = generate(model, RAGGED, 10)
    eos = int(greedy[1][len(RAGGED[1]) + 2])  # sequence 1's third new token
    out = generate(model, RAGGED, 10, eos_id=eos)
    for prompt, full, ended in zip(RAGGED, greedy, out):
        new = full[len(prompt):].tolist()
        if eos in new:  # stops at its first eos, padded with it afterwards
            first = new.index(eos)
            assert ended[len(prompt):len(prompt) + first + 1].tolist() == new[: first + 1]
            assert (ended[len(prompt) + first:] == eos).all()
        else:
            assert ended.tolist()[: len(full)] == full.tolist()[: len(ended)]


@pytest.mark.slow
def test_compiled_decode_equals_eager():
    """torch.compile of the decode step (CUDA graphs on a GPU) gives the eager tokens, ragged batch included."""
    model = small_model()
    compiled = generate(model, RAGGED, 8, compile=True)
    assert all(torch.equal(c, e) for c, e in zip(compiled, generate(model, RAGGED, 8)))


def test_seeded_sampling_is_reproducible_and_varies_with_seed(gen):
    model = small_model()
    prompt = [1, 2, 3]
    a = generate(model, prompt, 30, temperature=1.0, seed=7)
    assert torch.equal(a, generate(model, prompt, 30, temperature=1.0, seed=7))
    assert not torch.equal(a, generate(model, prompt, 30, temperature=1.0, seed=8))


def test_top_k_and_top_p_restrict_the_support(gen):
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    probs = torch.softmax(logits[0], 0)  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps exactly tokens 0 and 1
    assert probs[0] < 0.8 < probs[0] + probs[1]
    drawn = sample_next(logits, 1.0, top_p=0.8, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    frac0 = (drawn == 0).float().mean().item()
    assert abs(frac0 - probs[0] / (probs[0] + probs[1])) < 0.04, "kept tokens must be renormalised"


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 0]


def test_eos_stops_and_pads(gen):
    model = small_model()
    prompt = torch.randint(0, 97, (1, 4), generator=gen)
    greedy = generate(model, prompt, 10)
    eos = int(greedy[0, 6])  # the third generated token
    out = generate(model, prompt, 10, eos_id=eos)
    assert out.shape[1] == 7 and out[0, -1] == eos


def test_bad_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [1, 2], 47)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [1, 500], 2)
    with pytest.raises(TypeError, match="prompt"):
        generate(model, "hello", 2)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 3), -1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 3), 1.0, top_p=1.5)



def test_finished_rows_are_padded_while_others_continue():
    model = small_model()
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(0))
    greedy = generate(model, prompt, 10)
    eos = int(greedy[0, 5])  # row 0's second generated token
    assert eos not in greedy[1, 4:].tolist(), "pick a prompt where row 1 never emits the token"
    out = generate(model, prompt, 10, eos_id=eos)
    assert out.shape == greedy.shape, "row 1 is unfinished, so generation runs to the end"
    assert (out[0, 5:] == eos).all(), "row 0 is padded with eos after emitting it"
    assert torch.equal(out[1], greedy[1]), "row 1 continues as without eos"


def test_sampling_argument_errors():
    model = small_model()
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, [1.7, 2.9], 2)
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, [[1, 2], [3.5]], 2)
    with pytest.raises(ValueError, match="T >= 1"):
        generate(model, [[1, 2], []], 2)
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, [1, 2], 2, eos_id=999)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1, 2], 2, temperature="0.5")
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1, 2], 2, top_k=0)
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, [1, 2], 2, use_cache=False, compile=True)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample_next(torch.zeros(5), 1.0)
