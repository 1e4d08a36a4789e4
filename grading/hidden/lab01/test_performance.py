"""Lab 01, part 5: attention runs within FACTOR times the library's reference on the grading machine.

Checked correct at the timed shapes first (a fast wrong answer must not score). Then timed from the
grader's side, in turns with the reference, each round on new random inputs, every timed result
checked, the channel's own cost subtracted (grading/trusted.py Timing). Both run on one thread.
"""

import torch

from effml_lib.attention import attention_reference
from trusted import judge_speed

# Allowed slowdown against the reference at the longest length: a vectorized solution takes about
# 0.8x, a loop over queries about 9x.
FACTOR = 4.0
B, H, D = 1, 4, 64
SEQ_LENS = (32, 64, 128)  # judged at the longest; at T >= 256 a loop's matmuls start to hide its overhead


def test_as_fast_as_the_reference(student, gen, close, timing):
    for t in SEQ_LENS:
        q, k, v = (torch.randn(B, H, t, D, generator=gen) for _ in range(3))
        assert close(student.attention(q, k, v), attention_reference(q, k, v), 1e-5, 1e-4), (
            f"wrong output for q, k, v of shape {(B, H, t, D)}: only a correct attention is timed")

    def inputs_of_length(t):
        def inputs(n):
            qkvs = [tuple(torch.randn(B, H, t, D, generator=gen) for _ in range(3)) for _ in range(n)]
            return [(qkv, qkv) for qkv in qkvs]
        return inputs

    medians = [timing.compare(student.attention, attention_reference, inputs_of_length(t),
                              check=lambda got, expected: close(got, expected, 1e-5, 1e-4)) for t in SEQ_LENS]
    judge_speed(medians, SEQ_LENS, FACTOR, "attention",
                f"Causal attention, q, k, v of shape ({B}, {H}, T, {D}), float32, cpu",
                "A Python loop over queries pays every op's overhead once per query: compute all queries "
                "at once with one matmul and a mask")
