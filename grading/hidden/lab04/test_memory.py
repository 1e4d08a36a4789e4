"""Lab 04, part 4: attention at an MQA decode step: correct, at most LIMIT_MIB of peak memory
(a copy of K and V per query head would be 512 MiB), and at most FACTOR times the reference's time.

The memory is what the operating system saw the student's process hold during the call, above what
it held before (grading/trusted.py Timing.peak_bytes); the time is measured from the grader's side, in
turns with the reference, each round on new random queries, every timed result checked."""

import torch

from effml_lib.attention import attention_reference
from trusted import judge_speed

LIMIT_MIB = 24  # the lab states 16 MiB of tensors (measure.peak_memory); measured from outside as resident memory, which adds the process's own allocations, the line is 24 MiB. The solution peaks at about 4 MiB of tensors; copies of K/V per head, 512 MiB
FACTOR = 3.0  # the solution takes about 0.8x the reference
H, D = 32, 128
CONTEXTS = (4096, 8192, 16384)  # judged at the longest


def test_no_copies_of_the_cache(student, gen, close, repeated_heads, timing):
    caches = [(torch.randn(1, 1, s, D, generator=gen), torch.randn(1, 1, s, D, generator=gen)) for s in CONTEXTS]
    for k, v in caches:
        q = torch.randn(1, H, 1, D, generator=gen)
        assert close(student.attention(q, k, v), repeated_heads(q, k, v), 1e-5, 1e-4), (
            f"wrong output at an MQA decode step with {k.shape[2]} cached tokens: only a correct attention is measured")

    kept = [(student.stage(k), student.stage(v)) for k, v in caches]  # sent once; timed calls send only q
    q = student.stage(torch.randn(1, H, 1, D, generator=gen))
    peak = timing.peak_bytes(student.attention, q, *kept[-1])
    assert peak <= LIMIT_MIB * 2**20, (
        f"peak memory {peak / 2**20:.0f} MiB at 32 query heads, 1 KV head, {CONTEXTS[-1]} tokens (allowed {LIMIT_MIB} MiB; "
        f"K and V are 8 MiB each): do not copy K/V per query head, fold the group's heads into the query axis")

    def queries_for(i):
        def inputs(n):
            qs = [torch.randn(1, H, 1, D, generator=gen) for _ in range(n)]
            return [((q, *kept[i]), (q, *caches[i])) for q in qs]
        return inputs

    medians = [timing.compare(student.attention, attention_reference, queries_for(i),
                              check=lambda got, expected: close(got, expected, 1e-5, 1e-4)) for i in range(len(CONTEXTS))]
    judge_speed(medians, CONTEXTS, FACTOR, "attention",
                f"MQA decode step: q (1, {H}, 1, {D}), k/v (1, 1, S, {D}), float32, cpu",
                "One batched matmul per KV head group, not a loop over query heads", xlabel="cached tokens S")
