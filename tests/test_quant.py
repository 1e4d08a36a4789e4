"""effml_lib.quant: linear quantization (symmetric/asymmetric; per tensor, channel, group) and int4 packing.

References: the error bound and code ranges from the math, a worked example by hand, and PyTorch's own
fake-quantization op given the same scales and zero points."""

import pytest
import torch

from effml_lib.quant import QTensor, dequantize, pack_int4, quantize, unpack_int4


def weights(gen, shape=(6, 64), outliers=True):
    w = torch.randn(*shape, generator=gen)
    if outliers:
        w[..., 3] *= 20  # one large input channel, as real layers have
    return w


def torch_fake_quant(w, qt):
    """PyTorch's fake quantization with our scales and zero points: per group, as its per-channel op."""
    bits, symmetric = qt.bits, qt.zero is None
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    if qt.scale.dim() == 0:
        rows, scale = w.reshape(1, -1), qt.scale.reshape(1)
        zero = torch.zeros(1, dtype=torch.int32) if symmetric else qt.zero.reshape(1).int()
    else:
        rows, scale = w.reshape(qt.scale.numel(), -1), qt.scale.reshape(-1)
        zero = torch.zeros_like(scale, dtype=torch.int32) if symmetric else qt.zero.reshape(-1).int()
    return torch.fake_quantize_per_channel_affine(rows.float(), scale, zero, 0, qmin, qmax).reshape(w.shape)


FORMS = [  # (group_size, per_tensor)
    (None, False), (16, False), (32, False), (None, True),
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size,per_tensor", FORMS)
def test_error_is_at_most_half_a_step(gen, bits, symmetric, group_size, per_tensor):
    w = weights(gen)
    qt = quantize(w, bits, group_size, symmetric, per_tensor=per_tensor)
    step = qt.scale if per_tensor else qt.scale.repeat_interleave(w.shape[-1] // qt.scale.shape[-1], dim=-1)
    error = (dequantize(qt) - w).abs()
    assert (error <= step / 2 * (1 + 1e-5) + 1e-7).all(), (
        f"bits={bits} symmetric={symmetric} group_size={group_size} per_tensor={per_tensor}: "
        f"error {error.max():.3g} exceeds half a step")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size,per_tensor", FORMS)
def test_matches_pytorch_fake_quantization(gen, bits, symmetric, group_size, per_tensor):
    w = weights(gen)
    qt = quantize(w, bits, group_size, symmetric, per_tensor=per_tensor)
    torch.testing.assert_close(dequantize(qt), torch_fake_quant(w, qt), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_ranges_and_the_extremes(gen, bits):
    w = weights(gen, outliers=False)
    sym = quantize(w, bits, group_size=16)
    qmax = 2 ** (bits - 1) - 1
    assert sym.codes.dtype == torch.int8 and sym.codes.abs().max() <= qmax and sym.zero is None
    groups = sym.codes.reshape(6, 4, 16)
    assert (groups.abs().amax(-1) == qmax).all(), "each group's largest |w| must take the largest code"
    asym = quantize(w, bits, group_size=16, symmetric=False)
    assert asym.codes.dtype == torch.uint8 and asym.codes.max() <= 2**bits - 1
    groups = asym.codes.reshape(6, 4, 16)
    assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 2**bits - 1).all(), "min and max take codes 0 and 2^bits - 1"


def test_asymmetric_keeps_zero_exact(gen):
    w = weights(gen)
    w[:, ::5] = 0.0
    qt = quantize(w, 4, group_size=32, symmetric=False)
    assert (dequantize(qt)[:, ::5] == 0).all(), "0.0 must dequantize to exactly 0.0"


def test_a_worked_example():
    w = torch.tensor([[-1.0, -0.2, 0.3, 2.0]])
    qt = quantize(w, bits=3)  # qmax 3, scale 2/3
    assert torch.allclose(qt.scale, torch.tensor([[2 / 3]]))
    assert qt.codes.tolist() == [[-2, 0, 0, 3]]  # -1.5 rounds to even -2; -0.3 and 0.45 to 0
    qa = quantize(w, bits=2, symmetric=False)  # range [-1, 2] in 3 steps of 1; zero point 1
    assert qa.scale.item() == 1.0 and qa.zero.tolist() == [[1]] and qa.codes.tolist() == [[0, 1, 1, 3]]
    assert dequantize(qa).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


@pytest.mark.parametrize("value", [0.0, 3.5, -2.25])
@pytest.mark.parametrize("symmetric", [True, False])
def test_an_all_equal_group_has_no_error(value, symmetric):
    w = torch.full((2, 8), value)
    qt = quantize(w, 4, group_size=4, symmetric=symmetric)
    assert torch.isfinite(qt.scale).all() and (qt.scale > 0).all()
    assert torch.equal(dequantize(qt), w), f"a group of {value}s (zero range) must come back exactly"


def test_smaller_groups_give_smaller_error(gen):
    w = weights(gen, (16, 256))
    errors = [(dequantize(quantize(w, 4, g, per_tensor=t)) - w).pow(2).mean().item()
              for g, t in [(None, True), (None, False), (128, False), (32, False)]]
    assert errors == sorted(errors, reverse=True), f"error should fall from per tensor to g32: {errors}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_in_and_out(gen, dtype):
    w = weights(gen).to(dtype)
    qt = quantize(w, 8, group_size=32, symmetric=False)
    out = dequantize(qt)
    assert out.dtype == dtype and out.shape == w.shape and qt.scale.dtype == torch.float32
    step = qt.scale.repeat_interleave(32, dim=-1)
    rounding = out.float().abs() * (2**-8 if dtype == torch.bfloat16 else 2**-11)  # the result's own rounding
    assert ((out.float() - w.float()).abs() <= step / 2 + rounding + 1e-6).all(), f"{dtype}: error beyond half a step"


def test_any_leading_shape(gen):
    w = torch.randn(2, 3, 32, generator=gen)
    qt = quantize(w, 4, group_size=8)
    assert qt.scale.shape == (2, 3, 4) and qt.codes.shape == w.shape
    torch.testing.assert_close(dequantize(qt), torch_fake_quant(w, qt))


@pytest.mark.parametrize("call,match", [
    (lambda w: quantize(w, bits=1), "bits"),
    (lambda w: quantize(w, bits=9), "bits"),
    (lambda w: quantize(w, bits=4.0), "bits"),
    (lambda w: quantize(w, group_size=24), "group_size"),
    (lambda w: quantize(w, group_size=0), "group_size"),
    (lambda w: quantize(w.long()), "w"),
    (lambda w: quantize(w, group_size=16, per_tensor=True), "per_tensor"),
    (lambda w: dequantize(w), "QTensor"),
])
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(4, 64))


# --- int4 packing -----------------------------------------------------------------------------------

def test_pack_puts_the_even_element_in_the_low_nibble():
    packed = pack_int4(torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8))
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]


def test_unpack_undoes_pack(gen):
    codes = torch.randint(0, 16, (3, 5, 64), generator=gen, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(unpack_int4(torch.tensor([0xAB], dtype=torch.uint8)), torch.tensor([0xB, 0xA], dtype=torch.uint8))


def test_packed_asymmetric_int4_round_trip(gen):
    w = weights(gen)
    qt = quantize(w, 4, group_size=32, symmetric=False)
    restored = QTensor(unpack_int4(pack_int4(qt.codes)), qt.scale, qt.zero, 4, 32, qt.shape, qt.dtype)
    assert torch.equal(dequantize(restored), dequantize(qt))


@pytest.mark.parametrize("codes,match", [
    (torch.tensor([1, 2, 3]), "even"),
    (torch.tensor([1, 16]), "0..15"),
    (torch.tensor([-1, 2]), "0..15"),
    (torch.tensor([1.0, 2.0]), "integer"),
])
def test_pack_rejects_what_does_not_fit(codes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pack_int4(codes)


def test_unpack_rejects_other_dtypes():
    with pytest.raises(TypeError, match="uint8"):
        unpack_int4(torch.tensor([1, 2], dtype=torch.int32))


# --- k-means (Deep Compression's codebook) ------------------------------------------------------------

from effml_lib.quant import kmeans_quantize  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_codes_point_to_the_nearest_centroid(gen, bits):
    w = torch.randn(32, 48, generator=gen)
    codes, centroids = kmeans_quantize(w, bits)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and centroids.shape == (2**bits,)
    assert torch.all(centroids[1:] >= centroids[:-1]), "centroids come sorted"
    brute = (w.flatten()[:, None] - centroids[None, :]).abs().argmin(dim=1).reshape(w.shape)  # (N, k) distances
    distance = lambda c: (w - centroids[c.long()]).abs()  # noqa: E731
    assert torch.allclose(distance(codes), distance(brute)), "every code must name a nearest centroid"


def test_kmeans_centroids_are_the_means_of_their_weights(gen):
    w = torch.randn(4096, generator=gen)
    codes, centroids = kmeans_quantize(w, 2, iters=100)
    for c in range(4):
        assert torch.allclose(centroids[c], w[codes == c].mean(), atol=1e-4), f"centroid {c} is not its cell's mean"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_beats_linear_levels_on_bell_shaped_weights(gen, bits):
    w = torch.randn(64, 64, generator=gen)
    codes, centroids = kmeans_quantize(w, bits)
    kmeans_error = (centroids[codes.long()] - w).pow(2).mean()
    linear_error = (dequantize(quantize(w, bits, symmetric=False, per_tensor=True)) - w).pow(2).mean()
    assert kmeans_error < linear_error, f"{bits} bits: k-means {kmeans_error:.4g} vs linear {linear_error:.4g}"


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="bits"):
        kmeans_quantize(torch.randn(8), bits=9)
    with pytest.raises(ValueError, match="iters"):
        kmeans_quantize(torch.randn(8), bits=2, iters=-1)
    with pytest.raises(TypeError, match="w"):
        kmeans_quantize(torch.arange(8), bits=2)


# --- SmoothQuant --------------------------------------------------------------------------------------

from effml_lib.quant import smoothquant_scales  # noqa: E402


def test_smoothquant_formula_by_hand():
    s = smoothquant_scales(torch.tensor([16.0, 1.0]), torch.tensor([1.0, 4.0]), alpha=0.5)
    assert torch.allclose(s, torch.tensor([4.0, 0.5])), s  # sqrt(16)/sqrt(1), sqrt(1)/sqrt(4)


def test_smoothing_keeps_the_product_and_balances_the_maxima(gen):
    x = torch.randn(64, 32, generator=gen)
    x[:, 5] *= 50  # an outlier channel
    w = torch.randn(16, 32, generator=gen)
    s = smoothquant_scales(x.abs().amax(0), w.abs().amax(0), alpha=0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close((x / s).abs().amax(0), (w * s).abs().amax(0), rtol=1e-4, atol=1e-6)  # alpha = 0.5: equal
    assert (x / s).abs().amax(0).max() < x.abs().amax(0).max() / 5, "the outlier channel must shrink"


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_smoothquant_extremes(gen, alpha):
    a, w = torch.rand(8, generator=gen) + 0.5, torch.rand(8, generator=gen) + 0.5
    s = smoothquant_scales(a, w, alpha)
    expected = 1 / w if alpha == 0.0 else a  # 0: the weight's columns flattened to max 1; 1: the activations'
    torch.testing.assert_close(s, expected)


@pytest.mark.parametrize("args,match", [
    ((torch.ones(4), torch.ones(5), 0.5), "one entry per input channel"),
    ((torch.ones(4), torch.ones(4), 1.5), "alpha"),
    ((-torch.ones(4), torch.ones(4), 0.5), "act_absmax"),
    ((torch.ones(2, 2), torch.ones(4), 0.5), "act_absmax"),
])
def test_smoothquant_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        smoothquant_scales(*args)


# --- AWQ ----------------------------------------------------------------------------------------------

from effml_lib.quant import awq_scales  # noqa: E402


def salient_layer(gen, n_salient=3):
    w = torch.randn(64, 256, generator=gen) / 16
    x = torch.randn(512, 256, generator=gen)
    x[:, :n_salient] *= 30  # a few input channels with large activations, as in real LLM layers
    return w, x


def output_error(w, x, s):
    w_q = dequantize(quantize(w * s, 4, 128, symmetric=False))
    return ((x / s) @ w_q.T - x @ w.T).pow(2).mean().item()


def test_awq_reduces_the_output_error_of_salient_channels(gen):
    w, x = salient_layer(gen)
    s = awq_scales(w, x)
    plain, awq = output_error(w, x, torch.ones(256)), output_error(w, x, s)
    assert awq < 0.8 * plain, f"AWQ's output error {awq:.4g} should be well below plain W4 g128's {plain:.4g}"
    assert s[:3].min() > s[3:].max(), "the salient channels get the largest scales"
    held_out = torch.randn(256, 256, generator=gen)
    held_out[:, :3] *= 30
    assert output_error(w, held_out, s) < output_error(w, held_out, torch.ones(256)), "and on new activations too"


def test_awq_is_never_worse_than_plain_on_its_calibration(gen):
    w, x = torch.randn(32, 128, generator=gen), torch.randn(64, 128, generator=gen)  # no salient channels
    assert output_error(w, x, awq_scales(w, x)) <= output_error(w, x, torch.ones(128)) * (1 + 1e-6)


def test_awq_bad_input(gen):
    w, x = torch.randn(8, 128, generator=gen), torch.randn(4, 128, generator=gen)
    with pytest.raises(ValueError, match="activations"):
        awq_scales(w, x[:, :64])
    with pytest.raises(ValueError, match="group_size"):
        awq_scales(w, x, group_size=48)
    with pytest.raises(ValueError, match="grid"):
        awq_scales(w, x, grid=0)


# --- QuantLinear and quantize_model -------------------------------------------------------------------

from effml_lib.quant import QuantLinear, quantize_model  # noqa: E402


def expected_weight(w, bits, group_size):
    """The weight a QuantLinear computes with: our quantize, its scales rounded to float16 as stored."""
    qt = quantize(w, bits, group_size, symmetric=(bits == 8))
    qt.scale = qt.scale.half().float()
    return dequantize(qt)


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 64), (4, 128), (4, 32)])
def test_quant_linear_computes_with_the_quantized_weight(gen, bits, group_size):
    linear = torch.nn.Linear(256, 48, bias=True)
    x = torch.randn(3, 5, 256, generator=gen)
    q = QuantLinear.from_linear(linear, bits, group_size)
    expected = torch.nn.functional.linear(x, expected_weight(linear.weight.detach(), bits, group_size), linear.bias)
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=1e-5)
    relative = ((q(x) - linear(x)).norm() / linear(x).norm()).item()
    assert relative < (0.01 if bits == 8 else 0.15), f"W{bits} g{group_size}: output error {relative:.3f} of the output"


def test_quant_linear_stores_what_it_should(gen):
    q = QuantLinear.from_linear(torch.nn.Linear(256, 64), bits=4, group_size=128)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (64, 128), "two 4-bit codes per byte"
    assert q.scale.shape == q.zero.shape == (64, 2)
    assert q.weight_bytes == 64 * 128 + 64 * 2 * (2 + 1), "codes + float16 scales + uint8 zero points"
    w8 = QuantLinear.from_linear(torch.nn.Linear(256, 64), bits=8, group_size=None)
    assert w8.codes.dtype == torch.int8 and w8.zero is None and w8.weight_bytes == 64 * 256 + 64 * 2


def test_quant_linear_keeps_the_input_dtype_and_its_state(gen):
    linear = torch.nn.Linear(128, 32)
    q = QuantLinear.from_linear(linear, 4, 64)
    x = torch.randn(2, 128, generator=gen).bfloat16()
    assert q(x).dtype == torch.bfloat16
    copy = QuantLinear(128, 32, 4, 64, bias=True)
    copy.load_state_dict(q.state_dict())
    torch.testing.assert_close(copy(x.float()), q(x.float()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits"), (dict(group_size=48), "group_size"), (dict(group_size=0), "group_size"),
])
def test_quant_linear_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_linear(torch.nn.Linear(128, 8), **kwargs)
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(torch.nn.Conv1d(1, 1, 1))


@pytest.fixture(scope="module")
def code_tokens():
    import inspect
    import json

    from effml_lib.tokenizer import load_tokenizer

    return torch.tensor([load_tokenizer().encode(inspect.getsource(json.decoder))[:512]])  # (1, 512) real code


def loss(model, tokens):
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[0, 1:]).item()


@pytest.mark.parametrize("bits,group_size,margin", [(8, None, 0.01), (4, 32, 0.15)])
def test_quantized_effml_tiny_stays_close(code_tokens, bits, group_size, margin):
    from effml_lib.checkpoints import pretrained

    reference = loss(pretrained("effml-tiny"), code_tokens)
    model = quantize_model(pretrained("effml-tiny"), bits, group_size)
    swapped = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(swapped) == 7 * model.config.n_layers and not isinstance(model.output, QuantLinear), (
        "every block's seven projections are quantized, the LM head is not")
    quantized = loss(model, code_tokens)
    assert quantized < reference + margin, f"W{bits} g{group_size}: loss {quantized:.3f} vs fp32 {reference:.3f}"


def test_a_quantized_model_decodes_with_a_cache(code_tokens):
    """generate() over a static cache: the cache takes the activations' dtype, not a (missing) float weight."""
    from effml_lib.checkpoints import pretrained
    from effml_lib.decoding import generate
    from effml_lib.kvcache import StaticKVCache

    model = quantize_model(pretrained("effml-tiny"), 4, 32, impl="torch")
    prompt = code_tokens[:, :16]
    cache = StaticKVCache.for_model(model, batch_size=1, max_seq_len=32)
    cached = generate(model, prompt, 8, cache=cache)
    assert torch.equal(cached, generate(model, prompt, 8, use_cache=False)), "cached and uncached decode disagree"


# --- the Triton kernel, against the PyTorch reference (interpreter on CPU, small shapes) ----------------

@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 32), (8, None)])
@pytest.mark.parametrize("rows", [1, 5, 9, 37])  # decode steps (the GEMV), then the GEMM: 9 rows, more than one tile
def test_triton_kernel_equals_the_reference(gen, bits, group_size, rows):
    pytest.importorskip("triton")
    linear = torch.nn.Linear(128, 80, bias=True)  # 80: a ragged tile of the GEMM's 128 rows (the GEMV's: below)
    q = QuantLinear.from_linear(linear, bits, group_size, impl="torch")
    x = torch.randn(rows, 128, generator=gen)
    if torch.cuda.is_available():
        q, x = q.cuda(), x.cuda()
    reference = q(x)
    q.impl = "triton"
    torch.testing.assert_close(q(x), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,in_features,group_size", [
    (4, 96, 32),    # 96 = 1.5 steps of 64: the last step is ragged
    (4, 120, 24),   # segments of 8 weights: 24 is 8 * 3
    (4, 128, 128),  # one group per row, longer than a step
    (8, 120, 12),   # segments of 4 weights, one word of int8 codes
    (8, 96, None),  # per channel, 96 = 32 * 3
])
@pytest.mark.parametrize("tiles", [{"block_n": 16, "chunks": 2, "num_warps": 4},
                                   {"block_n": 8, "chunks": 4, "num_warps": 1}])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_triton_kernel_equals_the_reference_for_any_group(gen, bits, in_features, group_size, tiles, path):
    """Any group of whole words of codes must give the reference's answer, up to GEMV_MAX_ROWS rows and
    beyond. The GEMV takes layers of whole chunks (32 weights at 4 bits, 16 at 8) in whole groups, with
    a ragged last step (96 = 3 chunks of 32) and a ragged last tile of rows (40 = 2.5 tiles of 16); the
    others (groups of 24 and 12) go to the GEMM, whose steps split into segments inside one group."""
    pytest.importorskip("triton")
    from effml_lib.kernels.quant_matmul import GEMV_MAX_ROWS, fits_gemv, quant_matmul

    q = QuantLinear.from_linear(torch.nn.Linear(in_features, 40, bias=True), bits, group_size, impl="torch")
    x = torch.randn(GEMV_MAX_ROWS + (path == "gemm"), in_features, generator=gen)
    if torch.cuda.is_available():
        q, x = q.cuda(), x.cuda()
    gemm = {"block_n": 16, "block_k": 128, "num_warps": tiles["num_warps"]}  # each lane's product: >= 16 deep
    on_the_gemv = path == "gemv" and fits_gemv(bits, q.group_size, in_features)
    assert on_the_gemv == (path == "gemv" and group_size not in (24, 12)), "which layouts the GEMV takes"
    # math=0 (float32 products) makes quant_matmul refuse the call if it would not run the GEMV
    out = quant_matmul(x, q.codes, q.scale, q.zero, q.bias, bits, q.group_size, in_features, gemv=tiles, gemm=gemm,
                       math=0 if on_the_gemv else None)
    torch.testing.assert_close(out, q(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_default_tiles_equal_the_reference(gen, bits, dtype):
    """The GEMV's default tiles on a row of whole steps and a ragged tail: 2112 weights are 66 chunks of 32
    (4 bits: one step of 64 chunks, then 2) or 132 of 16 (8 bits: two steps, then 4)."""
    pytest.importorskip("triton")
    from effml_lib.kernels.quant_matmul import quant_matmul

    q = QuantLinear.from_linear(torch.nn.Linear(2112, 12, bias=True), bits, 64, impl="torch")
    x = torch.randn(2, 2112, generator=gen)
    if torch.cuda.is_available():
        q, x = q.cuda(), x.cuda()
    reference = torch.nn.functional.linear(x.to(dtype).float(), q.dequantized_weight(), q.bias.float())
    out = quant_matmul(x.to(dtype), q.codes, q.scale, q.zero, q.bias, bits, q.group_size, 2112,
                       math=0 if dtype == torch.float32 else None)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3  # float32 rounding; bf16 output, float16 sums
    error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
    assert error < tolerance, f"largest error {error:.1e} of the largest output, expected < {tolerance}"


def test_gemv_math_must_be_one_the_call_can_run(gen):
    """``math`` picks the GEMV's arithmetic; asking for one the call cannot run is an error, not a silent
    fallback: on the GEMM's path, float16 pairs of float32 activations, PTX without a GPU."""
    pytest.importorskip("triton")
    from effml_lib.kernels.quant_matmul import GEMV_MAX_ROWS, quant_matmul

    q = QuantLinear.from_linear(torch.nn.Linear(64, 8), 4, 32, impl="torch")
    x = torch.randn(GEMV_MAX_ROWS + 1, 64, generator=gen)
    args = (q.codes, q.scale, q.zero, None, 4, 32, 64)
    with pytest.raises(ValueError, match="GEMM"):
        quant_matmul(x, *args, math=0)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        quant_matmul(x[:1], *args, math=1)
    with pytest.raises(ValueError, match="math must be"):
        quant_matmul(x[:1].half(), *args, math=3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="PTX"):
            quant_matmul(x[:1].half(), *args, math=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size,form", [(4, 32, "zero"), (4, None, "zero"), (4, 32, "offset"),
                                                  (8, 32, "zero"), (8, None, "zero")])
@pytest.mark.parametrize("block_n", [8, 16])  # 24 rows: whole tiles of 8, a ragged last tile of 16
def test_gemv_float16_pairs_equal_the_reference(gen, dtype, bits, group_size, form, block_n):
    """With 16-bit activations the GEMV multiplies float16 pairs made from the codes' bits: inline PTX on
    a GPU, and the same bit tricks in plain Triton (math=1), which is what the interpreter runs. Both
    must equal the float32 reference up to float16 sums and the output's rounding, in both forms of the
    zero point, with a ragged last step (160 weights: 5 chunks of 32 or 10 of 16, steps of 2 or 4)."""
    pytest.importorskip("triton")
    from effml_lib.kernels.quant_matmul import quant_matmul

    if form == "offset":
        q = offset_form(160, 24, group_size, gen, bias=True)
    else:
        q = QuantLinear.from_linear(torch.nn.Linear(160, 24, bias=True), bits, group_size, impl="torch")
    x = torch.randn(3, 160, generator=gen)
    maths = (1,)
    if torch.cuda.is_available():
        q, x, maths = q.cuda(), x.cuda(), (1, 2)
    reference = torch.nn.functional.linear(x.to(dtype).float(), q.dequantized_weight(), q.bias.float())
    tiles = {"block_n": block_n, "chunks": 2 if bits == 4 else 4, "num_warps": 1}
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]  # float16 sums; the output's rounding
    for math in maths:
        out = quant_matmul(x.to(dtype), q.codes, q.scale, q.zero, q.bias, bits, q.group_size, 160,
                           gemv=tiles, offset=q.offset, math=math)
        assert out.dtype == dtype
        error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
        assert error < tolerance, f"math={math}: largest error {error:.1e} of the largest output, expected < {tolerance}"


@pytest.mark.parametrize("bits,in_features,group_size", [(8, 120, 15), (4, 36, 12), (4, 60, None)])
def test_layers_the_kernel_cannot_tile_use_the_reference(gen, bits, in_features, group_size):
    """The kernels read codes as 32-bit words: a row or a group that is not whole words (8-bit group 15;
    4-bit rows of 36 or 60 codes: 18 or 30 bytes) is refused by the kernel and computed by QuantLinear's
    PyTorch reference instead."""
    pytest.importorskip("triton")
    from effml_lib.kernels.quant_matmul import quant_matmul

    q = QuantLinear.from_linear(torch.nn.Linear(in_features, 24), bits, group_size, impl="torch")
    x = torch.randn(3, in_features, generator=gen)
    if torch.cuda.is_available():
        q, x = q.cuda(), x.cuda()
    with pytest.raises(ValueError, match="whole 32-bit words"):
        quant_matmul(x, q.codes, q.scale, q.zero, q.bias, bits, q.group_size, in_features)
    reference = q(x)
    q.impl = "triton"
    torch.testing.assert_close(q(x), reference)


def test_triton_kernel_keeps_leading_dims_and_dtype(gen):
    pytest.importorskip("triton")
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), 4, 32, impl="torch")
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if torch.cuda.is_available():
        q, x = q.cuda(), x.cuda()
    reference = q(x)
    q.impl = "triton"
    out = q(x)
    assert out.shape == (2, 3, 32) and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), reference.float(), atol=2e-2, rtol=2e-2)


def offset_form(in_features, out_features, group_size, gen, bias=False):
    """A QuantLinear in the offset form (``w = code * scale + offset``, GGUF's Q4_1) with random codes,
    scales of both signs and offsets that are not whole steps."""
    q = QuantLinear(in_features, out_features, 4, group_size, bias=bias, offset=True, impl="torch")
    groups = (out_features, in_features // group_size)
    with torch.no_grad():
        q.codes.copy_(pack_int4(torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)))
        q.scale.copy_((torch.randn(groups, generator=gen) * 0.1).half())
        q.offset.copy_((torch.randn(groups, generator=gen) * 0.3).half())
        if bias:
            q.bias.copy_(torch.randn(out_features, generator=gen))
    return q


def test_offset_form_computes_code_times_scale_plus_offset(gen):
    by_hand = QuantLinear(4, 1, 4, group_size=4, offset=True)
    with torch.no_grad():
        by_hand.codes.copy_(pack_int4(torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)))
        by_hand.scale.fill_(0.5)
        by_hand.offset.fill_(-1.25)  # not a whole number of steps: no integer zero point gives it
    assert by_hand.dequantized_weight().tolist() == [[-0.75, -0.25, 0.25, 6.25]], "w = code * 0.5 - 1.25"
    q = offset_form(64, 8, 32, gen)
    codes = unpack_int4(q.codes).float().view(8, 2, 32)
    expected = (codes * q.scale.float()[..., None] + q.offset.float()[..., None]).view(8, 64)
    assert torch.equal(q.dequantized_weight(), expected), "w = code * scale + offset, per group of 32"
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(q(x), x @ expected.T)
    assert q.zero is None and q.weight_bytes == 8 * 32 + 8 * 2 * (2 + 2), "codes + float16 scales + float16 offsets"
    assert "offset" in q.state_dict() and "zero" not in q.state_dict()


def test_offset_form_is_four_bits_only(gen):
    with pytest.raises(ValueError, match="offset"):
        QuantLinear(64, 8, bits=8, group_size=32, offset=True)
    pytest.importorskip("triton")
    from effml_lib.kernels.quant_matmul import quant_matmul

    q = offset_form(64, 8, 32, gen)
    x = torch.randn(2, 64, generator=gen)
    with pytest.raises(ValueError, match="offset"):  # both a zero point and an offset: which one?
        quant_matmul(x, q.codes, q.scale, torch.zeros_like(q.scale, dtype=torch.uint8), None, 4, 32, 64, offset=q.offset)
    with pytest.raises(ValueError, match="offset"):
        quant_matmul(x, q.codes, q.scale, None, None, 8, 32, 64, offset=q.offset)


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_triton_kernel_equals_the_reference_in_the_offset_form(gen, path):
    """The kernels add the float16 offset where the zero-point form subtracts zero * scale."""
    pytest.importorskip("triton")
    from effml_lib.kernels.quant_matmul import GEMV_MAX_ROWS, quant_matmul

    q = offset_form(96, 40, 32, gen, bias=True)
    x = torch.randn(GEMV_MAX_ROWS + 1 if path == "gemm" else 3, 96, generator=gen)
    if torch.cuda.is_available():
        q, x = q.cuda(), x.cuda()
    tiles = {"block_n": 8, "chunks": 2, "num_warps": 1}
    gemm = {"block_n": 16, "block_k": 128, "num_warps": 1}
    out = quant_matmul(x, q.codes, q.scale, None, q.bias, 4, 32, 96, gemv=tiles, gemm=gemm, offset=q.offset)
    torch.testing.assert_close(out, q(x), atol=1e-4, rtol=1e-4)
    if torch.cuda.is_available():  # the layer's own forward: the custom operator with its default tiles
        reference = q(x)
        q.impl = "triton"
        torch.testing.assert_close(q(x), reference, atol=1e-4, rtol=1e-4)


def test_quant_linear_rejects_an_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        QuantLinear(64, 8, impl="cuda")


@pytest.mark.gpu
def test_fused_projections_on_the_gpu_kernels_equal_the_separate_layers(gen):
    """Quantized q/k/v (and gate/up) fused into one layer run one GEMV over the stacked rows; each
    output row is the same sum as in its own layer's GEMV, so a decode step's logits agree."""
    import copy

    from effml_lib.kvcache import StaticKVCache
    from effml_lib.model import ModelConfig, Transformer, fuse_projections

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=128, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, max_seq_len=16)
    model = Transformer(config).eval().to("cuda", torch.bfloat16)
    fused = quantize_model(fuse_projections(copy.deepcopy(model)), 4, 32, impl="triton")
    model = quantize_model(model, 4, 32, impl="triton")
    tokens = torch.randint(0, 128, (1, 9), generator=gen).cuda()
    logits = []
    with torch.no_grad():
        for m in (model, fused):
            cache = StaticKVCache.for_model(m, batch_size=1)
            m(tokens[:, :8], cache, 0)  # the prefill: the GEMM
            logits.append(m(tokens[:, 8:], cache, 8).float())  # one step: the GEMV
    torch.testing.assert_close(logits[1], logits[0], atol=1e-2, rtol=1e-2)
