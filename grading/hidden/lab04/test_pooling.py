"""Lab 04, part 2: pool_heads(weight, head_dim, n_groups)."""

import pytest
import torch
from trusted import describe


def slow_pool(weight, head_dim, n_groups):
    n_heads = weight.shape[0] // head_dim
    group = n_heads // n_groups
    heads = [weight[i * head_dim:(i + 1) * head_dim].double() for i in range(n_heads)]
    return torch.cat([sum(heads[g * group:(g + 1) * group]) / group for g in range(n_groups)])


@pytest.mark.parametrize("n_heads,head_dim,n_groups", [(8, 4, 2), (6, 8, 3), (6, 8, 1), (4, 2, 4), (32, 16, 8)])
def test_weights(student, gen, close, n_heads, head_dim, n_groups):
    weight = torch.randn(n_heads * head_dim, 24, generator=gen)
    got = student.pool_heads(weight, head_dim, n_groups)
    assert close(got, slow_pool(weight, head_dim, n_groups), 1e-6, 1e-6), (
        f"{n_heads} heads of {head_dim} into {n_groups}: new head g must be the mean of old heads "
        f"g*{n_heads // n_groups} .. g*{n_heads // n_groups}+{n_heads // n_groups - 1}")


def test_bias(student, gen, close):
    bias = torch.randn(6 * 4, generator=gen)
    assert close(student.pool_heads(bias, 4, 2), slow_pool(bias, 4, 2), 1e-6, 1e-6), (
        "a bias (6 heads of 4, shape (24,)) into 2 groups: pool it per head as a weight is, head g the mean of heads 3g .. 3g+2")


def test_low_precision_is_averaged_in_float32(student, gen):
    weight = torch.randn(8 * 16, 32, generator=gen).to(torch.bfloat16)
    got = student.pool_heads(weight, 16, 2)
    assert got.dtype == torch.bfloat16, f"a bfloat16 weight (8 heads of 16, 32): return bfloat16, got {describe(got)}"
    assert torch.equal(got, slow_pool(weight.float(), 16, 2).to(torch.bfloat16)), (
        "a bfloat16 weight (8 heads of 16, 32) into 2 groups: average in float32, round once to bfloat16")


def test_input_unchanged(student, gen):
    weight = torch.randn(4 * 2, 3, generator=gen)
    before = weight.clone()
    student.pool_heads(weight, 2, 2)
    assert torch.equal(weight, before), (
        "pool_heads must leave its input as it was (a (8, 3) weight, 4 heads of 2, into 2 groups)")


@pytest.mark.parametrize("n_groups", [4, 5])
def test_groups_that_do_not_divide(student, gen, value_error, n_groups):
    weight = torch.randn(6 * 2, 3, generator=gen)
    value_error(lambda: student.pool_heads(weight, 2, n_groups), "n_groups", f"n_groups={n_groups} with 6 heads")
