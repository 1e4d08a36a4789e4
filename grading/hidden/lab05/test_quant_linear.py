"""Lab 05, part 4: QuantLinear.from_linear(linear, bits=4, group_size=128), dequantized_weight and forward:
buffers in the library's layout (read by the library's own QuantLinear), the output they give, a layer
loaded with the library's buffers, and effml-tiny's held-out loss with every block linear replaced."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effml_lib.checkpoints import pretrained
from effml_lib.data import stdlib_root
from effml_lib.model import replace_linears
from effml_lib.quant import QuantLinear, quantize
from effml_lib.tokenizer import load_tokenizer
from trusted import StudentGone, StudentRaised, describe

LAYERS = [  # (in, out, bias, bits, group_size)
    (256, 96, True, 4, 128),
    (256, 40, False, 4, 32),
    (64, 16, False, 4, None),  # one group per row
    (48, 20, True, 4, 6),
    (96, 48, True, 8, None),  # per channel
    (64, 24, False, 8, 16),
]
IDS = ["w4_g128_bias", "w4_g32", "w4_per_row", "w4_g6_bias", "w8_per_channel_bias", "w8_g16"]
MARGINS = {(8, None): 0.01, (4, 128): 0.08}  # nats of held-out loss above the unquantized model's, as the lab states


def linear_layer(gen, in_features, out_features, bias):
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
        linear.weight[:, 2] *= 10  # an outlier input channel
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    return linear


def describe_layer(in_features, out_features, bias, bits, group_size):
    return (f"QuantLinear.from_linear(nn.Linear({in_features}, {out_features}, bias={bias}), bits={bits}, "
            f"group_size={group_size})")


def made(student, form, layer_buffers, library_copy, gen, in_features, out_features, bias, bits, group_size):
    """The student's layer, its buffers checked, and the library's layer on those buffers."""
    what = describe_layer(in_features, out_features, bias, bits, group_size)
    linear = linear_layer(gen, in_features, out_features, bias)
    with form(what):
        layer = student.QuantLinear.from_linear(linear, bits, group_size)
    buffers = layer_buffers(layer, what)
    group = in_features if group_size is None else group_size
    n_groups = in_features // group
    codes_form = (torch.int8, (out_features, in_features)) if bits == 8 else (torch.uint8, (out_features, in_features // 2))
    codes = buffers["codes"]
    assert type(codes) is torch.Tensor and (codes.dtype, tuple(codes.shape)) == codes_form, (
        f"{what}: codes must be {codes_form[0]} {codes_form[1]}, got {describe(codes)}")
    scale = buffers["scale"]
    assert type(scale) is torch.Tensor and scale.dtype == torch.float16 and scale.shape == (out_features, n_groups), (
        f"{what}: scale must be float16 ({out_features}, {n_groups}), got {describe(scale)}")
    if bits == 8:
        assert buffers["zero"] is None, f"{what}: 8 bits is symmetric: no zero point (zero is None), got {describe(buffers['zero'])}"
    else:
        zero = buffers["zero"]
        assert type(zero) is torch.Tensor and zero.dtype == torch.uint8 and zero.shape == (out_features, n_groups), (
            f"{what}: zero must be uint8 ({out_features}, {n_groups}), got {describe(zero)}")
    if bias:
        assert type(buffers["bias"]) is torch.Tensor and torch.equal(buffers["bias"], linear.bias.detach()), (
            f"{what}: keep a copy of the linear's bias")
    else:
        assert buffers["bias"] is None, f"{what}: a linear without a bias makes a layer without one (bias None)"
    return layer, linear, library_copy(buffers, in_features, out_features, bits, group), what


@pytest.mark.parametrize("in_features,out_features,bias,bits,group_size", LAYERS, ids=IDS)
def test_buffers_hold_the_weight_in_the_library_layout(student, gen, form, layer_buffers, library_copy,
                                                      in_features, out_features, bias, bits, group_size):
    _, linear, copy, what = made(student, form, layer_buffers, library_copy, gen, in_features, out_features, bias, bits,
                                 group_size)
    group = in_features if group_size is None else group_size
    weight = linear.weight.detach()
    expected = quantize(weight, bits, group, symmetric=(bits == 8))
    assert torch.isclose(copy.scale.float(), expected.scale, rtol=2**-10, atol=0).all(), (
        f"{what}: wrong scales: {'symmetric' if bits == 8 else 'asymmetric'} quantization's, per group, stored in float16")
    stored = copy.dequantized_weight()
    step = copy.scale.float().repeat_interleave(group, dim=-1)
    assert ((stored - weight).abs() <= step / 2 * (1 + 1e-3) + weight.abs() * 2**-10 + 1e-7).all(), (
        f"{what}: your buffers, read in the library's layout, do not hold the weight"
        + ("" if bits == 8 else ": asymmetric 4-bit codes packed by pack_int4 (element 2i of a row in the low nibble of "
                                 "byte i), with their zero points"))


@pytest.mark.parametrize("in_features,out_features,bias,bits,group_size", LAYERS, ids=IDS)
def test_the_output_and_the_weight_come_from_the_buffers(student, gen, form, close, layer_buffers, library_copy,
                                                        in_features, out_features, bias, bits, group_size):
    layer, _, copy, what = made(student, form, layer_buffers, library_copy, gen, in_features, out_features, bias, bits,
                                group_size)
    stored = copy.dequantized_weight()
    with form(f"{what}.dequantized_weight()"):
        got = layer.dequantized_weight()
    assert close(got, stored, 1e-7, 1e-6) and got.dtype == torch.float32, (
        f"{what}: dequantized_weight() must return the float32 ({out_features}, {in_features}) weight its buffers hold, "
        f"got {describe(got)}")
    with form(f"{what}.dequantized_weight(torch.bfloat16)"):
        low = layer.dequantized_weight(torch.bfloat16)
    assert type(low) is torch.Tensor and low.dtype == torch.bfloat16, f"{what}: dequantized_weight(torch.bfloat16) is bfloat16"
    b = copy.bias
    for x in (torch.randn(3, 7, in_features, generator=gen), torch.randn(5, in_features, generator=gen)):
        with form(f"{what}, x of shape {tuple(x.shape)}"):
            out = layer(x)
        assert close(out, F.linear(x, stored, b), 1e-5, 1e-4), (
            f"{what}: wrong output for x of shape {tuple(x.shape)}: x @ weight.T + bias, the weight from the buffers "
            f"({(*x.shape[:-1], out_features)} in x's dtype)")
    x = torch.randn(2, 4, in_features, generator=gen).bfloat16()
    with form(f"{what}, a bfloat16 x (2, 4, {in_features})"):
        out = layer(x)
    assert type(out) is torch.Tensor and out.dtype == torch.bfloat16, f"{what}: a bfloat16 x gives a bfloat16 output, got {describe(out)}"
    assert close(out, F.linear(x.float(), stored, b), 3e-2, 3e-2), (
        f"{what}: wrong output for a bfloat16 x (2, 4, {in_features}): the weight and bias in x's dtype")


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, None)], ids=["w4_g32", "w8_per_channel"])
def test_a_layer_computes_with_the_buffers_it_holds_now(student, gen, form, close, bits, group_size):
    """load_state_dict with the library's buffers (a checkpoint the library saved), twice: no float copy kept."""
    what = f"QuantLinear(64, 24, bits={bits}, group_size={group_size}, bias=True) after load_state_dict"
    with form(what):
        layer = student.QuantLinear(64, 24, bits, group_size, True)
    x = torch.randn(5, 64, generator=gen)
    for round_ in ("first", "second"):
        library = QuantLinear.from_linear(linear_layer(gen, 64, 24, True), bits, group_size, impl="torch")
        with form(f"{what} ({round_} time)"):
            layer.load_state_dict(dict(library.state_dict()))  # a dict: the channel carries no OrderedDict
            out = layer(x)
        assert close(out, library(x), 1e-5, 1e-4), (
            f"{what} ({round_} time): wrong output: compute the weight from the buffers at every call, in the library's layout")


class Sandboxed(nn.Module):
    """A layer of the student's, called across the channel, where the model expects an nn.Linear."""

    def __init__(self, layer, out_features, what):
        super().__init__()
        self.layer, self.out_features, self.what = layer, out_features, what

    def forward(self, x):
        try:
            out = self.layer(x)
        except StudentRaised as error:
            raise AssertionError(f"{self.what}: {error}") from None
        if type(out) is not torch.Tensor or out.shape != (*x.shape[:-1], self.out_features):
            raise AssertionError(f"{self.what}: x {tuple(x.shape)} must give {(*x.shape[:-1], self.out_features)}, got {describe(out)}")
        return out


def held_out_loss(model):
    """Next-token cross-entropy over 2 windows of 256 tokens of optparse.py (held out of the course corpus)."""
    tokens = torch.tensor(load_tokenizer().encode((stdlib_root() / "optparse.py").read_text())[:512]).view(2, 256)
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()


@functools.cache
def unquantized_loss():
    return held_out_loss(pretrained("effml-tiny"))


@pytest.mark.parametrize("bits,group_size", list(MARGINS), ids=["w8_per_channel", "w4_g128"])
def test_effml_tiny_keeps_its_loss(student, form, layer_buffers, bits, group_size):
    margin = MARGINS[(bits, group_size)]
    unquantized = unquantized_loss()
    model = pretrained("effml-tiny")

    def swap(name, linear):
        what = f"effml-tiny's {name} as QuantLinear.from_linear(linear, {bits}, {group_size})"
        with form(what):
            layer = student.QuantLinear.from_linear(linear, bits, group_size)
        codes = layer_buffers(layer, what)["codes"]  # a quantized layer (not, say, the float linear sent back)
        assert type(codes) is torch.Tensor and codes.dtype == (torch.int8 if bits == 8 else torch.uint8), (
            f"{what}: the layer must hold its weight as codes, got {describe(codes)}")
        return Sandboxed(layer, linear.out_features, what)

    replace_linears(model, swap)  # the 56 linears of the blocks; the LM head stays
    try:
        loss = held_out_loss(model)
    except StudentGone:
        raise
    assert loss <= unquantized + margin, (
        f"effml-tiny with your W{bits} group_size={group_size} layers: held-out loss {loss:.3f}, more than {margin} above "
        f"the unquantized model's {unquantized:.3f}")
