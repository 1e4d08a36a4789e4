"""Lab 02, part 4: score_by_distance(q, k, cos, sin) and the peak_distance it answers."""

import pytest
import torch

from effml_lib.rope import apply_rope, rope_frequencies
from trusted import describe


def brute_force(q, k, distance, base, exact):
    """Score of q at position base + distance against k at position base, by the definition."""
    qm = exact(q.view(1, 1, 1, -1), torch.tensor([base + distance]))
    kn = exact(k.view(1, 1, 1, -1), torch.tensor([base]))
    return (qm * kn).sum().item()


@pytest.mark.parametrize("head_dim", [8, 32, 64])
def test_scores_equal_the_definition_at_any_base_position(student, gen, exact, head_dim):
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    cos, sin = rope_frequencies(head_dim, 300)
    s = student.score_by_distance(q, k, cos, sin)
    assert isinstance(s, torch.Tensor) and s.shape == (300,), (
        f"score_by_distance should return one score per distance, shape (P,) = (cos.shape[0],), got {describe(s)}")
    assert s.dtype == torch.float32, f"scores should be float32, got {s.dtype}"
    for distance, base in [(0, 0), (1, 50), (37, 0), (150, 149), (299, 0)]:
        expected = brute_force(q, k, distance, base, exact)
        assert abs(s[distance].item() - expected) <= 1e-4 * (1 + abs(expected)), (
            f"wrong scores for q and k of shape ({head_dim},): s[d] should be the score of q at position n + d "
            f"against k at position n, for every distance d and any n; half-split pairing")


def test_low_precision_inputs(student, gen, exact):
    q, k = torch.randn(16, generator=gen).bfloat16(), torch.randn(16, generator=gen).bfloat16()
    cos, sin = rope_frequencies(16, 64)
    s = student.score_by_distance(q, k, cos, sin)
    assert isinstance(s, torch.Tensor) and s.shape == (64,), (
        f"bfloat16 q and k: one score per distance, shape (P,) = (cos.shape[0],), got {describe(s)}")
    assert s.dtype == torch.float32, f"bfloat16 q and k: the scores should still be float32, got {s.dtype}"
    expected = torch.tensor([brute_force(q.float(), k.float(), d, 0, exact) for d in range(64)])
    assert torch.allclose(s.double(), expected.double(), atol=0.1, rtol=0.05), (
        "wrong scores for bfloat16 q and k: s[d] should be the score of q at n + d against k at n "
        "(computed in float32)")


def test_peak_distance(student):
    from effml_lib.checkpoints import pretrained
    from effml_lib.tokenizer import load_tokenizer

    answer = getattr(student, "peak_distance", None)
    assert isinstance(answer, int) and not isinstance(answer, bool), (
        f"peak_distance should be an int computed with score_by_distance, got {describe(answer)}")
    model, tokenizer = pretrained("effml-tiny"), load_tokenizer()
    layer0, head, head_dim = model.layers[0], 1, 64
    with torch.no_grad():
        def vector(projection, token):
            h = layer0.attention_norm(model.tok_embeddings.weight[tokenizer.encode(token)[0]])
            return projection.weight @ h

        q = vector(layer0.attention.wq, ")")[head * head_dim:(head + 1) * head_dim]
        k = vector(layer0.attention.wk, "(")[head * head_dim:(head + 1) * head_dim]
        cos, sin = rope_frequencies(head_dim, 512)
        scores = apply_rope(q.expand(1, 1, 512, head_dim), cos, sin)[0, 0] @ k
    assert answer == int(scores.argmax()), (
        "peak_distance is not where layer 0, head 1 scores ')' against '(' highest (distances 0..511)")
