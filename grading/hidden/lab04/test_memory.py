"""Lab 04, part 4: grouped_attention at an MQA decode step: correct, at most LIMIT_MIB of peak memory
(a copy of K and V per query head would be 512 MiB), and at most FACTOR times the reference's time."""

import torch

from effml_lib.attention import attention_reference
from effml_lib.grading import judge_speed, one_thread, time_interleaved, without_sdpa_ban
from effml_lib.measure import peak_memory

LIMIT_MIB = 16  # the solution peaks at 4 MiB (scores and probabilities, 2 MiB each)
FACTOR = 3.0  # the solution takes about 0.8x the reference
H, D = 32, 128
CONTEXTS = (4096, 8192, 16384)  # judged at the longest


def test_no_copies_of_the_cache(student, gen, close, sdpa_repeated):
    inputs = []
    for s in CONTEXTS:
        q = torch.randn(1, H, 1, D, generator=gen)
        inputs.append((q, torch.randn(1, 1, s, D, generator=gen), torch.randn(1, 1, s, D, generator=gen)))
    for q, k, v in inputs:
        out = student.grouped_attention(q, k, v)
        assert close(out, sdpa_repeated(q, k, v), 1e-5, 1e-4), (
            f"wrong output at an MQA decode step with {k.shape[2]} cached tokens: only a correct attention is measured")

    attend = without_sdpa_ban(student.grouped_attention)
    _, peak = peak_memory(attend, *inputs[-1])
    assert peak <= LIMIT_MIB * 2**20, (
        f"peak memory {peak / 2**20:.0f} MiB at 32 query heads, 1 KV head, {CONTEXTS[-1]} tokens (allowed {LIMIT_MIB} MiB; "
        f"K and V are 8 MiB each): do not copy K/V per query head, fold the group's heads into the query axis")

    with one_thread():
        medians = [time_interleaved({"yours": attend, "reference": attention_reference}, qkv, "cpu") for qkv in inputs]
    judge_speed(medians, CONTEXTS, FACTOR, "grouped_attention",
                f"MQA decode step: q (1, {H}, 1, {D}), k/v (1, 1, S, {D}), float32, cpu",
                "One batched matmul per KV head group, not a loop over query heads")
