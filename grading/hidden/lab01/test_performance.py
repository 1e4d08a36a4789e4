"""Lab 01, part 5: causal_attention runs within FACTOR times the library's reference on the grading machine.

The student's attention is first checked for correctness at the timed shapes (a fast wrong answer must
not score), with PyTorch's fused attention banned. It is then timed *without* that ban: the ban works
through dispatch modes that send every torch op through Python, which would slow the student's code
and not the reference's. The library's attention stays unavailable to the student throughout.
"""

import torch

from effml_lib.attention import attention_reference
from effml_lib.grading import judge_speed, one_thread, time_interleaved, without_sdpa_ban

DEVICE = "cpu"  # where lab 01 is graded
# Allowed slowdown against the reference at the longest length: 4x on CPU (a vectorized solution takes
# about 0.8x, a loop over queries about 9x); 4x would hold on a GPU too, where a loop is slower still.
FACTOR = {"cpu": 4.0, "cuda": 4.0}[DEVICE]
B, H, D = 1, 4, 64
SEQ_LENS = (32, 64, 128)  # judged at the longest; at T >= 256 a loop's matmuls start to hide its overhead


def test_as_fast_as_the_reference(student, gen, close):
    shapes = [(B, H, t, D) for t in SEQ_LENS]
    inputs = [tuple(torch.randn(s, generator=gen).to(DEVICE) for _ in range(3)) for s in shapes]

    # 1. Correct at every timed shape, with F.scaled_dot_product_attention banned.
    for shape, (q, k, v) in zip(shapes, inputs):
        out = student.causal_attention(q, k, v)
        assert close(out, attention_reference(q, k, v), 1e-5, 1e-4), (
            f"wrong output for q, k, v of shape {shape}: only a correct attention is timed")

    # 2. Timed without the ban, on one thread (see one_thread).
    attend = without_sdpa_ban(student.causal_attention)
    with one_thread():
        medians = [time_interleaved({"yours": attend, "reference": attention_reference}, qkv, DEVICE) for qkv in inputs]
    judge_speed(medians, SEQ_LENS, FACTOR, "causal_attention",
                f"Causal attention, q, k, v of shape ({B}, {H}, T, {D}), float32, {DEVICE}",
                "A Python loop over queries pays every op's overhead once per query: compute all queries "
                "at once with one matmul and a mask")
