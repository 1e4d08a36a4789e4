"""The Triton RoPE kernel against the PyTorch reference and against complex multiplication.

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest) on small shapes; on the GPU
machine the same tests run on CUDA, plus larger shapes marked `gpu`.
"""

import platform

import pytest
import torch

from conftest import TOLERANCES, assert_close
from effml_lib.rope import apply_rope, apply_rope_qk, rope_frequencies
from test_rope import complex_rope

if (platform.system(), platform.machine()) != ("Linux", "x86_64"):  # elsewhere Triton is not a dev dependency
    pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def heads_last(b, h, t, d, gen, dtype):
    """(B, H, T, D) as the model makes it: a transposed view of (B, T, H, D), not contiguous."""
    return torch.randn(b, t, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)


def rotate_both(q, k, cos, sin, positions=None, interleaved=False):
    got = apply_rope_qk(q, k, cos, sin, positions, interleaved, impl="triton")
    expected = apply_rope_qk(q, k, cos, sin, positions, interleaved, impl="torch")
    return got, expected


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference_and_complex_math(interleaved, dtype, gen):
    q = heads_last(2, 4, 6, 32, gen, dtype)
    k = heads_last(2, 2, 6, 32, gen, dtype)  # GQA: fewer key heads
    cos, sin = rope_frequencies(32, 16, device=DEVICE)
    (q_got, k_got), (q_ref, k_ref) = rotate_both(q, k, cos, sin, interleaved=interleaved)
    assert q_got.dtype == dtype and k_got.dtype == dtype
    assert_close(q_got, q_ref, what="q (kernel vs reference)")
    assert_close(k_got, k_ref, what="k (kernel vs reference)")
    positions = torch.arange(6)
    assert_close(q_got.cpu(), complex_rope(q.cpu().float(), positions, interleaved=interleaved), dtype,
                 what="q (kernel vs complex multiplication)")


@pytest.mark.parametrize("positions", [
    torch.tensor([5, 9, 40]),  # a (T,) set of arbitrary, non-contiguous positions
    torch.tensor([[0, 1, 2], [61, 7, 33]]),  # (B, T): each sequence its own positions
    torch.tensor([[3, 4, 5]]),  # (1, T) broadcast over the batch
], ids=["shared", "per_sequence", "broadcast"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_arbitrary_positions(positions, interleaved, gen):
    q = heads_last(2, 3, 3, 16, gen, torch.float32)
    k = heads_last(2, 1, 3, 16, gen, torch.float32)  # MQA
    cos, sin = rope_frequencies(16, 64, device=DEVICE)
    (q_got, k_got), (q_ref, k_ref) = rotate_both(q, k, cos, sin, positions.to(DEVICE), interleaved)
    assert_close(q_got, q_ref, what=f"q at positions {positions.tolist()}")
    assert_close(k_got, k_ref, what=f"k at positions {positions.tolist()}")


def test_decode_step_one_token_per_sequence_at_its_cache_length(gen):
    q = heads_last(3, 4, 1, 64, gen, torch.bfloat16)
    k = heads_last(3, 4, 1, 64, gen, torch.bfloat16)
    cache_lengths = torch.tensor([[17], [250], [0]], device=DEVICE)  # (B, 1)
    cos, sin = rope_frequencies(64, 256, device=DEVICE)
    (q_got, k_got), (q_ref, k_ref) = rotate_both(q, k, cos, sin, cache_lengths)
    assert_close(q_got, q_ref, what="decode-step q")
    assert_close(k_got, k_ref, what="decode-step k")


@pytest.mark.parametrize("head_dim", [2, 24, 80], ids=lambda d: f"head_dim={d}")  # D/2 not a power of two
def test_head_dims_that_need_masking(head_dim, gen):
    x = torch.randn(1, 3, 5, head_dim, generator=gen, device="cpu").to(DEVICE)
    cos, sin = rope_frequencies(head_dim, 8, device=DEVICE)
    for interleaved in (False, True):
        got = apply_rope(x, cos, sin, interleaved=interleaved, impl="triton")
        assert_close(got, apply_rope(x, cos, sin, interleaved=interleaved, impl="torch"),
                     what=f"head_dim={head_dim} interleaved={interleaved}")


def test_heads_processed_in_several_blocks(gen):
    """More heads than one loop step covers: the loop over head blocks and its tail mask."""
    from effml_lib.kernels.rope import rope_qk_triton

    q = heads_last(1, 7, 2, 8, gen, torch.float32)
    k = heads_last(1, 5, 2, 8, gen, torch.float32)
    cos, sin = rope_frequencies(8, 4, device=DEVICE)
    q_got, k_got = rope_qk_triton(q, k, cos, sin, None, False, block_h=2)
    q_ref, k_ref = apply_rope_qk(q, k, cos, sin, impl="torch")
    assert_close(q_got, q_ref, what="q with block_h=2")
    assert_close(k_got, k_ref, what="k with block_h=2")


def test_output_layout_and_inputs_untouched(gen):
    q = heads_last(2, 2, 4, 8, gen, torch.float32)
    before = q.clone()
    cos, sin = rope_frequencies(8, 4, device=DEVICE)
    out = apply_rope(q, cos, sin, impl="triton")
    assert torch.equal(q, before), "the kernel must not rotate its input in place"
    assert out.stride() == q.stride(), "the output should keep the input's memory layout"
    contiguous = apply_rope(q.contiguous(), cos, sin, impl="triton")
    assert_close(out, contiguous, what="strided vs contiguous input")


def test_scaled_tables_and_empty_input(gen):
    x = heads_last(1, 2, 6, 16, gen, torch.float32)
    for scaling in ({"type": "linear", "factor": 4}, {"type": "ntk", "factor": 8}):
        cos, sin = rope_frequencies(16, 8, scaling=scaling, device=DEVICE)
        assert_close(apply_rope(x, cos, sin, impl="triton"), apply_rope(x, cos, sin, impl="torch"),
                     what=f"scaling={scaling}")
    empty = torch.empty(0, 2, 6, 16, device=DEVICE)
    assert apply_rope(empty, cos, sin, impl="triton").shape == empty.shape


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_large_shapes(interleaved, dtype, gen):
    q = heads_last(4, 32, 1000, 128, gen, dtype)
    k = heads_last(4, 8, 1000, 128, gen, dtype)
    positions = torch.randint(0, 8192, (4, 1000), generator=gen).to(DEVICE)
    cos, sin = rope_frequencies(128, 8192, theta=500000.0, device=DEVICE)
    (q_got, k_got), (q_ref, k_ref) = rotate_both(q, k, cos, sin, positions, interleaved)
    assert_close(q_got, q_ref, what="q, large GPU shape")
    assert_close(k_got, k_ref, what="k, large GPU shape")
    expected = complex_rope(q.cpu().float(), positions.cpu()[:, None, :], theta=500000.0, interleaved=interleaved)
    # The float32 angle table itself is off by up to position x 2^-24 radians (~5e-4 at 8192), as in
    # every float32 RoPE; that, not the kernel, bounds agreement with exact math here.
    angle_error = 8192 * 2.0**-24 * 4
    atol, rtol = (max(t, angle_error) for t in TOLERANCES[dtype])
    torch.testing.assert_close(q_got.cpu().double(), expected, atol=atol, rtol=rtol)
