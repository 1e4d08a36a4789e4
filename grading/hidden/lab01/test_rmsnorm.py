"""Lab 01, part 2: rms_norm(x, weight, eps=1e-5) over the last dimension."""

import pytest
import torch
from trusted import describe



def reference(x, weight, eps):
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("shape", [(5,), (3, 16), (2, 7, 384)])
def test_matches_the_formula(student, gen, close, shape):
    x = torch.randn(*shape, generator=gen) * 3 + 1  # not zero-mean: RMSNorm does not centre
    weight = torch.randn(shape[-1], generator=gen)
    out = student.rms_norm(x, weight, 1e-5)
    assert close(out, reference(x, weight, 1e-5), 1e-5, 1e-4), f"wrong output for x of shape {shape}"


def test_eps_is_used(student, gen, close):
    x = torch.full((2, 4), 1e-3)
    weight = torch.ones(4)
    out = student.rms_norm(x, weight, 1.0)
    assert close(out, reference(x, weight, 1.0), 1e-7, 1e-4), "eps must be added inside the square root"


def test_not_layernorm(student, gen, close):
    x = torch.randn(4, 32, generator=gen) + 5.0
    out = student.rms_norm(x, torch.ones(32), 1e-5)
    assert out.mean(-1).abs().min() > 0.5, "the output is centred: that is LayerNorm, RMSNorm keeps the mean"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype(student, gen, close, dtype):
    x = (torch.randn(3, 64, generator=gen) * 50).to(dtype)
    weight = torch.randn(64, generator=gen).to(dtype)
    out = student.rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype, f"output dtype should be {dtype}, got {describe(out)}"
    assert close(out, reference(x, weight, 1e-5), 3e-2, 3e-2), f"wrong output in {dtype}: compute the mean in float32"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_squares_beyond_float16(student, gen, close, dtype):
    x = (torch.randn(2, 128, generator=gen) * 400).to(dtype)  # squares up to ~10^6: past float16's 65 504
    weight = torch.ones(128, dtype=dtype)
    out = student.rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype, f"output dtype should be {dtype}, got {describe(out)}"
    assert close(out, reference(x, weight, 1e-5), 3e-2, 3e-2), (
        f"{dtype} inputs of a few hundred: their squares overflow {dtype} if averaged in it; compute in float32")
