"""Lab 01, part 4: decoder_block(x, block, rope_cos, rope_sin, lengths=None) with effml-tiny's weights
reproduces the model, for one sequence per row and for a left-padded batch."""

import pytest
import torch


@pytest.fixture(scope="module")
def model():
    from effml_lib.checkpoints import pretrained

    return pretrained("effml-tiny")


def run_model_with(student_block, model, tokens, lengths=None):
    cos, sin = model.rope_tables("cpu")
    x = model.tok_embeddings(tokens)  # (B, T, dim)
    for block in model.layers:
        x = student_block(x, block, cos, sin, lengths)
    return model.output(model.norm(x))  # (B, T, vocab)


def test_one_block_matches(student, gen, close, model):
    x = torch.randn(2, 12, model.config.dim, generator=gen)
    cos, sin = model.rope_tables("cpu")
    with torch.no_grad():
        expected = model.layers[0](x, cos[:12], sin[:12])
        out = student.decoder_block(x, model.layers[0], cos, sin)
    assert close(out, expected, 1e-4, 1e-4), "lengths=None, x of shape (2, 12, 384): block 0 of effml-tiny gives a different output"


def test_whole_model_logits(student, gen, close, model):
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=gen)
    with torch.no_grad():
        expected = model(tokens)
        got = run_model_with(student.decoder_block, model, tokens)
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    assert diff <= 1e-3, f"one sequence of 40 tokens: effml-tiny's logits with your block differ by up to {diff:.2e} (allowed 1e-3)"


@pytest.mark.parametrize("lengths", [(20, 7, 13), (5, 5), (1, 12)])
def test_left_padded_batch(student, gen, close, model, lengths):
    t = max(lengths)
    sequences = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    noise = torch.randint(0, model.config.vocab_size, (len(lengths), t), generator=gen)  # padding: any token
    batch = torch.stack([torch.cat((noise[b, : t - n], seq)) for b, (n, seq) in enumerate(zip(lengths, sequences))])
    with torch.no_grad():
        got = run_model_with(student.decoder_block, model, batch, torch.tensor(lengths))
    assert tuple(got.shape) == (len(lengths), t, model.config.vocab_size) and torch.isfinite(got).all(), (
        f"a left-padded batch of lengths {lengths}: expected finite logits of shape "
        f"{(len(lengths), t, model.config.vocab_size)}; padding rows must stay finite")
    for b, seq in enumerate(sequences):
        with torch.no_grad():
            alone = model(seq[None])[0]  # (n, vocab)
        diff = (got[b, t - len(seq):] - alone).abs().max().item()
        assert diff <= 1e-3, (
            f"a left-padded batch of lengths {lengths}: row {b}'s {len(seq)} real tokens give logits that differ from "
            f"the sequence run alone by up to {diff:.2e} (allowed 1e-3): no query may attend to a padding key, and "
            f"its real tokens take RoPE positions 0, 1, ... as if alone")
