"""Lab 05, part 2: pack_int4(codes) and unpack_int4(packed), against the library's."""

import pytest
import torch

from effml_lib.quant import pack_int4, unpack_int4
from trusted import describe


def packed_by_student(student, codes, what, form):
    with form(what):
        packed = student.pack_int4(codes)
    shape = (*codes.shape[:-1], codes.shape[-1] // 2)
    assert type(packed) is torch.Tensor and packed.dtype == torch.uint8 and packed.shape == shape, (
        f"{what}: pack_int4 returns uint8 of shape (..., n) = {shape}, got {describe(packed)}")
    return packed


def test_the_nibble_order(student, form):
    packed = packed_by_student(student, torch.tensor([[1, 2], [15, 0], [0, 15]]), "codes [[1, 2], [15, 0], [0, 15]]", form)
    assert packed[:, 0].tolist() == [0x21, 0x0F, 0xF0], (
        "element 2i goes in the low nibble of byte i, element 2i + 1 in its high nibble: (1, 2) is 0x21, (15, 0) 0x0F, (0, 15) 0xF0")


def test_every_pair_of_codes(student, form):
    pairs = torch.tensor([[low, high] for high in range(16) for low in range(16)])  # (256, 2)
    packed = packed_by_student(student, pairs, "every pair of codes (256, 2)", form)
    assert torch.equal(packed[:, 0], torch.arange(256, dtype=torch.uint8)), "the pair (low, high) packs to low + 16 * high"


@pytest.mark.parametrize("shape", [(10,), (6, 16), (2, 3, 8)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.int64], ids=str)
def test_any_shape_and_integer_dtype(student, gen, form, shape, dtype):
    codes = torch.randint(0, 16, shape, generator=gen).to(dtype)
    what = f"codes of shape {shape} in {dtype}"
    packed = packed_by_student(student, codes, what, form)
    assert torch.equal(packed, pack_int4(codes)), f"{what}: wrong bytes: element 2i in the low nibble of byte i"


def test_unpack_every_byte(student, form):
    every_byte = torch.arange(256, dtype=torch.uint8)
    with form("unpack_int4 of the 256 bytes 0..255 (256,)"):
        codes = student.unpack_int4(every_byte)
    assert type(codes) is torch.Tensor and codes.dtype == torch.uint8 and codes.shape == (512,), (
        f"unpack_int4 of 256 bytes returns uint8 of shape (512,), got {describe(codes)}")
    assert torch.equal(codes, unpack_int4(every_byte)), "unpack_int4 gives each byte's low nibble first, then its high one"


@pytest.mark.parametrize("shape", [(5,), (4, 8), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_unpack_any_shape_and_round_trips(student, gen, form, shape):
    packed = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    what = f"unpack_int4 of uint8 {shape}"
    with form(what):
        codes = student.unpack_int4(packed)
    expected = unpack_int4(packed)
    assert type(codes) is torch.Tensor and codes.dtype == torch.uint8 and codes.shape == expected.shape, (
        f"{what}: returns uint8 codes of shape (..., 2n) = {tuple(expected.shape)}, got {describe(codes)}")
    assert torch.equal(codes, expected), f"{what}: element 2i is byte i's low nibble, element 2i + 1 its high nibble"
    with form(f"pack_int4(unpack_int4(packed)) for {shape}"):
        again = student.pack_int4(student.unpack_int4(packed))
    assert type(again) is torch.Tensor and torch.equal(again, packed), f"pack_int4(unpack_int4(packed)) must give {shape} back"


@pytest.mark.parametrize("codes,what", [
    (torch.zeros(3, 5, dtype=torch.uint8), "codes with an odd last dimension (3, 5)"),
    (torch.tensor([3, 16]), "a code of 16"),
    (torch.tensor([-1, 7], dtype=torch.int8), "a code of -1 (a symmetric code, not shifted by 8)"),
], ids=["odd", "sixteen", "negative"])
def test_what_does_not_fit_is_a_clear_error(student, value_error, codes, what):
    value_error(lambda: student.pack_int4(codes), "codes", what)
