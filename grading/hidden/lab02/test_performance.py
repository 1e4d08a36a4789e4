"""Lab 02, part 5: apply_rope runs within FACTOR times the library's reference rotation on the grading machine.

Checked correct at the timed shapes first (a fast wrong answer must not score), then timed on one
thread against ``rotate_reference`` given the already-gathered cos/sin rows.
"""

import torch

from effml_lib.grading import judge_speed, one_thread, time_interleaved, without_sdpa_ban
from effml_lib.rope import rope_frequencies, rotate_reference

DEVICE = "cpu"  # where lab 02 is graded
# A vectorized rotation takes about 1.1x the reference; a Python loop over positions about 100x.
FACTOR = 4.0
B, H, D = 1, 8, 64
SEQ_LENS = (128, 256, 512)  # judged at the longest


def test_as_fast_as_the_reference(student, gen, close, exact):
    cos, sin = rope_frequencies(D, max(SEQ_LENS))
    inputs = [torch.randn(B, H, t, D, generator=gen).to(DEVICE) for t in SEQ_LENS]
    for x in inputs:
        out = student.apply_rope(x, cos, sin)
        assert close(out, exact(x, torch.arange(x.shape[2])), 2e-4, 1e-4), (  # float32 angles at position 511
            f"wrong output for x of shape {tuple(x.shape)}: only a correct rotation is timed")

    rotate = without_sdpa_ban(student.apply_rope)
    medians = []
    with one_thread():
        for x in inputs:
            rows_cos, rows_sin = cos[: x.shape[2]], sin[: x.shape[2]]  # the reference gets them gathered
            medians.append(time_interleaved({"yours": lambda: rotate(x, cos, sin),
                                             "reference": lambda: rotate_reference(x, rows_cos, rows_sin)}, (), DEVICE))
    judge_speed(medians, SEQ_LENS, FACTOR, "apply_rope", f"RoPE on x of shape ({B}, {H}, T, {D}), float32, {DEVICE}",
                "Rotate whole tensors at once: no Python loop over positions or heads")
