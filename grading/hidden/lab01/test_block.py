"""Lab 01, part 4: decoder_block(x, block, rope_cos, rope_sin) with effml-tiny's weights reproduces the model."""

import torch



def run_model_with(student_block, model, tokens):
    cos, sin = model.rope_tables("cpu")
    t = tokens.shape[1]
    x = model.tok_embeddings(tokens)
    for block in model.layers:
        x = student_block(x, block, cos[:t], sin[:t])
    return model.output(model.norm(x))


def test_one_block_matches(student, gen, close):
    from effml_lib.checkpoints import pretrained

    model = pretrained("effml-tiny")
    x = torch.randn(2, 12, model.config.dim, generator=gen)
    cos, sin = model.rope_tables("cpu")
    with torch.no_grad():
        expected = model.layers[0](x, cos[:12], sin[:12])
        out = student.decoder_block(x, model.layers[0], cos[:12], sin[:12])
    assert close(out, expected, 1e-4, 1e-4), "block 0 of effml-tiny gives a different output"


def test_whole_model_logits(student, gen, close):
    from effml_lib.checkpoints import pretrained

    model = pretrained("effml-tiny")
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=gen)
    with torch.no_grad():
        expected = model(tokens)
        got = run_model_with(student.decoder_block, model, tokens)
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    assert diff <= 1e-3, f"effml-tiny's logits with your block differ by up to {diff:.2e} (allowed 1e-3)"
