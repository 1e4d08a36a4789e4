"""Lab 05, part 5: model_bytes(model) exactly, then the student's W4 QuantLinear at a decode step within
FACTOR times the library's PyTorch reference holding the same buffers.

The time is measured from the grader's side, in turns with the reference, each round on new random inputs,
every timed result checked, the channel's own cost subtracted (grading/trusted.py Timing), one thread each."""

import pytest
import torch
from torch import nn

from effml_lib.checkpoints import pretrained
from effml_lib.model import ModelConfig, Transformer
from effml_lib.quant import quantize_model
from trusted import describe, judge_speed

# The solution takes about 1x the reference (the same work: unpack, dequantize, one matmul); a Python loop
# over rows about 20x at 1024 features, one over groups about 2-3x (it is not much slower: 8 groups a row).
FACTOR = 4.0
FEATURES = (256, 512, 1024)  # in = out; judged at the largest


def reference_bytes(model):
    """Bytes of the distinct tensors of the state dict (a tensor under two names counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def small(tied=False, bias=False, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, hidden_dim=192, max_seq_len=64,
                                   tie_embeddings=tied, qkv_bias=bias, mlp_bias=bias)).eval()


MODELS = {  # id -> (what, a function making it)
    "float32": ("a small model in float32", lambda: small()),
    "tied_float16": ("a small tied model (LM head = embedding) in float16", lambda: small(tied=True).half()),
    "bfloat16": ("a small model in bfloat16", lambda: small().to(torch.bfloat16)),
    "w8_per_channel": ("a small model, W8 per channel (the library's QuantLinear)",
                       lambda: quantize_model(small(), 8, None, impl="torch")),
    "w4_g32_biases": ("a small model with biases, W4 g32 (the library's QuantLinear)",
                      lambda: quantize_model(small(bias=True), 4, 32, impl="torch")),
    "tied_w4_g64": ("a small tied model, W4 g64", lambda: quantize_model(small(tied=True), 4, 64, impl="torch")),
    "effml_tiny_w4_g128": ("effml-tiny, W4 g128", lambda: quantize_model(pretrained("effml-tiny"), 4, 128, impl="torch")),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_bytes(student, form, name):
    what, make = MODELS[name]
    model = make()
    expected = reference_bytes(model)
    with form(what):
        got = student.model_bytes(model)
    assert type(got) is int and got == expected, (
        f"{what}: model_bytes must be the int {expected}, the bytes of every tensor of its state_dict, a tensor under "
        f"two names (a tied LM head) counted once; got {describe(got)}")


def test_a_decode_step_is_not_much_slower_than_the_reference(student, gen, form, close, timing, layer_buffers, library_copy):
    layers = []
    for n in FEATURES:
        linear = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, n, generator=gen) / n**0.5)
        what = f"QuantLinear.from_linear(nn.Linear({n}, {n}), 4, 128)"
        with form(what):
            layer = student.QuantLinear.from_linear(linear, 4, 128)
        buffers = layer_buffers(layer, what)
        assert all(type(buffers[k]) is torch.Tensor for k in ("codes", "scale", "zero")) and buffers["codes"].shape == (n, n // 2) \
            and buffers["scale"].shape == (n, n // 128) and buffers["zero"].shape == (n, n // 128), (
                f"{what}: codes ({n}, {n // 2}), scale and zero ({n}, {n // 128}), as part 4 asks")
        reference = library_copy(buffers, n, n, 4, 128)  # the library's PyTorch path, on your buffers
        x = torch.randn(1, n, generator=gen)
        with form(f"{what} at a decode step, x (1, {n})"):
            out = layer(x)
        assert close(out, reference(x), 1e-5, 1e-4), (
            f"{what}: wrong output at a decode step, x (1, {n}): only a correct layer is timed")
        layers.append((layer, reference))

    def decode_steps(i):
        def inputs(count):
            xs = [torch.randn(1, FEATURES[i], generator=gen) for _ in range(count)]
            return [((x,), (x,)) for x in xs]
        return inputs

    with torch.no_grad():
        medians = [timing.compare(layer, reference, decode_steps(i), check=lambda got, expected: close(got, expected, 1e-5, 1e-4))
                   for i, (layer, reference) in enumerate(layers)]
    judge_speed(medians, FEATURES, FACTOR, "QuantLinear (W4 g128)",
                "A decode step, x (1, in), through a W4 g128 layer, float32, cpu; reference: the library's PyTorch path",
                "Unpack and dequantize the whole weight with a few tensor ops, then one matmul: no Python loop over rows "
                "or groups", xlabel="in = out features")
