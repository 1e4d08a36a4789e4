"""Lab 05, part 1: quantize(w, bits=8, group_size=None, symmetric=True) -> QTensor and dequantize(qt),
against the library's quantize and dequantize."""

import pytest
import torch

from effml_lib.quant import QTensor, dequantize, quantize
from trusted import describe


def weights(gen, *shape, dtype=torch.float32):
    w = torch.randn(*shape, generator=gen)
    w[..., 1] *= 20  # one large input channel, as real layers have
    return w.to(dtype)


FORMS = [  # (id, shape, bits, group_size): per channel, groups, odd groups, any leading shape, 2 to 8 bits
    ("per_channel_8bit", (8, 64), 8, None),
    ("groups_of_16_4bit", (6, 64), 4, 16),
    ("odd_groups_of_7", (5, 21), 4, 7),
    ("3d_groups_of_5_3bit", (3, 4, 15), 3, 5),
    ("2bit_groups_of_8", (4, 32), 2, 8),
    ("vector_8bit", (48,), 8, 16),
]


def check(qt, w, bits, group_size, symmetric, what, qtensor_fields, check_tensor, per_element):
    """Every field of the student's QTensor against the library's quantization of w, and the error bound."""
    f = qtensor_fields(qt, what)
    expected = quantize(w, bits, group_size, symmetric)
    check_tensor(f.codes, torch.int8 if symmetric else torch.uint8, w.shape, what, "codes")
    check_tensor(f.scale, torch.float32, expected.scale.shape, what, "scale (one float32 per group, (*w.shape[:-1], n_groups))")
    assert (f.bits, f.group_size, f.dtype) == (bits, group_size, w.dtype) and type(f.shape) in (tuple, list) \
        and tuple(f.shape) == tuple(w.shape), (
            f"{what}: the QTensor must hold bits={bits}, group_size={group_size} (as given), shape={tuple(w.shape)} "
            f"and dtype={w.dtype}")
    rule = "max|w| / (2**(bits-1) - 1)" if symmetric else "(hi - lo) / (2**bits - 1), the range widened to hold 0"
    assert torch.isclose(f.scale, expected.scale, rtol=1e-6, atol=0).all(), (
        f"{what}: wrong scales: {rule}, per group, in float32 (an all-zero group: 1)")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        assert f.zero is None, f"{what}: symmetric quantization has no zero point: zero must be None, got {describe(f.zero)}"
        assert int(f.codes.abs().max()) <= qmax, f"{what}: symmetric codes lie in -{qmax} .. {qmax}"
        zero = torch.zeros_like(expected.scale)
    else:
        check_tensor(f.zero, torch.uint8, expected.zero.shape, what, "zero (one per group)")
        assert torch.equal(f.zero, expected.zero), f"{what}: wrong zero points: the code of 0.0, round(-lo / scale)"
        assert int(f.codes.max()) <= 2**bits - 1, f"{what}: asymmetric codes lie in 0 .. {2**bits - 1}"
        zero = f.zero.float()
    group = w.shape[-1] if group_size is None else group_size
    step = per_element(f.scale, group)
    error = ((f.codes.float() - per_element(zero, group)) * step - w.float()).abs()
    assert (error <= step / 2 * (1 + 1e-5) + 1e-7).all(), (
        f"{what}: an element lies more than half a step (scale / 2) from its code: round to the nearest code")
    return f


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("shape,bits,group_size", [f[1:] for f in FORMS], ids=[f[0] for f in FORMS])
def test_quantize_matches_the_definition(student, gen, form, qtensor_fields, check_tensor, per_element,
                                         shape, bits, group_size, symmetric):
    w = weights(gen, *shape)
    what = f"w of shape {shape}, {bits} bits, group_size={group_size}, {'symmetric' if symmetric else 'asymmetric'}"
    with form(what):
        qt = student.quantize(w, bits, group_size, symmetric)
    check(qt, w, bits, group_size, symmetric, what, qtensor_fields, check_tensor, per_element)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_all_equal_and_all_zero_groups(student, form, qtensor_fields, check_tensor, per_element, symmetric):
    """Groups that hold one value: their range is that value and 0 (widened); an all-zero group has no range."""
    w = torch.tensor([[0.0] * 6 + [3.5] * 6 + [-2.25] * 6, [0.0] * 6 + [-0.1] * 6 + [0.0] * 6])  # (2, 18): groups of 6
    what = f"groups of 6 all 0, all 3.5, all -2.25, all -0.1 (4 bits, {'symmetric' if symmetric else 'asymmetric'})"
    with form(what):
        qt = student.quantize(w, 4, 6, symmetric)
    f = check(qt, w, 4, 6, symmetric, what, qtensor_fields, check_tensor, per_element)
    assert torch.isfinite(f.scale).all() and f.scale[0, 0] == 1 and f.scale[1, 0] == 1 and f.scale[1, 2] == 1, (
        f"{what}: an all-zero group gets scale 1 (never a division by zero)")
    with form(f"dequantize of {what}"):
        back = student.dequantize(qt)
    assert type(back) is torch.Tensor and back.shape == w.shape and torch.isfinite(back).all() and \
        back[0, :6].eq(0).all() and back[1, :6].eq(0).all() and back[1, 12:].eq(0).all(), (
            f"{what}: an all-zero group must come back as exact zeros, not NaN")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits,group_size", [(8, 32), (4, 16)], ids=["8bit_g32", "4bit_g16"])
def test_16_bit_weights(student, gen, form, qtensor_fields, check_tensor, per_element, dtype, symmetric, bits, group_size):
    w = weights(gen, 6, 64, dtype=dtype)
    what = f"a {dtype} weight (6, 64), {bits} bits, group_size={group_size}, {'symmetric' if symmetric else 'asymmetric'}"
    with form(what):
        qt = student.quantize(w, bits, group_size, symmetric)
    check(qt, w, bits, group_size, symmetric, what, qtensor_fields, check_tensor, per_element)
    with form(f"dequantize of {what}"):
        back = student.dequantize(qt)
    assert type(back) is torch.Tensor and back.dtype == dtype and back.shape == w.shape, (
        f"dequantize of {what}: return the weight's dtype and shape, got {describe(back)}")


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_outside_2_to_8(student, gen, value_error, bits):
    w = torch.randn(4, 64, generator=gen)
    value_error(lambda: student.quantize(w, bits), "bits", f"bits={bits}")


@pytest.mark.parametrize("group_size", [5, 0])
def test_group_sizes_that_do_not_divide_the_row(student, gen, value_error, group_size):
    w = torch.randn(4, 64, generator=gen)
    value_error(lambda: student.quantize(w, 4, group_size), "group_size", f"group_size={group_size} for rows of 64")


def check_dequantized(student, qt, what, form, close):
    with form(what):
        out = student.dequantize(qt)
    expected = dequantize(qt)
    assert type(out) is torch.Tensor and out.shape == expected.shape and out.dtype == expected.dtype, (
        f"{what}: dequantize returns qt.shape {tuple(qt.shape)} in qt.dtype {qt.dtype}, got {describe(out)}")
    tolerance = 1e-6 if qt.dtype == torch.float32 else 2**-7
    assert close(out, expected, 1e-6, tolerance), (
        f"{what}: wrong values: (codes - zero) * scale per group, in float32, then qt.dtype")


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("shape,bits,group_size", [f[1:] for f in FORMS], ids=[f[0] for f in FORMS])
def test_dequantize_matches_the_definition(student, gen, form, close, shape, bits, group_size, symmetric):
    qt = quantize(weights(gen, *shape), bits, group_size, symmetric)  # the library's QTensor
    check_dequantized(student, qt, f"a QTensor of shape {shape}, {bits} bits, group_size={group_size}, "
                      f"{'symmetric' if symmetric else 'asymmetric'}", form, close)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dequantize_returns_16_bit_weights(student, gen, form, close, dtype):
    qt = quantize(weights(gen, 6, 64, dtype=dtype), 4, 16, symmetric=False)
    check_dequantized(student, qt, f"a QTensor of a {dtype} weight (6, 64), 4 bits in groups of 16, asymmetric", form, close)


def test_dequantize_a_negative_scale(student, form, close):
    """A negative scale (GGUF's Q4_0 takes its scale from the signed weight of largest magnitude): the formula holds as it is."""
    qt = QTensor(codes=torch.tensor([[3, 12, 0, 15, 8, 1]], dtype=torch.uint8), scale=torch.tensor([[-0.5, 0.25]]),
                 zero=torch.tensor([[8, 2]], dtype=torch.uint8), bits=4, group_size=3, shape=torch.Size([1, 6]))
    check_dequantized(student, qt, "a QTensor (1, 6) in groups of 3 with scales -0.5 and 0.25", form, close)


def test_dequantize_of_quantize_stays_within_half_a_step(student, gen, form, close):
    w = weights(gen, 6, 64)
    with form("dequantize(quantize(w, 4, 16, symmetric=False)) for w (6, 64)"):
        back = student.dequantize(student.quantize(w, 4, 16, False))
    expected = quantize(w, 4, 16, symmetric=False)
    step = expected.scale.repeat_interleave(16, dim=-1)
    assert type(back) is torch.Tensor and back.shape == w.shape and ((back - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all(), (
        "your dequantize(quantize(w, 4, 16, symmetric=False)) for w (6, 64) must come back within half a step of w")
