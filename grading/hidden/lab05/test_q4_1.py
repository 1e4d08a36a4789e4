"""Lab 05, part 3: dequantize_q4_1(blocks), against gguf's own dequantization (llama.cpp's Python package):
blocks gguf made from random weights, blocks made by hand (signs, zero and tiny scales), random bytes, and,
when the grader has fetched it, a tensor of SmolLM2-135M-Instruct's GGUF file.

Where gguf is not installed on the grading machine, the library's own decoder (bit for bit equal to gguf's,
tests/test_checkpoints.py) is the reference and the tests that need gguf to make or read blocks are skipped
before they run, which changes no score."""

import numpy as np
import pytest
import torch

from effml_lib.checkpoints import dequantize_q4_1, smollm2_path
from trusted import describe

try:
    import gguf
except ImportError:  # the library's decoder is the reference instead
    gguf = None
NO_GGUF = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed on the grading machine")


def reference(blocks: torch.Tensor) -> torch.Tensor:
    """gguf's dequantization of uint8 blocks (..., 20) -> float32 (..., 32)."""
    if gguf is None:
        return dequantize_q4_1(blocks)
    out = gguf.quants.dequantize(blocks.reshape(-1, 20).numpy(), gguf.GGMLQuantizationType.Q4_1)  # (n_blocks, 32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(*blocks.shape[:-1], 32)


def decoded(student, blocks, what, form, close):
    with form(what):
        out = student.dequantize_q4_1(blocks)
    shape = (*blocks.shape[:-1], 32)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == shape, (
        f"{what}: blocks {tuple(blocks.shape)} decode to float32 {shape}, got {describe(out)}")
    assert close(out, reference(blocks), 1e-6, 1e-6), (
        f"{what}: wrong weights: w = d * q + m, d and m float16 (bytes 0-1, 2-3), and byte 4 + j holds weight j in its "
        f"low nibble and weight j + 16 in its high nibble (not pack_int4's neighbours)")
    return out


def gguf_blocks(gen, rows, n):
    """gguf's own Q4_1 quantization of random weights (rows, n): uint8 (rows, n / 32, 20)."""
    w = torch.randn(rows, n, generator=gen)
    w[:, 3] *= 20
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1)).reshape(rows, n // 32, 20)


def block(d, m, codes):
    head = torch.tensor([d, m], dtype=torch.float16).view(torch.uint8)
    return torch.cat([head, codes[:16] | (codes[16:] << 4)])


@NO_GGUF
@pytest.mark.parametrize("rows,n", [(6, 128), (3, 64)], ids=["6x128", "3x64"])
def test_blocks_gguf_made(student, gen, form, close, rows, n):
    blocks = gguf_blocks(gen, rows, n)
    decoded(student, blocks, f"a ({rows}, {n}) weight quantized by gguf: its rows of blocks {tuple(blocks.shape)}", form, close)


def test_one_block_and_a_run_of_blocks(student, gen, form, close):
    blocks = torch.randint(0, 256, (8, 20), generator=gen, dtype=torch.uint8)
    blocks[:, :4] = (torch.rand(8, 2, generator=gen) * torch.tensor([0.1, -1.0])).half().view(torch.uint8)  # d > 0, m < 0
    decoded(student, blocks[0], "one block (20,)", form, close)
    decoded(student, blocks, "a run of blocks (8, 20)", form, close)


HAND_MADE = {  # id -> (d, m)
    "negative_scale": (-0.5, 3.0),
    "negative_minimum": (0.125, -7.5),
    "zero_scale": (0.0, 1.5),  # every weight is m
    "subnormal_scale": (2**-20, -0.25),
    "negative_zero_minimum": (0.75, -0.0),
    "large": (1000.0, -512.0),
}


def test_hand_made_blocks(student, gen, form, close):
    codes = torch.randint(0, 16, (len(HAND_MADE), 32), generator=gen, dtype=torch.uint8)
    codes[0] = torch.arange(32) % 16  # every code, in both halves
    blocks = torch.stack([block(d, m, c) for (d, m), c in zip(HAND_MADE.values(), codes)])  # (6, 20)
    out = decoded(student, blocks, "blocks (6, 20) with d = -0.5, 0.125, 0, 2^-20, 0.75, 1000 and m = 3, -7.5, 1.5, "
                  "-0.25, -0.0, -512", form, close)
    expected = reference(blocks)
    for i, (name, (d, m)) in enumerate(HAND_MADE.items()):
        assert torch.equal(out[i], expected[i]), f"the block with d = {d}, m = {m} ({name.replace('_', ' ')}): wrong weights"


def test_random_bytes(student, gen, form, close):
    blocks = torch.randint(0, 256, (5, 4, 20), generator=gen, dtype=torch.uint8)
    blocks[..., :4] = (torch.randn(5, 4, 2, generator=gen) * 0.05).half().view(torch.uint8)  # finite d, m of either sign
    decoded(student, blocks, "rows of blocks (5, 4, 20) of random bytes", form, close)


def test_a_block_of_another_size_is_a_clear_error(student, value_error):
    value_error(lambda: student.dequantize_q4_1(torch.zeros(3, 18, dtype=torch.uint8)), "blocks",
                "blocks of 18 bytes (Q4_0's block; Q4_1's has 20)")


@NO_GGUF
@pytest.mark.skipif(smollm2_path() is None, reason="SmolLM2's GGUF file is not fetched on the grading machine")
def test_smollm2s_own_blocks(student, form, close):
    """A real tensor, read with gguf's reader on this side (the sandbox never sees the file). Without the file
    this test is not collected (skipped before it runs, which changes no score): the cases above hold every kind
    of block it has."""
    path = smollm2_path()
    if path is None:  # there when this file was collected, gone now (a suite run again in one process)
        return
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    rows = int(tensor.shape[1])  # GGUF lists dims fastest first
    blocks = torch.from_numpy(np.array(tensor.data)).reshape(rows, -1, 20)[:64]  # (64 rows, 18 blocks, 20 bytes)
    decoded(student, blocks, f"SmolLM2's {tensor.name}: rows of blocks {tuple(blocks.shape)}", form, close)
