import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported anywhere

import re  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from effml_lib import plots  # noqa: E402

UNIT = r"\(.+\)"  # a label carries its unit in parentheses


@pytest.fixture(autouse=True)
def _close_figures():
    plots.set_style()
    yield
    plt.close("all")


def _sweep(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for impl in ("torch", "triton"):
        for n in (256, 512, 1024, 2048, 4096):
            m = n / 1000 * (1 if impl == "torch" else 0.5) * (1 + 0.05 * rng.random())
            rows.append({"impl": impl, "seq_len": n, "median_ms": m, "q25_ms": 0.9 * m, "q75_ms": 1.1 * m,
                         "peak_bytes": n * 2**16})
    return pd.DataFrame(rows)


def test_latency_vs_size_lines_bands_and_labels():
    df = _sweep()
    ax = plots.latency_vs_size(df, x="seq_len", hue="impl", xlabel="sequence length (tokens)")
    assert len(ax.lines) == 2  # one line per impl
    for line, impl in zip(ax.lines, ("torch", "triton")):
        xs, ys = line.get_data()
        assert list(xs) == [256, 512, 1024, 2048, 4096]
        np.testing.assert_allclose(ys, df[df.impl == impl].median_ms)
        assert line.get_marker() == "o"
    assert len(ax.collections) == 2  # an IQR band per line, from q25_ms/q75_ms
    assert ax.get_xlabel() == "sequence length (tokens)"
    assert ax.get_ylabel() == "latency (ms)"
    assert ax.get_title()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["torch", "triton"]


def test_latency_without_bands_or_hue():
    df = _sweep()[["seq_len", "median_ms"]].head(5)
    ax = plots.latency_vs_size(df, x="seq_len", logx=False, logy=False)
    assert len(ax.lines) == 1 and len(ax.collections) == 0
    assert ax.get_xscale() == "linear"
    assert ax.get_ylabel() == "latency (ms)"


def test_latency_units_follow_the_column():
    df = pd.DataFrame({"batch": [1, 2, 4], "median_us": [3.0, 4.0, 6.0]})
    ax = plots.latency_vs_size(df, x="batch", y="median_us", xlabel="batch size (sequences)")
    assert ax.get_ylabel() == "latency (µs)"
    assert ax.get_xlabel() == "batch size (sequences)"


def test_memory_vs_size_human_ticks():
    df = _sweep()
    ax = plots.memory_vs_size(df, x="seq_len", hue="impl", xlabel="sequence length (tokens)")
    assert len(ax.lines) == 2
    assert all(len(line.get_xdata()) == 5 for line in ax.lines)
    assert ax.get_ylabel() == "peak memory (bytes)"
    assert plots.human_bytes(64 * 2**20) == "64 MiB"
    assert plots.human_bytes(1.5 * 2**30) == "1.5 GiB"
    assert plots.human_bytes(512) == "512 B"
    formatter = ax.yaxis.get_major_formatter()
    assert formatter(16 * 2**20, 0) == "16 MiB"
    assert ax.get_title()


def test_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no column.*'nope'"):
        plots.latency_vs_size(_sweep(), x="nope")
    with pytest.raises(TypeError, match="DataFrame"):
        plots.loss_curves([1, 2, 3])


def test_roofline():
    peak_flops, peak_bw = 1e15, 3e12  # ridge at 333 FLOP/byte
    points = [("decode GEMV", 1.0, 2.4e12), ("prefill GEMM", 2000.0, 7e14)]
    ax = plots.roofline(peak_flops=peak_flops, peak_bandwidth=peak_bw, points=points)
    memory_line, compute_line = ax.lines[0], ax.lines[1]
    (x0, x1), (y0, y1) = memory_line.get_data()
    assert y1 == pytest.approx(peak_flops) and x1 == pytest.approx(peak_flops / peak_bw)
    assert y0 == pytest.approx(peak_bw * x0)  # slope = bandwidth
    assert list(compute_line.get_ydata()) == [peak_flops, peak_flops]
    assert len(ax.collections) == 2  # one scatter per point
    offsets = np.vstack([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(offsets, [[1.0, 2.4e12], [2000.0, 7e14]])
    texts = [t.get_text() for t in ax.texts]
    assert any("ridge" in t and "333" in t for t in texts)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "decode GEMV (80% of roof)" in legend and "prefill GEMM (70% of roof)" in legend
    assert ax.get_xlabel() == "arithmetic intensity (FLOP/byte)"
    assert ax.get_ylabel() == "performance (FLOP/s)"
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert ax.get_title() == "Roofline"


def test_roofline_validates():
    with pytest.raises(ValueError, match="peak_flops"):
        plots.roofline(peak_flops=0, peak_bandwidth=1e12)
    with pytest.raises(ValueError, match="point"):
        plots.roofline(peak_flops=1e12, peak_bandwidth=1e11, points=[("bad", -1, 1e9)])


def test_loss_curves():
    steps = np.arange(0, 100, 10)
    df = pd.concat([
        pd.DataFrame({"step": steps, "loss": 4 * np.exp(-steps / 50) + 1, "run": "lora r=8"}),
        pd.DataFrame({"step": steps, "loss": 4 * np.exp(-steps / 30) + 1, "run": "full"}),
    ])
    ax = plots.loss_curves(df)
    assert len(ax.lines) == 2
    assert all(len(line.get_xdata()) == len(steps) for line in ax.lines)
    assert ax.get_xlabel() == "training step (optimizer steps)"
    assert ax.get_ylabel() == "loss (nats/token)"
    assert ax.get_title() == "Training loss"
    single = plots.loss_curves(df[df.run == "full"], hue=None, ax=plt.subplots()[1])
    assert len(single.lines) == 1 and single.get_legend() is None


@pytest.mark.parametrize("fn", ["latency_vs_size", "memory_vs_size"])
def test_every_axis_label_has_a_unit(fn):
    df = pd.DataFrame({"size_bytes": [2**10, 2**20], "median_ms": [1.0, 2.0], "peak_bytes": [1, 2]})
    ax = getattr(plots, fn)(df, x="size_bytes")
    assert ax.get_xlabel() == "size (bytes)"
    for label in (ax.get_xlabel(), ax.get_ylabel()):
        assert re.search(UNIT, label), label


def test_draws_on_a_given_axes():
    fig, axes = plt.subplots(1, 2)
    ax = plots.latency_vs_size(_sweep(), x="seq_len", hue="impl", ax=axes[1], xlabel="n (tokens)")
    assert ax is axes[1] and len(axes[0].lines) == 0
