# %% [markdown] nbgrader={"grade_id": "intro", "locked": true}
# # Lab 05 · Quantization
#
# You will store weights as small integers and a scale per group: quantize and dequantize them
# (symmetric and asymmetric), pack two 4-bit codes into each byte, decode the 4-bit block format that
# llama.cpp's GGUF files use (SmolLM2's among them), and build a weight-only quantized linear layer that
# keeps the course model's loss close to the unquantized one. Part 5 measures what packing saves and
# what it costs. Notebook `05_quantization` explains each piece; read it first.
#
# Each part asks for a function of the library, under the library's name and with its arguments:
# `quantize`, `dequantize`, `pack_int4`, `unpack_int4` and `QuantLinear` of `effml_lib.quant`, and
# `dequantize_q4_1` of `effml_lib.checkpoints`. How this lab is graded: each part has **visible tests**
# (run them as often as you like; a failure says what is wrong) and a **graded cell** whose hidden tests
# decide that part's points (12 in all). While your code is graded, the library's quantization
# (`effml_lib.quant`, all but its `QTensor` container) and its GGUF block decoders are unavailable, and so
# is the `gguf` package (its own decoder would answer part 3), so call your own functions. Do not edit or
# delete the read-only cells.

# %% shared="colab_setup" nbgrader={"grade_id": "colab_setup", "locked": true}

# %% nbgrader={"grade_id": "imports", "locked": true}
import math

import torch
import torch.nn.functional as F
from torch import nn

from effml_lib.checkpoints import pretrained
from effml_lib.quant import QTensor  # the library's container for a quantized tensor: your quantize returns one

torch.manual_seed(0)


def answer(what, fn, *args):
    # fn(*args), or a failure that names the input form it was given
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - say which input form it was
        name = getattr(fn, "__name__", type(fn).__name__)
        raise AssertionError(f"{what}: your {name} raised {type(error).__name__}: {error}") from error


def expect_value_error(call, name, what):
    # call() must raise a ValueError whose message names `name`
    try:
        call()
    except ValueError as error:
        assert name in str(error), f"the ValueError for {what} should name {name}, got: {error}"
    except Exception as error:
        raise AssertionError(f"{what} should raise a ValueError naming {name}, got {type(error).__name__}: {error}")
    else:
        raise AssertionError(f"{what} must raise a ValueError naming {name}")


# %% [markdown] nbgrader={"grade_id": "p1_intro", "locked": true}
# ## Part 1 · Quantize and dequantize, one scale per group (3 points)
#
# A group of numbers `w` becomes integer **codes** `c` and a **scale** `s` (and, asymmetric, an integer
# **zero point** `z`) such that `w ≈ (c − z) · s`. Groups run along the last dimension:
# `group_size=None` makes each row one group (one scale per output channel of an `(out, in)` weight), an
# integer `g` makes each `g` consecutive elements of a row a group (`g` must divide the row's length).
#
# * **Symmetric** (`symmetric=True`): `s = max|w| / (2^(bits−1) − 1)` over the group,
#   `c = clamp(round(w / s), −(2^(bits−1) − 1), 2^(bits−1) − 1)`, no zero point. At 8 bits the codes are
#   −127 … 127 (−128 stays unused, so the range is symmetric), at 4 bits −7 … 7.
# * **Asymmetric** (`symmetric=False`): the group's range is widened to hold 0,
#   `lo = min(min w, 0)`, `hi = max(max w, 0)`, and split into `2^bits − 1` steps: `s = (hi − lo) / (2^bits − 1)`,
#   `z = clamp(round(−lo / s), 0, 2^bits − 1)` (the code of 0.0, which is then exact), and
#   `c = clamp(round(w / s) + z, 0, 2^bits − 1)`: codes 0 … 255 at 8 bits, 0 … 15 at 4 bits.
#
# Rounding to the nearest code (`torch.round`) makes every element's error at most half a step:
# `|(c − z) · s − w| ≤ s / 2`. An all-zero group has no range: give it `s = 1`, never a division by zero;
# its codes are then 0, and it comes back as exact zeros. Asymmetric, its zero point is 0 (the code of 0.0);
# symmetric, there is no zero point, for it as for every group: the QTensor's `zero` is None. Compute in
# float32 whatever `w`'s dtype.
#
# `quantize(w, bits=8, group_size=None, symmetric=True)` returns the library's
# `QTensor(codes, scale, zero, bits, group_size, shape, dtype)`:
#
# * `codes` of `w`'s shape: `torch.int8` symmetric, `torch.uint8` asymmetric;
# * `scale` float32 and `zero` uint8 (None when symmetric), one entry per group: shape
#   `(*w.shape[:-1], n_groups)` (`n_groups = 1` with `group_size=None`);
# * `bits` and `group_size` as given (None stays None), `shape = w.shape`, `dtype = w.dtype`.
#
# Raise a `ValueError` whose message names `bits` when `bits` is not an int in 2 … 8, and one that names
# `group_size` when it is not a positive int dividing `w`'s last dimension.
#
# `dequantize(qt)` returns `(codes − zero) · scale` per group (no zero point when `qt.zero` is None),
# computed in float32, of shape `qt.shape` and in dtype `qt.dtype`: a bfloat16 weight comes back in
# bfloat16. Apply the formula as it is, sign and all: a scale may be negative. GGUF's Q4_0 format
# (symmetric 4-bit, blocks of 32, `w = d · (q − 8)`) takes its float16 scale from the block's weight of
# largest magnitude *with its sign*, `d = w_max / −8`, so `d` is negative whenever that weight is positive.
# (Q8_0's float16 scale is `max|w| / 127`, never negative; its int8 codes carry the signs.)

# %% nbgrader={"grade_id": "p1_solution", "solution": true}
def quantize(w, bits=8, group_size=None, symmetric=True):
    ### BEGIN SOLUTION
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    n = w.shape[-1]
    group = n if group_size is None else group_size
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or n % group:
        raise ValueError(f"group_size {group_size!r} must be a positive int dividing w's last dimension {n}")
    groups = w.float().reshape(*w.shape[:-1], n // group, group)  # (..., n_groups, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(dim=-1) / qmax  # (..., n_groups)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: scale 1, codes 0
        codes = torch.round(groups / scale[..., None]).clamp(-qmax, qmax).to(torch.int8)
        zero = None
    else:
        levels = 2**bits - 1
        low = groups.amin(dim=-1).clamp(max=0.0)  # the range holds 0.0
        high = groups.amax(dim=-1).clamp(min=0.0)
        scale = (high - low) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-low / scale).clamp(0, levels)  # the code of 0.0
        codes = (torch.round(groups / scale[..., None]) + zero_point[..., None]).clamp(0, levels).to(torch.uint8)
        zero = zero_point.to(torch.uint8)
    return QTensor(codes.reshape(w.shape), scale, zero, bits, group_size, w.shape, w.dtype)
    ### END SOLUTION


def dequantize(qt):
    ### BEGIN SOLUTION
    n = qt.shape[-1]
    group = n if qt.group_size is None else qt.group_size
    groups = qt.codes.float().reshape(*qt.shape[:-1], n // group, group)  # (..., n_groups, group)
    if qt.zero is not None:
        groups = groups - qt.zero.float()[..., None]
    return (groups * qt.scale.float()[..., None]).reshape(qt.shape).to(qt.dtype)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p1_visible", "locked": true}
# Visible tests for part 1: per channel and per group (odd sizes too), 2 to 8 bits, both schemes, any
# leading shape, all-equal and all-zero groups, 16-bit inputs, the errors; then dequantize
from effml_lib import quant as library  # the library's quantize/dequantize: the definitions to compare with (unavailable while graded)


def fields(qt):
    names = ("codes", "scale", "zero", "bits", "group_size", "shape", "dtype")
    missing = [n for n in names if not hasattr(qt, n)]
    assert not missing, f"quantize must return a QTensor (fields {', '.join(names)}), got a {type(qt).__name__}"
    return qt


def check_quantize(what, w, bits, group_size, symmetric):
    scheme = "symmetric" if symmetric else "asymmetric"
    what = f"{what}, {bits} bits, group_size={group_size}, {scheme}"
    try:
        qt = fields(quantize(w, bits, group_size, symmetric))
    except Exception as error:  # noqa: BLE001 - say which input form it was
        raise AssertionError(f"{what}: your quantize raised {type(error).__name__}: {error}") from error
    expected = library.quantize(w, bits, group_size, symmetric)
    assert isinstance(qt.codes, torch.Tensor) and qt.codes.shape == w.shape, (
        f"{what}: codes must have w's shape {tuple(w.shape)}, got {getattr(qt.codes, 'shape', type(qt.codes).__name__)}")
    code_dtype = torch.int8 if symmetric else torch.uint8
    assert qt.codes.dtype == code_dtype, f"{what}: codes must be {code_dtype}, got {qt.codes.dtype}"
    assert isinstance(qt.scale, torch.Tensor) and qt.scale.dtype == torch.float32 and qt.scale.shape == expected.scale.shape, (
        f"{what}: scale must be float32 of shape (*w.shape[:-1], n_groups) = {tuple(expected.scale.shape)}, got "
        f"{getattr(qt.scale, 'dtype', type(qt.scale).__name__)} {tuple(getattr(qt.scale, 'shape', ()))}")
    assert (qt.bits, qt.group_size, tuple(qt.shape), qt.dtype) == (bits, group_size, tuple(w.shape), w.dtype), (
        f"{what}: the QTensor must say bits={bits}, group_size={group_size} (as given), shape={tuple(w.shape)}, "
        f"dtype={w.dtype}; got {qt.bits}, {qt.group_size}, {tuple(qt.shape)}, {qt.dtype}")
    rule = ("max|w| / (2**(bits-1) - 1)" if symmetric else
            "(hi - lo) / (2**bits - 1), the group's range widened to hold 0") + " per group, computed in float32"
    assert torch.allclose(qt.scale, expected.scale, rtol=1e-6, atol=0), f"{what}: wrong scale: it is {rule}"
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        assert qt.zero is None, f"{what}: symmetric quantization has no zero point (zero=None)"
        assert qt.codes.abs().max() <= qmax, f"{what}: symmetric codes lie in -{qmax} .. {qmax}"
    else:
        assert isinstance(qt.zero, torch.Tensor) and qt.zero.dtype == torch.uint8 and qt.zero.shape == expected.zero.shape, (
            f"{what}: zero must be uint8 of the scale's shape {tuple(expected.zero.shape)}")
        assert torch.equal(qt.zero, expected.zero), f"{what}: wrong zero point: the code of 0.0, round(-lo / scale)"
        assert qt.codes.max() <= 2**bits - 1, f"{what}: asymmetric codes lie in 0 .. {2**bits - 1}"
    # Your codes, read back by the library's dequantize: in each group, the largest error is at most half its step
    n = w.shape[-1]
    back = library.dequantize(QTensor(qt.codes, qt.scale, qt.zero, bits, group_size, w.shape))
    worst = (back - w.float()).abs().reshape(*w.shape[:-1], n // (n if group_size is None else group_size), -1).amax(-1)
    assert (worst <= qt.scale / 2 * (1 + 1e-5) + 1e-7).all(), (
        f"{what}: an element is more than half a step (scale / 2) from its code: round to the nearest code")
    return qt


def outliers(*shape):
    w = torch.randn(*shape)
    w[..., 1] *= 20  # one large input channel, as real layers have
    return w


FORMS = [  # (what, w, bits, group_size)
    ("an (8, 64) weight per channel", outliers(8, 64), 8, None),
    ("an (6, 64) weight in groups of 16", outliers(6, 64), 4, 16),
    ("a (5, 21) weight in groups of 7 (odd)", torch.randn(5, 21), 4, 7),
    ("a (3, 4, 15) tensor in groups of 5", torch.randn(3, 4, 15), 3, 5),
    ("a (4, 32) weight in groups of 8", torch.randn(4, 32), 2, 8),
    ("a vector of 48 in groups of 16", torch.randn(48), 8, 16),
]
for what, w, bits, group_size in FORMS:
    for symmetric in (True, False):
        check_quantize(what, w, bits, group_size, symmetric)

# Worked by hand: one row, 3 bits. Symmetric: scale 2 / 3, codes round([-1.8, -0.3, 0.6, 3]) = [-2, 0, 1, 3].
w = torch.tensor([[-1.2, -0.2, 0.4, 2.0]])
qt = answer("w = [[-1.2, -0.2, 0.4, 2.0]], 3 bits, symmetric", quantize, w, 3)
assert qt.codes.tolist() == [[-2, 0, 1, 3]] and math.isclose(qt.scale.item(), 2 / 3, rel_tol=1e-6), (
    f"3 bits symmetric: scale = 2 / 3 and codes [-2, 0, 1, 3], got {qt.scale.tolist()} and {qt.codes.tolist()}")
# Asymmetric, 2 bits: the range [-1.2, 2] in 3 steps of 3.2 / 3; 0.0 is code round(1.2 / (3.2 / 3)) = 1.
qa = answer("w = [[-1.2, -0.2, 0.4, 2.0]], 2 bits, asymmetric", quantize, w, 2, None, False)
assert qa.zero.tolist() == [[1]] and qa.codes.tolist() == [[0, 1, 1, 3]] and math.isclose(qa.scale.item(), 3.2 / 3, rel_tol=1e-6), (
    f"2 bits asymmetric: scale 3.2 / 3, zero point 1, codes [0, 1, 1, 3]; got {qa.scale.tolist()}, "
    f"{qa.zero.tolist()}, {qa.codes.tolist()}")

# All-equal groups: their range is one value (widened to hold 0); an all-zero group has no range at all
flat = torch.tensor([[0.0] * 4 + [3.5] * 4 + [-2.25] * 4 + [1.0, -1.0, 0.5, 0.0]] * 2)  # (2, 16): four groups of 4
for symmetric in (True, False):
    what = f"groups of 4 that are all 0, all 3.5, all -2.25 ({'symmetric' if symmetric else 'asymmetric'})"
    qt = check_quantize("all-equal groups", flat, 4, 4, symmetric)
    assert torch.isfinite(qt.scale).all() and qt.scale[:, 0].eq(1).all(), f"{what}: an all-zero group gets scale 1, not NaN"
    back = answer(what, dequantize, qt)
    assert torch.isfinite(back).all() and back[:, :4].eq(0).all(), f"{what}: an all-zero group must come back as exact zeros"

# bfloat16 and float16 weights: quantized in float32, dequantized back to their own dtype
for dtype in (torch.bfloat16, torch.float16):
    for bits, group_size in ((8, 32), (4, 16)):
        for symmetric in (True, False):
            check_quantize(f"a {dtype} (6, 64) weight", outliers(6, 64).to(dtype), bits, group_size, symmetric)

expect_value_error(lambda: quantize(torch.randn(4, 64), bits=1), "bits", "bits=1")
expect_value_error(lambda: quantize(torch.randn(4, 64), bits=9), "bits", "bits=9")
expect_value_error(lambda: quantize(torch.randn(4, 64), 4, group_size=5), "group_size", "group_size=5 for rows of 64")
expect_value_error(lambda: quantize(torch.randn(4, 64), 4, group_size=0), "group_size", "group_size=0")


def check_dequantize(what, qt):
    try:
        out = dequantize(qt)
    except Exception as error:  # noqa: BLE001 - say which input form it was
        raise AssertionError(f"{what}: your dequantize raised {type(error).__name__}: {error}") from error
    expected = library.dequantize(qt)
    assert isinstance(out, torch.Tensor) and out.shape == expected.shape and out.dtype == expected.dtype, (
        f"{what}: dequantize returns qt.shape {tuple(qt.shape)} in qt.dtype {qt.dtype}, got "
        f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    tolerance = 1e-6 if qt.dtype == torch.float32 else 2**-7  # a 16-bit result: one rounding step
    assert torch.allclose(out.double(), expected.double(), rtol=tolerance, atol=1e-6), (
        f"{what}: wrong values: (codes - zero) * scale per group, in float32, then qt.dtype")


for what, w, bits, group_size in FORMS:
    for symmetric in (True, False):
        check_dequantize(f"{what}, {bits} bits, {'symmetric' if symmetric else 'asymmetric'}",
                         library.quantize(w, bits, group_size, symmetric))
for dtype in (torch.bfloat16, torch.float16):
    check_dequantize(f"a {dtype} weight (6, 64), 4 bits in groups of 16, asymmetric",
                     library.quantize(outliers(6, 64).to(dtype), 4, 16, symmetric=False))
signed = QTensor(codes=torch.tensor([[3, 12, 0, 15]], dtype=torch.uint8), scale=torch.tensor([[-0.5]]),
                 zero=torch.tensor([[8]], dtype=torch.uint8), bits=4, group_size=None, shape=torch.Size([1, 4]))
check_dequantize("a negative scale (-0.5, zero point 8)", signed)
assert dequantize(signed).tolist() == [[2.5, -2.0, 4.0, -3.5]], "(codes - zero) * scale with scale -0.5: [2.5, -2, 4, -3.5]"
w = outliers(6, 64)
back = answer("dequantize(quantize(w, 4, 16, symmetric=False)), w (6, 64)", dequantize, quantize(w, 4, 16, symmetric=False))
assert back.shape == w.shape and (back - w).abs().max() < 20 * 0.1, "your dequantize(quantize(w)) must come back close to w"
print("part 1: visible tests passed")

# %% nbgrader={"grade_id": "p1_tests"} graded={"part": "quantize"}

# %% [markdown] nbgrader={"grade_id": "p2_intro", "locked": true}
# ## Part 2 · Two 4-bit codes per byte (2 points)
#
# A 4-bit code takes half a byte, so a 4-bit model stores two per byte: `pack_int4(codes)` (the library's
# `effml_lib.quant.pack_int4`) takes integer codes in 0 … 15 of shape `(..., 2n)` (any integer dtype) and
# returns uint8 `(..., n)` where byte `i` of a row holds element `2i` in its **low nibble** and element
# `2i + 1` in its **high nibble**:
#
# `packed[..., i] = codes[..., 2i] | (codes[..., 2i + 1] << 4)`, so the pair (1, 2) is the byte 0x21 = 33.
#
# `unpack_int4(packed)` undoes it: uint8 `(..., n)` to uint8 codes `(..., 2n)`. Raise a `ValueError`
# whose message names `codes` when the last dimension is odd, or when a code lies outside 0 … 15: the
# unsigned codes of asymmetric 4-bit quantization fit, but the symmetric ones (−7 … 7) must first be
# shifted by 8, as GGUF's Q4_0 format does.

# %% nbgrader={"grade_id": "p2_solution", "solution": true}
def pack_int4(codes):
    ### BEGIN SOLUTION
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"codes' last dimension must be even (two codes per byte), got shape {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"codes must lie in 0..15, got {codes.min().item()} to {codes.max().item()}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)  # element 2i low, 2i + 1 high
    ### END SOLUTION


def unpack_int4(packed):
    ### BEGIN SOLUTION
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)  # (..., n, 2) -> (..., 2n): low nibble first
    ### END SOLUTION


# %% nbgrader={"grade_id": "p2_visible", "locked": true}
# Visible tests for part 2: the nibble order, every pair of codes, any leading shape and integer dtype, the errors
def packs(what, codes):
    try:
        packed = pack_int4(codes)
    except Exception as error:  # noqa: BLE001 - say which input form it was
        raise AssertionError(f"{what}: your pack_int4 raised {type(error).__name__}: {error}") from error
    expected_shape = (*codes.shape[:-1], codes.shape[-1] // 2)
    assert isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8 and packed.shape == expected_shape, (
        f"{what}: pack_int4 returns uint8 of shape (..., n) = {expected_shape}, got "
        f"{getattr(packed, 'dtype', type(packed).__name__)} {tuple(getattr(packed, 'shape', ()))}")
    return packed


assert packs("the pair (1, 2)", torch.tensor([1, 2])).tolist() == [0x21], (
    "element 2i goes in the low nibble, element 2i + 1 in the high one: (1, 2) is 0x21 = 33")
assert packs("(15, 0) and (0, 15)", torch.tensor([[15, 0], [0, 15]])).tolist() == [[15], [240]], (
    "(15, 0) packs to 15 (0x0F) and (0, 15) to 240 (0xF0)")
pairs = torch.tensor([[low, high] for high in range(16) for low in range(16)])  # (256, 2): every pair of codes
assert torch.equal(packs("every pair of codes", pairs)[:, 0], torch.arange(256, dtype=torch.uint8)), (
    "every pair (low, high) must pack to the byte low + 16 * high")
every_byte = torch.arange(256, dtype=torch.uint8)
unpacked = answer("the 256 bytes 0..255", unpack_int4, every_byte)
assert isinstance(unpacked, torch.Tensor) and unpacked.dtype == torch.uint8 and unpacked.shape == (512,), (
    f"unpack_int4 of 256 bytes returns uint8 of shape (512,), got {getattr(unpacked, 'dtype', type(unpacked).__name__)} "
    f"{tuple(getattr(unpacked, 'shape', ()))}")
assert torch.equal(unpacked.view(256, 2), pairs.to(torch.uint8)), "unpack_int4 gives the low nibble first, then the high one"
for shape in ((10,), (6, 16), (2, 3, 8)):
    for dtype in (torch.uint8, torch.int8, torch.int32, torch.int64):
        codes = torch.randint(0, 16, shape).to(dtype)
        what = f"codes of shape {shape} in {dtype}"
        packed = packs(what, codes)
        assert torch.equal(packed, library.pack_int4(codes)), f"{what}: wrong bytes (element 2i in the low nibble of byte i)"
        back = answer(what, unpack_int4, packed)
        assert back.dtype == torch.uint8 and torch.equal(back, codes.to(torch.uint8)), (
            f"{what}: unpack_int4(pack_int4(codes)) must give the codes back, as uint8 of shape {shape}")
asymmetric = library.quantize(torch.randn(4, 64), 4, 16, symmetric=False).codes  # uint8 codes in 0..15
assert torch.equal(answer("asymmetric 4-bit codes (4, 64)", unpack_int4, packs("asymmetric 4-bit codes (4, 64)", asymmetric)),
                   asymmetric), "asymmetric 4-bit codes pack and unpack losslessly"
expect_value_error(lambda: pack_int4(torch.zeros(3, 5, dtype=torch.uint8)), "codes", "codes with an odd last dimension (3, 5)")
expect_value_error(lambda: pack_int4(torch.tensor([3, 16])), "codes", "a code of 16")
expect_value_error(lambda: pack_int4(torch.tensor([-1, 7], dtype=torch.int8)), "codes", "a code of -1 (a symmetric code, not shifted)")
print("part 2: visible tests passed")

# %% nbgrader={"grade_id": "p2_tests"} graded={"part": "packing"}

# %% [markdown] nbgrader={"grade_id": "p3_intro", "locked": true}
# ## Part 3 · A real format: GGUF's Q4_1 blocks (2 points)
#
# llama.cpp's GGUF files store a quantized weight as a run of **blocks** of 32 consecutive weights of a
# row. SmolLM2-135M-Instruct, as the course fetches it, is mostly **Q4_1**: asymmetric 4-bit quantization
# with groups of 32. One block is 20 bytes:
#
# | bytes | what |
# |---|---|
# | 0–1 | `d`, the scale, float16 (little-endian, as GGUF files are) |
# | 2–3 | `m`, the block's minimum, float16 |
# | 4–19 | `qs`, 16 bytes of 4-bit codes: byte `j` holds weight `j` in its **low** nibble and weight `j + 16` in its **high** nibble |
#
# and weight `i` of the block is `w_i = d · q_i + m`. That is part 1's asymmetric scheme with the zero point
# stored as a float, `m = −d · z`, which need not be a whole number of steps. Mind the nibble order: not
# part 2's neighbours (`2i`, `2i + 1`) but halves (`j`, `j + 16`), so that a kernel unpacks the block's first
# 16 weights with one mask and the last 16 with one shift.
#
# `dequantize_q4_1(blocks)` (the library's `effml_lib.checkpoints.dequantize_q4_1`) takes a uint8 tensor of
# blocks, shape `(..., 20)` (one block `(20,)`, a run of them `(n, 20)`, a tensor's rows of blocks
# `(rows, blocks_per_row, 20)`), and returns float32 `(..., 32)`. Raise a `ValueError` whose message names
# `blocks` when the last dimension is not 20. Two bytes become a float16 without arithmetic:
# `b[..., 0:2].view(torch.float16)` reinterprets them (shape `(..., 1)`), sign, exponent and all, so a
# negative `d`, `m = −0.0` or a tiny (subnormal) `d` come out right.
#
# When the course's set-up step has fetched SmolLM2's file (`make models`), the cell below also reads one
# of its Q4_1 tensors with `gguf.GGUFReader` and checks your decoder on its real blocks. Without the file
# (on Colab before the set-up step, or while your notebook is graded, where none of your files can be
# seen) it uses blocks made here, which hold every case a real file does; the grade never depends on it.

# %% nbgrader={"grade_id": "p3_solution", "solution": true}
def dequantize_q4_1(blocks):
    ### BEGIN SOLUTION
    if blocks.dim() == 0 or blocks.shape[-1] != 20:
        raise ValueError(f"blocks must have shape (..., 20) (one Q4_1 block of 32 weights per row), got {tuple(blocks.shape)}")
    b = blocks.contiguous()
    d = b[..., 0:2].view(torch.float16).float()  # (..., 1)
    m = b[..., 2:4].view(torch.float16).float()
    qs = b[..., 4:]  # (..., 16)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()  # weights 0..15 from the low nibbles, 16..31 from the high
    return d * q + m  # (..., 32)
    ### END SOLUTION


# %% nbgrader={"grade_id": "p3_visible", "locked": true}
# Visible tests for part 3: blocks made by hand, every shape of a run of blocks, signs, zero and tiny
# scales, random bytes, the error; and SmolLM2's own blocks when its file is here
from effml_lib import checkpoints  # checkpoints.dequantize_q4_1: the definition to compare with (unavailable while graded)


def q4_1_block(d, m, codes):
    # One Q4_1 block by hand: d and m as float16 bytes, then weight j in the low nibble of byte j, weight j + 16 in its high
    codes = torch.as_tensor(codes, dtype=torch.uint8)
    head = torch.tensor([d, m], dtype=torch.float16).view(torch.uint8)  # 4 bytes, little-endian
    return torch.cat([head, codes[:16] | (codes[16:] << 4)])  # (20,)


def decodes(what, blocks, expected):
    try:
        out = dequantize_q4_1(blocks)
    except Exception as error:  # noqa: BLE001 - say which input form it was
        raise AssertionError(f"{what}: your dequantize_q4_1 raised {type(error).__name__}: {error}") from error
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == expected.shape, (
        f"{what}: blocks {tuple(blocks.shape)} decode to float32 {tuple(expected.shape)}, got "
        f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6), (
        f"{what}: wrong weights: w = d * q + m, where byte j holds weight j (low nibble) and weight j + 16 (high nibble), "
        f"not part 2's neighbours")
    return out


codes = torch.arange(32) % 16  # weights 0..15 and 16..31 get the codes 0..15 again
one = decodes("one block (20,): d = 0.5, m = -1", q4_1_block(0.5, -1.0, codes), 0.5 * codes.float() - 1.0)
assert one[16].item() == -1.0 and one[1].item() == -0.5, "weight 16 is the high nibble of byte 0 (code 0): -1.0; weight 1: -0.5"
by_hand = [  # (what, d, m): signs, a zero scale, a tiny (subnormal) one, a large one
    ("d = 0.25, m = -2", 0.25, -2.0), ("a negative scale d = -0.5", -0.5, 3.0), ("a negative minimum m = -7.5", 0.125, -7.5),
    ("d = 0: every weight is m", 0.0, 1.5), ("a subnormal d = 2^-20", 2**-20, 0.0), ("m = -0.0", 0.75, -0.0),
    ("a large d = 1000", 1000.0, -512.0),
]
codes = torch.randint(0, 16, (len(by_hand), 32))
blocks = torch.stack([q4_1_block(d, m, c) for (_, d, m), c in zip(by_hand, codes)])  # (n, 20): a run of blocks
d = torch.tensor([d for _, d, _ in by_hand]).half().float()[:, None]
m = torch.tensor([m for _, _, m in by_hand]).half().float()[:, None]
out = decodes("a run of blocks (7, 20), made by hand", blocks, d * codes.float() + m)
for (what, _, _), row, expected in zip(by_hand, out, d * codes.float() + m):
    assert torch.equal(row, expected), f"the block with {what}: wrong weights"

random_blocks = torch.randint(0, 256, (6, 4, 20), dtype=torch.uint8)  # (rows, blocks per row, 20): random codes
random_blocks[..., :4] = (torch.randn(6, 4, 2) * 0.05).half().view(torch.uint8)  # and random finite d, m of either sign
decodes("a tensor's rows of blocks (6, 4, 20), random bytes", random_blocks, checkpoints.dequantize_q4_1(random_blocks))
expect_value_error(lambda: dequantize_q4_1(torch.zeros(3, 18, dtype=torch.uint8)), "blocks",
                   "blocks of 18 bytes (that is Q4_0's block; Q4_1's has 20)")

path = checkpoints.smollm2_path()  # the fetched GGUF file, or None
if path is None:
    print("SmolLM2's GGUF file is not here (`make models` fetches it): checked on the blocks made above")
else:
    import numpy as np
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    rows = int(tensor.shape[1])  # GGUF lists a tensor's dims fastest first: [576, 576] is (in, out)
    real = torch.from_numpy(np.array(tensor.data)).view(rows, -1, 20)  # (576 rows, 18 blocks of 32, 20 bytes)
    weights = decodes(f"SmolLM2's {tensor.name} ({tensor.tensor_type.name})", real, checkpoints.dequantize_q4_1(real))
    first = real[0, 0]
    print(f"SmolLM2's {tensor.name}: {tuple(real.shape)} blocks; the first has d = {first[:2].view(torch.float16).item():.4g}, "
          f"m = {first[2:4].view(torch.float16).item():.4g}; its weights:\n{weights[0, 0]}")
print("part 3: visible tests passed")

# %% nbgrader={"grade_id": "p3_tests"} graded={"part": "q4_1"}

# %% [markdown] nbgrader={"grade_id": "p4_intro", "locked": true}
# ## Part 4 · A weight-only quantized linear layer (3 points)
#
# `QuantLinear` (the library's `effml_lib.quant.QuantLinear`) replaces an `nn.Linear` by its weight in
# codes and scales; activations stay in 16 or 32 bits (W8A16, W4A16). Its constructor is given: it makes
# the buffers, in the library's layout, so that a checkpoint the library saves loads into yours and back:
#
# * `bits=8`: `codes` int8 `(out, in)`, symmetric (no zero point: `self.zero` is None);
# * `bits=4`: `codes` uint8 `(out, in / 2)`, asymmetric codes packed by your `pack_int4` (element `2i` of a
#   row in the low nibble of byte `i`), and `zero` uint8 `(out, n_groups)`;
# * `scale` **float16** `(out, n_groups)`, `n_groups = in / group_size` (`group_size=None`: one group per
#   row, stored as `self.group_size = in`); `bias` (a copy of the linear's, or None).
#
# Write
#
# * `QuantLinear.from_linear(linear, bits=4, group_size=128)`: a new layer (`cls(...)`) holding `linear`'s
#   weight quantized by your `quantize` (symmetric at 8 bits, asymmetric at 4) and a copy of its bias,
#   leaving `linear` as it was;
# * `dequantized_weight(dtype=torch.float32)`: the weight `(out, in)` the layer computes with,
#   `(codes − zero) · scale` per group from the buffers (scale as stored, in float16), in `dtype`;
# * `forward(x)`: `F.linear(x, self.dequantized_weight(x.dtype), bias)` (the bias in `x`'s dtype) for `x` of
#   shape `(..., in)` in any float dtype, returning `x`'s dtype. The weight is computed in float32 (as
#   `dequantized_weight` does) and only then cast to `x`'s dtype; the matmul runs in `x`'s dtype. The tests
#   compare your output with `x @ W.T + bias` computed in float32 from your buffers: within 10⁻⁵ absolute
#   plus 10⁻⁴ relative for a float32 `x`, within 3·10⁻² absolute plus 3·10⁻² relative (bfloat16's rounding)
#   for a bfloat16 `x`, so a float32 matmul cast back to bfloat16 passes as well. Compute the weight from
#   the buffers **at every call**: a float copy kept on the layer would take the memory quantization
#   saves, and a layer loaded with other buffers (`load_state_dict`) must compute with those.
#
# Each weight then differs from the original by at most half a step plus the scale's float16 rounding
# (a relative 2⁻¹¹, times codes up to 127). What that costs a model: effml-tiny with the 56 linear layers of
# its blocks replaced by yours (`effml_lib.model.replace_linears`; the LM head stays), on the first 512
# tokens of `optparse.py` (2 windows of 256; a file of the course corpus's held-out split), next-token
# cross-entropy in nats. **The rule:** the loss may rise by at most **0.01** at 8 bits per channel and by at
# most **0.08** at 4 bits in groups of 128. The cell below prints yours; the library's, on Python 3.11:
# unquantized 2.576, W8 per channel 2.576, W4 g128 2.605.

# %% nbgrader={"grade_id": "p4_solution", "solution": true}
class QuantLinear(nn.Module):
    # Buffers in the library's layout (given): codes, scale (float16), zero (4 bits only), bias (or None)

    def __init__(self, in_features, out_features, bits=4, group_size=128, bias=False):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 (W4A16) or 8 (W8A16), got {bits!r}")
        group = in_features if group_size is None else group_size
        if not isinstance(group, int) or group <= 0 or in_features % group or (bits == 4 and group % 2):
            raise ValueError(f"group_size {group_size!r} must be a positive int dividing in_features={in_features} "
                             f"(and even at 4 bits)")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group
        n_groups = in_features // group
        if bits == 8:
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.zero = None
        else:
            self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear, bits=4, group_size=128):
        ### BEGIN SOLUTION
        layer = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None)
        qt = quantize(linear.weight.detach(), bits, layer.group_size, symmetric=(bits == 8))
        with torch.no_grad():
            layer.codes.copy_(qt.codes if bits == 8 else pack_int4(qt.codes))
            layer.scale.copy_(qt.scale)  # rounded to float16, as stored
            if bits == 4:
                layer.zero.copy_(qt.zero)
            if linear.bias is not None:
                layer.bias = linear.bias.detach().clone()
        return layer
        ### END SOLUTION

    def dequantized_weight(self, dtype=torch.float32):
        ### BEGIN SOLUTION
        codes = self.codes if self.bits == 8 else unpack_int4(self.codes)  # (out, in)
        groups = codes.float().view(self.out_features, -1, self.group_size)  # (out, n_groups, group)
        if self.zero is not None:
            groups = groups - self.zero.float()[..., None]
        return (groups * self.scale.float()[..., None]).view(self.out_features, self.in_features).to(dtype)
        ### END SOLUTION

    def forward(self, x):
        ### BEGIN SOLUTION
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)
        ### END SOLUTION


# %% nbgrader={"grade_id": "p4_visible", "locked": true}
# Visible tests for part 4: the buffers of 8- and 4-bit layers (per channel, groups of 128, 32 and 6), with
# and without a bias; the weight and the output they give (float32 and bfloat16 inputs of any leading
# shape); a layer loaded with the library's buffers; then effml-tiny's loss
from effml_lib import quant as library  # the definitions to compare with (unavailable while graded)
from effml_lib.data import stdlib_root
from effml_lib.model import replace_linears
from effml_lib.tokenizer import load_tokenizer


def library_weight(codes, scale, zero, bits, group_size, shape):
    # The weight that buffers in the library's layout hold, by the library's unpack_int4 and dequantize
    unpacked = codes if bits == 8 else library.unpack_int4(codes)
    return library.dequantize(QTensor(unpacked, scale.float(), zero, bits, group_size, shape))


def check_layer(in_features, out_features, bias, bits, group_size):
    what = f"QuantLinear.from_linear(nn.Linear({in_features}, {out_features}, bias={bias}), bits={bits}, group_size={group_size})"
    linear = nn.Linear(in_features, out_features, bias=bias)
    weight = linear.weight.detach().clone()
    try:
        layer = QuantLinear.from_linear(linear, bits, group_size)
    except Exception as error:  # noqa: BLE001 - say which input form it was
        raise AssertionError(f"{what} raised {type(error).__name__}: {error}") from error
    assert torch.equal(linear.weight, weight), f"{what}: leave the linear layer as it was"
    group = in_features if group_size is None else group_size
    n_groups = in_features // group
    codes_form = (torch.int8, (out_features, in_features)) if bits == 8 else (torch.uint8, (out_features, in_features // 2))
    assert (layer.codes.dtype, tuple(layer.codes.shape)) == codes_form, (
        f"{what}: codes must be {codes_form[0]} {codes_form[1]}, got {layer.codes.dtype} {tuple(layer.codes.shape)}")
    assert layer.scale.dtype == torch.float16 and layer.scale.shape == (out_features, n_groups), (
        f"{what}: scale must be float16 ({out_features}, {n_groups}), got {layer.scale.dtype} {tuple(layer.scale.shape)}")
    if bits == 8:
        assert layer.zero is None, f"{what}: 8 bits is symmetric: no zero point (zero is None)"
    else:
        assert isinstance(layer.zero, torch.Tensor) and layer.zero.dtype == torch.uint8 and layer.zero.shape == (out_features, n_groups), (
            f"{what}: zero must be uint8 ({out_features}, {n_groups})")
    if bias:
        assert isinstance(layer.bias, torch.Tensor) and torch.equal(layer.bias, linear.bias.detach()), f"{what}: keep a copy of the bias"
    else:
        assert layer.bias is None, f"{what}: a linear without a bias gives a layer without one (bias None)"
    qt = library.quantize(weight, bits, group, symmetric=(bits == 8))
    assert torch.allclose(layer.scale.float(), qt.scale.half().float(), rtol=1e-3, atol=0), (
        f"{what}: wrong scales: {'symmetric' if bits == 8 else 'asymmetric'} quantization's, stored in float16")
    stored = library_weight(layer.codes, layer.scale, layer.zero, bits, group, weight.shape)
    step = layer.scale.float().repeat_interleave(group, dim=-1)
    assert ((stored - weight).abs() <= step / 2 * (1 + 1e-3) + weight.abs() * 2**-10 + 1e-7).all(), (
        f"{what}: your buffers, read in the library's layout, do not hold the weight"
        + ("" if bits == 8 else ": 4-bit codes packed by pack_int4 (element 2i of a row in the low nibble of byte i), asymmetric, "
                                 "with their zero points"))
    got = answer(what, layer.dequantized_weight)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and torch.allclose(got, stored, rtol=1e-6, atol=1e-7), (
        f"{what}: dequantized_weight() must give the float32 ({out_features}, {in_features}) weight the buffers hold")
    assert answer(what, layer.dequantized_weight, torch.bfloat16).dtype == torch.bfloat16, (
        f"{what}: dequantized_weight(torch.bfloat16) is bfloat16")
    b = None if linear.bias is None else linear.bias.detach()
    for x in (torch.randn(3, 7, in_features), torch.randn(5, in_features)):
        out = answer(f"{what}, x of shape {tuple(x.shape)}", layer, x)
        assert isinstance(out, torch.Tensor) and out.shape == (*x.shape[:-1], out_features) and out.dtype == x.dtype, (
            f"{what}: x of shape {tuple(x.shape)} gives {(*x.shape[:-1], out_features)} in x's dtype")
        assert torch.allclose(out, F.linear(x, stored, b), rtol=1e-4, atol=1e-5), (
            f"{what}: wrong output for x of shape {tuple(x.shape)}: x @ weight.T + bias, the weight from the buffers")
    x = torch.randn(2, 4, in_features).bfloat16()
    out = answer(f"{what}, a bfloat16 x (2, 4, {in_features})", layer, x)
    assert out.dtype == torch.bfloat16, f"{what}: a bfloat16 x gives a bfloat16 output, got {out.dtype}"
    assert torch.allclose(out.float(), F.linear(x.float(), stored, b), rtol=3e-2, atol=3e-2), (
        f"{what}: wrong output for a bfloat16 x (2, 4, {in_features}): compute with the weight and bias in bfloat16")
    return layer


for shape in ((256, 96, True, 4, 128), (256, 40, False, 4, 32), (64, 16, False, 4, None), (48, 20, True, 4, 6),
              (96, 48, True, 8, None), (64, 24, False, 8, 16)):
    check_layer(*shape)

# A layer loaded with buffers the library made (as from a checkpoint), then with others: it computes with what it holds now
for bits, group_size in ((4, 32), (8, None)):
    what = f"QuantLinear(64, 24, bits={bits}, group_size={group_size}, bias=True) after load_state_dict"
    layer = QuantLinear(64, 24, bits, group_size, bias=True)
    x = torch.randn(5, 64)
    for round_ in ("first", "second"):
        weight, bias = torch.randn(24, 64), torch.randn(24)
        qt = library.quantize(weight, bits, 64 if group_size is None else group_size, symmetric=(bits == 8))
        state = {"codes": qt.codes if bits == 8 else library.pack_int4(qt.codes), "scale": qt.scale.half(), "bias": bias}
        if bits == 4:
            state["zero"] = qt.zero
        answer(f"{what} ({round_} time)", layer.load_state_dict, state)
        expected = F.linear(x, library_weight(state["codes"], state["scale"], qt.zero, bits, qt.group_size or 64, (24, 64)), bias)
        assert torch.allclose(answer(f"{what} ({round_} time)", layer, x), expected, rtol=1e-4, atol=1e-5), (
            f"{what} ({round_} time): wrong output: compute the weight from the buffers at every call, reading them in the "
            f"library's layout")

tokenizer = load_tokenizer()
held_out = torch.tensor(tokenizer.encode((stdlib_root() / "optparse.py").read_text())[:512]).view(2, 256)


def held_out_loss(model):
    # Mean next-token cross-entropy (nats) over 2 windows of 256 tokens of optparse.py (a held-out file)
    with torch.no_grad():
        logits = model(held_out[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), held_out[:, 1:].flatten()).item()


unquantized = held_out_loss(pretrained("effml-tiny"))
print(f"effml-tiny, unquantized: held-out loss {unquantized:.3f}")
for bits, group_size, margin in ((8, None, 0.01), (4, 128, 0.08)):
    model = pretrained("effml-tiny")
    replace_linears(model, lambda name, linear: QuantLinear.from_linear(linear, bits, group_size))  # the blocks' 56
    loss = held_out_loss(model)
    print(f"effml-tiny, your W{bits} {'per channel' if group_size is None else f'g{group_size}'}: {loss:.3f} "
          f"(+{loss - unquantized:.3f}; allowed +{margin})")
    assert loss <= unquantized + margin, (
        f"effml-tiny with your W{bits} group_size={group_size} layers: held-out loss {loss:.3f}, more than {margin} above "
        f"the unquantized {unquantized:.3f}")
print("part 4: visible tests passed")

# %% nbgrader={"grade_id": "p4_tests"} graded={"part": "quant_linear"}

# %% [markdown] nbgrader={"grade_id": "p5_intro", "locked": true}
# ## Part 5 · What packing saves, and what it costs (2 points)
#
# `model_bytes(model)` returns, as an `int`, the bytes of every tensor in `model.state_dict()` (parameters
# and buffers: a `QuantLinear`'s codes, scales, zero points and bias) — what the model takes in memory and
# in a checkpoint. A tensor stored under two names counts once: a tied embedding and LM head are one
# tensor (`tensor.data_ptr()`, the address of its first element, tells such names apart from two
# tensors; two `nn.Parameter`s may share one tensor's memory).
#
# Per weight of a linear layer: float16 takes 2 bytes; W8 per channel `1 + 2 / in` (a float16 scale per
# row); W4 in groups of 128 `1/2 + (2 + 1) / 128 ≈ 0.523` bytes (4.19 bits: the code, a float16 scale and a
# uint8 zero point per 128 weights).
#
# Saving bytes does not make a layer fast by itself. `QuantLinear.forward` unpacks and dequantizes the whole
# weight at every call before one matmul: on a GPU a fused kernel (the library's, in Triton) reads the
# packed bytes once, and a decode step, bound by memory, gets faster; in plain PyTorch on a CPU the extra
# work makes it slower than `nn.Linear`. **The rule:** on the grading machine (its CPU, one thread), at a
# decode step, `x` of shape `(1, 1024)` through your `QuantLinear.from_linear(nn.Linear(1024, 1024), 4, 128)`,
# your layer must give the right output and take **at most 4×** the time of the library's PyTorch
# reference (the same work: unpack, dequantize, one matmul) holding your layer's buffers. A Python loop over
# rows takes about 20×. The cell below checks `model_bytes` and draws effml-tiny's bytes, then checks your
# layer's output at a decode step and its time against the same 4× limit on this machine, and draws it.

# %% nbgrader={"grade_id": "p5_solution", "solution": true}
def model_bytes(model):
    ### BEGIN SOLUTION
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:  # one tensor under two names (a tied LM head)
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
    ### END SOLUTION


# %% nbgrader={"grade_id": "p5_visible", "locked": true}
# Visible tests for part 5: model_bytes, drawn; then your W4 g128 layer at a decode step on this machine, its
# output and its time, at most 4× the library's at 1024 features (as graded; the grader times it on its own machine)
import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt

from effml_lib.measure import benchmark
from effml_lib.model import ModelConfig, Transformer
from effml_lib.plots import latency_vs_size


def counts(what, model, expected):
    try:
        got = model_bytes(model)
    except Exception as error:  # noqa: BLE001 - say which input form it was
        raise AssertionError(f"{what}: your model_bytes raised {type(error).__name__}: {error}") from error
    assert isinstance(got, int) and got == expected, f"{what}: {expected} bytes, got {got!r}"
    return got


def quantized(model, bits, group_size):
    replace_linears(model, lambda name, linear: QuantLinear.from_linear(linear, bits, group_size))
    return model


def small(tied=False, bias=False):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=64,
                                   tie_embeddings=tied, qkv_bias=bias, mlp_bias=bias)).eval()


tiny = pretrained("effml-tiny")
params = tiny.num_parameters()  # 17 308 032
linears = [m for name, m in tiny.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")]
in_linears = sum(m.weight.numel() for m in linears)  # the weights QuantLinear replaces
fp32 = counts("effml-tiny in float32", tiny, 4 * params)
fp16 = counts("effml-tiny in float16", pretrained("effml-tiny").half(), 2 * params)
counts("effml-tiny in bfloat16", pretrained("effml-tiny").to(torch.bfloat16), 2 * params)
sizes = {"float32": fp32, "float16": fp16}
for bits, group_size, label in ((8, None, "W8 per channel"), (4, 128, "W4 g128"), (4, 32, "W4 g32")):
    per_row = lambda m, g=group_size: m.in_features // (m.in_features if g is None else g)  # noqa: E731 - groups per row
    packed = sum(m.out_features * (m.in_features * bits // 8 + per_row(m) * (2 if bits == 8 else 3)) for m in linears)
    sizes[label] = counts(f"effml-tiny {label} (your QuantLinear; the rest float32)",
                          quantized(pretrained("effml-tiny"), bits, group_size), 4 * (params - in_linears) + packed)
tied = small(tied=True)
counts("a model whose LM head is its embedding (tied)", tied, 4 * tied.num_parameters())
tied.output.weight = nn.Parameter(tied.tok_embeddings.weight.detach())  # two Parameters, one tensor's memory
counts("a tied model whose two Parameters share one tensor", tied, 4 * (tied.num_parameters() - tied.output.weight.numel()))
with_bias = small(bias=True)
qlayers = [m for name, m in with_bias.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")]
biases = sum(m.out_features for m in qlayers if m.bias is not None)
rest = with_bias.num_parameters() - sum(m.weight.numel() for m in qlayers) - biases
expected = 4 * rest + sum(m.out_features * (m.in_features // 2 + 3 * (m.in_features // 32)) for m in qlayers) + 4 * biases
counts("a small model with biases, W4 g32", quantized(with_bias, 4, 32), expected)
counts("a small model with biases, W4 g32, in float16", quantized(small(bias=True).half(), 4, 32),
       expected - 2 * rest - 2 * biases)

linears_fp32, rest_fp32 = 4 * in_linears, 4 * (params - in_linears)
print(f"effml-tiny: float32 {fp32 / 2**20:.1f} MiB, W4 g128 {sizes['W4 g128'] / 2**20:.1f} MiB, {fp32 / sizes['W4 g128']:.1f}× "
      f"smaller; its 56 quantized layers alone {linears_fp32 / (sizes['W4 g128'] - rest_fp32):.1f}× smaller; the "
      f"{(params - in_linears) / 1e6:.1f} M parameters of the embedding, the LM head and the norms stay float32")
bytes_table = pd.DataFrame({"format": list(sizes), "MiB": [n / 2**20 for n in sizes.values()]})
fig, ax = plt.subplots(figsize=(6.5, 3.5))
sns.barplot(bytes_table, x="format", y="MiB", ax=ax, color="C0")
ax.set(xlabel="weights stored as", ylabel="model_bytes (MiB)", title="effml-tiny: its blocks' linear layers quantized")
for i, n in enumerate(bytes_table.MiB):
    ax.text(i, n, f"{n:.1f}", ha="center", va="bottom")
plt.show()

threads = torch.get_num_threads()
torch.set_num_threads(1)  # CPU timings on one thread, as graded
rows = []
for n in (256, 512, 1024):
    what = f"QuantLinear.from_linear(nn.Linear({n}, {n}), 4, 128)"
    linear = nn.Linear(n, n, bias=False)
    layer = answer(what, QuantLinear.from_linear, linear, 4, 128)
    assert (tuple(layer.codes.shape), tuple(layer.scale.shape), tuple(getattr(layer.zero, "shape", ()))) == \
        ((n, n // 2), (n, n // 128), (n, n // 128)), f"{what}: codes ({n}, {n // 2}), scale and zero ({n}, {n // 128}), as part 4 asks"
    x = torch.randn(1, n)  # a decode step
    # the same work by the library's functions: unpack, dequantize (part 4's library_weight), one matmul (while
    # your notebook is graded they run on the grader's side, across a channel: the ratio then means nothing)
    reference = lambda x, layer=layer, n=n: F.linear(x, library_weight(layer.codes, layer.scale, layer.zero, 4, 128, (n, n)))  # noqa: E731
    with torch.no_grad():
        out = answer(f"{what} at a decode step, x (1, {n})", layer, x)
        assert isinstance(out, torch.Tensor) and out.shape == (1, n) and torch.allclose(out, reference(x), rtol=1e-4, atol=1e-5), (
            f"{what}: wrong output at a decode step, x (1, {n}): x @ weight.T, the weight from the buffers (only a "
            f"correct layer is timed)")
    for name, fn in (("your QuantLinear (W4 g128)", layer), ("the library's unpack + dequantize + matmul", reference),
                     ("nn.Linear (float32)", linear)):
        with torch.no_grad():
            rows.append({"features": n, "implementation": name, **benchmark(fn, x, warmup=2, reps=10).to_dict()})
torch.set_num_threads(threads)
timings = pd.DataFrame(rows)
latency_vs_size(timings, "features", hue="implementation", xlabel="in = out features",
                title="A decode step, x (1, in), cpu, one thread")
at_1024 = timings[timings.features == 1024].set_index("implementation").median_ms
ratio = at_1024.iloc[0] / at_1024.iloc[1]
print(f"at 1024 features yours takes {ratio:.1f}× the library's unpack + dequantize + matmul "
      f"(graded: at most 4× its QuantLinear, the same work) and {at_1024.iloc[0] / at_1024.iloc[2]:.0f}× nn.Linear")
assert ratio <= 4, (
    f"too slow: at a decode step, x (1, 1024), your QuantLinear (W4 g128) takes {at_1024.iloc[0]:.2f} ms, the library's "
    f"unpack + dequantize + matmul {at_1024.iloc[1]:.2f} ms: {ratio:.1f}×, and at most 4× is expected. Unpack and "
    f"dequantize the whole weight with a few tensor ops, then one matmul: no Python loop over rows or groups")
print("part 5: visible tests passed")

# %% [markdown] nbgrader={"grade_id": "p5_plot_note", "locked": true}
# The bars: from float32 to W4 in groups of 128 the model shrinks 3.5×, not 8×: its 56 quantized layers
# shrink 7.6×, but the embedding, the LM head and the norms (3.2 M of the 17.3 M parameters) stay in float32.
# Groups of 32 cost a little more than groups of 128 (a scale and a zero point for every 32 weights). The
# lines: on a CPU your layer takes several times as long as `nn.Linear`, since it dequantizes the whole
# weight at every call; without a kernel that reads the packed bytes directly, it saves memory, not time.

# %% nbgrader={"grade_id": "p5_tests"} graded={"part": "performance"}
