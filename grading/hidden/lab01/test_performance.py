"""Lab 01, part 5: causal_attention runs within FACTOR times the library's reference on the grading machine.

The student's attention is first checked for correctness at the timed shapes (a fast wrong answer must
not score), with PyTorch's fused attention banned. It is then timed *without* that ban: the ban works
through dispatch modes that send every torch op through Python, which would slow the student's code
and not the reference's. The library's attention stays unavailable to the student throughout.
"""

import io
import statistics
import time

import torch

from effml_lib.attention import attention_reference
from effml_lib.grading import without_sdpa_ban

DEVICE = "cpu"  # where lab 01 is graded
# Allowed slowdown against the reference at the longest length: 4x on CPU (a vectorized solution takes
# about 0.8x, a loop over queries about 9x); 4x would hold on a GPU too, where a loop is slower still.
FACTOR = {"cpu": 4.0, "cuda": 4.0}[DEVICE]
B, H, D = 1, 4, 64
SEQ_LENS = (32, 64, 128)  # judged at the longest; at T >= 256 a loop's matmuls start to hide its overhead
WARMUP, REPS = 3, 15
# One timed sample is n back-to-back calls, n chosen so that the faster function's sample lasts about
# SAMPLE_S: long against the operating system's time slices (a few ms), so that a process sharing the
# cores takes the same share of both functions' samples, not whole slices out of a few short calls.
SAMPLE_S, MAX_SAMPLE_S = 0.02, 0.5
BUDGET_S = 1.0  # stop timing one length once this much time is spent (after 3 rounds)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, args, n):
    _sync()
    start = time.perf_counter()
    for _ in range(n):
        fn(*args)
    _sync()
    return time.perf_counter() - start


def time_interleaved(fns, args):
    """Median seconds per call of each of ``fns`` (name -> fn). After warm-up, the functions take turns,
    one sample each per round, so that whatever else loads the machine hits them alike."""
    one_call = {name: min(_seconds(fn, args, 1) for _ in range(WARMUP)) for name, fn in fns.items()}
    n = max(1, min(round(SAMPLE_S / min(one_call.values())), int(MAX_SAMPLE_S / max(one_call.values()))))
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    for round_ in range(REPS):
        if round_ >= 3 and time.perf_counter() - start > BUDGET_S:
            break
        for name, fn in fns.items():
            samples[name].append(_seconds(fn, args, n) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def show_plot(rows, limit_ms, title):
    """Display the latency plot in the graded cell's output; outside a Jupyter kernel, do nothing.
    ``limit_ms``: FACTOR times the reference's latency at each length, drawn dashed."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):  # plain pytest, or a terminal IPython
        return
    import pandas as pd
    from matplotlib.figure import Figure

    from effml_lib.plots import latency_vs_size

    fig = Figure(figsize=(6.5, 4.2))  # not pyplot's: nothing else will draw it again at the cell's end
    ax = latency_vs_size(pd.DataFrame(rows), "seq_len", "median_ms", hue="implementation", ax=fig.subplots(),
                         xlabel="sequence length T (tokens)", ylabel="latency (ms)", title=title)
    ax.plot(SEQ_LENS, limit_ms, color="0.4", ls="--", label=f"{FACTOR:g}× reference (the limit)")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)  # in memory: grading writes no file
    display(Image(data=png.getvalue()))


def test_as_fast_as_the_reference(student, gen, close):
    shapes = [(B, H, t, D) for t in SEQ_LENS]
    inputs = [tuple(torch.randn(s, generator=gen).to(DEVICE) for _ in range(3)) for s in shapes]

    # 1. Correct at every timed shape, with F.scaled_dot_product_attention banned.
    for shape, (q, k, v) in zip(shapes, inputs):
        out = student.causal_attention(q, k, v)
        assert close(out, attention_reference(q, k, v), 1e-5, 1e-4), (
            f"wrong output for q, k, v of shape {shape}: only a correct attention is timed")

    # 2. Timed without the ban, on one thread: a second grading process on the same cores then
    #    takes a core of its own instead of stalling our threads, and the ratio stays put.
    attend = without_sdpa_ban(student.causal_attention)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        medians = [time_interleaved({"yours": attend, "reference": attention_reference}, qkv) for qkv in inputs]
    finally:
        torch.set_num_threads(threads)

    yours_ms, ref_ms = medians[-1]["yours"] * 1e3, medians[-1]["reference"] * 1e3
    ratio = yours_ms / ref_ms
    t = SEQ_LENS[-1]
    rows = [{"seq_len": s, "implementation": label, "median_ms": m[key] * 1e3}
            for s, m in zip(SEQ_LENS, medians)
            for key, label in (("yours", "your causal_attention"), ("reference", "reference"))]
    try:
        show_plot(rows, [FACTOR * m["reference"] * 1e3 for m in medians],
                  f"Causal attention, q, k, v of shape ({B}, {H}, T, {D}), float32, {DEVICE}\n"
                  f"passes if ≤ {FACTOR:g}× the reference at T = {t} (yours: {ratio:.1f}×)")
    except Exception:  # the plot informs; it must never change the grade
        pass
    assert ratio <= FACTOR, (
        f"too slow: at T = {t} your causal_attention takes {yours_ms:.2f} ms, the reference {ref_ms:.2f} ms, "
        f"{ratio:.1f}× (allowed {FACTOR:g}×). A Python loop over queries pays every op's overhead once per "
        f"query: compute all queries at once with one matmul and a mask")
