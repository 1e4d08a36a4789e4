"""Lab 02, part 3: interleaved_to_half_split(weight, n_heads)."""

import pytest
import torch


def reference(weight, n_heads):
    """Within each head, new row j < D/2 is old row 2j and new row D/2 + j is old row 2j + 1."""
    head_dim = weight.shape[0] // n_heads
    order = torch.tensor([h * head_dim + 2 * j + parity for h in range(n_heads)
                          for parity in (0, 1) for j in range(head_dim // 2)])
    return weight[order]


@pytest.mark.parametrize("n_heads,head_dim,in_features", [(2, 4, 3), (6, 64, 384), (1, 2, 5), (3, 8, 1)])
def test_rows_reordered_per_head(student, gen, n_heads, head_dim, in_features):
    weight = torch.randn(n_heads * head_dim, in_features, generator=gen)
    out = student.interleaved_to_half_split(weight, n_heads)
    assert isinstance(out, torch.Tensor) and out.shape == weight.shape, f"shape should stay {tuple(weight.shape)}"
    assert torch.equal(out, reference(weight, n_heads)), (
        f"wrong row order for {n_heads} heads of head_dim {head_dim}: reorder within each head, not across heads")


def test_bias(student, gen):
    bias = torch.randn(4 * 8, generator=gen)
    out = student.interleaved_to_half_split(bias, 4)
    assert isinstance(out, torch.Tensor) and out.shape == bias.shape, "a bias (1-D) keeps its shape"
    assert torch.equal(out, reference(bias, 4)), "a bias's entries are reordered like a weight's rows"


def test_scores_unchanged_with_grouped_heads(student, gen, exact):
    """Query heads and (fewer) key heads, each converted with its own head count: equal scores."""
    t, dim, head_dim, n_heads, n_kv_heads = 6, 32, 8, 4, 2
    x = torch.randn(t, dim, generator=gen, dtype=torch.float64)
    wq = torch.randn(n_heads * head_dim, dim, generator=gen, dtype=torch.float64)
    wk = torch.randn(n_kv_heads * head_dim, dim, generator=gen, dtype=torch.float64)
    positions = torch.tensor([0, 5, 6, 7, 30, 31])

    def scores(wq, wk, interleaved):
        q = (x @ wq.T).view(1, t, n_heads, head_dim).transpose(1, 2)
        k = (x @ wk.T).view(1, t, n_kv_heads, head_dim).transpose(1, 2)
        q, k = exact(q, positions, interleaved=interleaved), exact(k, positions, interleaved=interleaved)
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        return q @ k.transpose(-2, -1)

    converted = scores(student.interleaved_to_half_split(wq, n_heads),
                       student.interleaved_to_half_split(wk, n_kv_heads), interleaved=False)
    assert torch.allclose(converted, scores(wq, wk, interleaved=True), atol=1e-9), (
        "with the converted projections and half-split RoPE, every attention score must equal the original's")
