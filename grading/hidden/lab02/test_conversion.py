"""Lab 02, part 3: permute_qk_weight(weight, n_heads, to="half_split"), the library's name and arguments."""

import pytest
import torch

DIRECTIONS = ["half_split", "interleaved"]

# What each direction does within one head of head_dim D, in the words a failure shows.
RULE = {
    "half_split": "new row j < D/2 of a head is its old row 2j, new row D/2 + j its old row 2j + 1",
    "interleaved": "new row 2j of a head is its old row j, new row 2j + 1 its old row D/2 + j",
}


def reference(weight, n_heads, to):
    """Within each head: to="half_split" puts the interleaved pairs (2j, 2j+1) at (j, D/2 + j);
    to="interleaved" puts the half-split pairs (j, D/2 + j) at (2j, 2j+1)."""
    head_dim = weight.shape[0] // n_heads
    if to == "half_split":
        within = [2 * j + parity for parity in (0, 1) for j in range(head_dim // 2)]
    else:
        within = [half * head_dim // 2 + j for j in range(head_dim // 2) for half in (0, 1)]
    return weight[torch.tensor([h * head_dim + r for h in range(n_heads) for r in within])]


@pytest.mark.parametrize("to", DIRECTIONS)
@pytest.mark.parametrize("n_heads,head_dim,in_features", [(2, 4, 3), (6, 64, 384), (1, 2, 5), (3, 8, 1)])
def test_rows_reordered_per_head(student, gen, to, n_heads, head_dim, in_features):
    weight = torch.randn(n_heads * head_dim, in_features, generator=gen)
    out = student.permute_qk_weight(weight, n_heads, to=to)
    shape = tuple(weight.shape)
    assert isinstance(out, torch.Tensor) and out.shape == weight.shape, (
        f"to={to!r}: a weight of shape {shape} ({n_heads} heads of head_dim {head_dim}) keeps its shape")
    assert torch.equal(out, reference(weight, n_heads, to)), (
        f"wrong row order for to={to!r}, a weight of shape {shape} ({n_heads} heads of head_dim {head_dim}): "
        f"{RULE[to]}, within each head, not across heads")


def test_to_defaults_to_half_split(student, gen):
    weight = torch.randn(4 * 8, 6, generator=gen)
    out = student.permute_qk_weight(weight, 4)
    assert isinstance(out, torch.Tensor) and torch.equal(out, reference(weight, 4, "half_split")), (
        "permute_qk_weight(weight, n_heads) without `to` should do to='half_split', the library's default")


@pytest.mark.parametrize("to", DIRECTIONS)
def test_bias(student, gen, to):
    bias = torch.randn(4 * 8, generator=gen)
    out = student.permute_qk_weight(bias, 4, to=to)
    assert isinstance(out, torch.Tensor) and out.shape == bias.shape, (
        f"to={to!r}: a bias of shape (n_heads * D,) keeps its shape")
    assert torch.equal(out, reference(bias, 4, to)), (
        f"to={to!r}: a bias's entries are reordered like a weight's rows ({RULE[to]})")


@pytest.mark.parametrize("first,second", [("interleaved", "half_split"), ("half_split", "interleaved")])
def test_the_two_directions_undo_each_other(student, gen, first, second):
    weight = torch.randn(3 * 16, 7, generator=gen)
    there = student.permute_qk_weight(weight, 3, to=first)
    back = student.permute_qk_weight(there, 3, to=second)
    assert isinstance(back, torch.Tensor) and torch.equal(back, weight), (
        f"to={first!r} then to={second!r} must give the weight back: each direction is the other's inverse")


@pytest.mark.parametrize("checkpoint,to", [("interleaved", "half_split"), ("half_split", "interleaved")])
def test_scores_unchanged_with_grouped_heads(student, gen, exact, checkpoint, to):
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

    converted = scores(student.permute_qk_weight(wq, n_heads, to=to),
                       student.permute_qk_weight(wk, n_kv_heads, to=to), interleaved=to == "interleaved")
    assert torch.allclose(converted, scores(wq, wk, interleaved=checkpoint == "interleaved"), atol=1e-9), (
        f"a {checkpoint} checkpoint converted with to={to!r} (wq with its {n_heads} heads, wk with its {n_kv_heads}) "
        f"and {to} RoPE must give every attention score of the original")


@pytest.mark.parametrize("to", ["half-split", "Interleaved", None], ids=["misspelt", "capitalised", "None"])
def test_any_other_to_is_an_error(student, gen, value_error, to):
    weight = torch.randn(2 * 4, 3, generator=gen)
    value_error(lambda: student.permute_qk_weight(weight, 2, to=to), "to",
                "a `to` other than 'half_split' or 'interleaved'")
