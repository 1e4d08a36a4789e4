"""The course's figures: latency and memory sweeps, rooflines, loss curves.

Each function takes a pandas DataFrame (one row per measurement), draws on ``ax`` (a new figure
if None) and returns the Axes. Axis labels always carry units; pass ``xlabel`` when the x column's
name does not say its unit (e.g. ``xlabel="sequence length (tokens)"``). Call :func:`set_style` once
per notebook for the course's look.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns

# Column-name suffix -> unit, so that "median_ms" is labelled "(ms)" without being told.
_UNITS = {
    "_ms": "ms", "_us": "µs", "_ns": "ns", "_s": "s",
    "_bytes": "bytes", "_kib": "KiB", "_mib": "MiB", "_gib": "GiB",
    "_flops": "FLOP/s", "_tokens_per_s": "tokens/s", "_gbps": "GB/s",
}


def set_style() -> None:
    """The one look of every figure in the course (safe to call many times)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (7, 4.5), "figure.dpi": 100, "axes.titleweight": "bold"})


def human_bytes(n: float, _pos=None) -> str:
    """``64 MiB``, ``1.5 GiB``: binary units, as memory is allocated. Usable as a tick formatter."""
    if n is None or not math.isfinite(n):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
        n /= 1024


_plain = mticker.FuncFormatter(lambda v, _pos=None: f"{v:g}")


class _PlainLog(mticker.LogFormatter):
    """Labels the ticks matplotlib's LogFormatter would, but as ``0.6`` rather than ``6e-01``."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _human_si(unit: str):
    """Tick formatter with SI prefixes: 2.5e12 -> ``2.5 T<unit>``."""
    def fmt(v, _pos=None):
        if v == 0 or not math.isfinite(v):
            return f"0 {unit}" if v == 0 else str(v)
        for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
            if abs(v) >= p:
                return f"{v / p:.3g} {s}{unit}"
        return f"{v:.3g} {unit}"
    return mticker.FuncFormatter(fmt)


def _split_unit(column: str) -> tuple[str, str | None]:
    """``median_ms`` -> ``("median", "ms")``; ``seq_len`` -> ``("seq len", None)``."""
    for suffix, unit in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):  # longest first
        if column.lower().endswith(suffix) and len(column) > len(suffix):
            return column[: -len(suffix)].replace("_", " "), unit
    return column.replace("_", " "), None


def _label(column: str, name: str | None = None) -> str:
    """A default axis label: ``median_ms`` -> ``median (ms)``, or ``name (ms)`` if name is given."""
    base, unit = _split_unit(column)
    return f"{name or base} ({unit})" if unit else (name or base)


def _check_columns(df: pd.DataFrame, *columns) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame; got {type(df).__name__}")
    missing = [c for c in columns if c is not None and c not in df.columns]
    if missing:
        raise ValueError(f"df has no column(s) {missing}; it has {list(df.columns)}")


def _band_columns(df: pd.DataFrame, y: str):
    """The spread columns that go with ``y``: median_ms -> (q25_ms, q75_ms), if df has them."""
    if "median" not in y:
        return None
    lo, hi = y.replace("median", "q25"), y.replace("median", "q75")
    return (lo, hi) if lo in df.columns and hi in df.columns else None


def _log_axis(ax, axis: str, values) -> None:
    """Log scale; base 2 with plain tick labels when the values are powers of two (sizes usually are)."""
    values = np.asarray(values, dtype=float)
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    powers_of_two = values.size and np.all(values > 0) and np.allclose(np.log2(values), np.round(np.log2(values)))
    if powers_of_two:
        set_scale("log", base=2)
        getattr(ax, f"{axis}axis").set_major_formatter(_plain)
    else:
        set_scale("log")


def _lines(ax, df, x, y, hue, band=None, marker="o"):
    """One line per hue level (in order of appearance), with a shaded band if given."""
    groups = [(None, df)] if hue is None else [(k, df[df[hue] == k]) for k in pd.unique(df[hue])]
    colors = sns.color_palette(n_colors=max(len(groups), 1))
    for (key, g), color in zip(groups, colors):
        g = g.sort_values(x)
        ax.plot(g[x], g[y], marker=marker, color=color, label=None if key is None else str(key))
        if band is not None:
            ax.fill_between(g[x], g[band[0]], g[band[1]], color=color, alpha=0.2, linewidth=0)
    if hue is not None:
        ax.legend(title=hue)


def _new_ax(ax):
    # No implicit set_style(): changing the global theme is the notebook's call, made once.
    if ax is None:
        _, ax = plt.subplots()
    return ax


def latency_vs_size(
    df: pd.DataFrame,
    x: str,
    y: str = "median_ms",
    hue: str | None = None,
    ax=None,
    logx: bool = True,
    logy: bool = True,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
):
    """Latency against problem size, one line per ``hue``; the IQR band when df has q25/q75 columns."""
    _check_columns(df, x, y, hue)
    ax = _new_ax(ax)
    _lines(ax, df, x, y, hue, _band_columns(df, y))
    if logx:
        _log_axis(ax, "x", df[x])
    if logy:
        ax.set_yscale("log")
        # plain numbers (0.5, 2, 40) rather than 5x10^-1; some minor ticks labelled on short ranges
        ax.yaxis.set_major_formatter(_PlainLog())
        ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.set_xlabel(xlabel or _label(x))
    ax.set_ylabel(ylabel or _label(y, "latency"))
    ax.set_title(title or f"Latency vs {(xlabel or _label(x)).split(' (')[0]}")
    return ax


def memory_vs_size(
    df: pd.DataFrame,
    x: str,
    y: str = "peak_bytes",
    hue: str | None = None,
    ax=None,
    logx: bool = True,
    logy: bool = True,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
):
    """Memory (a column of bytes) against problem size; ticks read ``64 MiB``, ``2 GiB``."""
    _check_columns(df, x, y, hue)
    ax = _new_ax(ax)
    _lines(ax, df, x, y, hue)
    if logx:
        _log_axis(ax, "x", df[x])
    if logy:
        ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(human_bytes))
    ax.set_xlabel(xlabel or _label(x))
    ax.set_ylabel(ylabel or f"{'peak memory' if y == 'peak_bytes' else _split_unit(y)[0]} (bytes)")
    ax.set_title(title or f"Memory vs {(xlabel or _label(x)).split(' (')[0]}")
    return ax


def roofline(
    ax=None,
    *,
    peak_flops: float,
    peak_bandwidth: float,
    points=(),
    title: str | None = None,
):
    """The roofline: attainable FLOP/s = min(peak_flops, peak_bandwidth x arithmetic intensity).

    ``points`` are ``(name, arithmetic_intensity in FLOP/byte, achieved FLOP/s)``; each is labelled
    with its fraction of the roof above it. Left of the ridge a kernel is memory-bound, right of it
    compute-bound.
    """
    if not (peak_flops > 0 and peak_bandwidth > 0):
        raise ValueError(f"peak_flops and peak_bandwidth must be > 0; got {peak_flops}, {peak_bandwidth}")
    points = list(points)
    for p in points:
        if len(p) != 3 or p[1] <= 0 or p[2] <= 0:
            raise ValueError(f"each point must be (name, intensity > 0, flops_per_s > 0); got {p!r}")
    ax = _new_ax(ax)
    ridge = peak_flops / peak_bandwidth
    intensities = [ridge] + [p[1] for p in points]
    lo, hi = min(intensities) / 10, max(intensities) * 10
    y_lo = min([peak_bandwidth * lo] + [p[2] for p in points]) / 2
    roof_color = "0.25"
    flops, bw = _human_si("FLOP/s"), _human_si("B/s")

    ax.plot([lo, ridge], [peak_bandwidth * lo, peak_flops], color=roof_color, lw=2,
            label=f"memory-bound: {bw(peak_bandwidth)} × intensity")
    ax.plot([ridge, hi], [peak_flops, peak_flops], color=roof_color, lw=2, ls="--",
            label=f"compute-bound: {flops(peak_flops)}")
    ax.axvline(ridge, color=roof_color, lw=0.8, ls=":")
    # Written up the ridge line, from the bottom, where no point or roof can be.
    ax.text(ridge, y_lo * 1.5, f" ridge: {ridge:.3g} FLOP/byte", rotation=90, ha="right", va="bottom", fontsize=9)
    colors = sns.color_palette(n_colors=max(len(points), 1))
    for (name, intensity, achieved), color in zip(points, colors):
        roof = min(peak_flops, peak_bandwidth * intensity)
        ax.scatter([intensity], [achieved], color=color, zorder=3, label=f"{name} ({achieved / roof:.0%} of roof)")

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(y_lo, peak_flops * 3)
    ax.xaxis.set_major_formatter(_plain)
    ax.yaxis.set_major_formatter(flops)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("performance (FLOP/s)")
    ax.set_title(title or "Roofline")
    # Below the axes: inside, any corner can hide a point, the roof or the ridge label.
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return ax


def loss_curves(
    df: pd.DataFrame,
    x: str = "step",
    y: str = "loss",
    hue: str | None = "run",
    ax=None,
    logy: bool = False,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "Training loss",
):
    """Training curves, one line per ``hue`` (set ``hue=None`` for a single run)."""
    _check_columns(df, x, y, hue)
    ax = _new_ax(ax)
    _lines(ax, df, x, y, hue, marker=None)
    if logy:
        ax.set_yscale("log")
    # Cross-entropy from torch's F.cross_entropy is in nats per token.
    default_x = "training step (optimizer steps)" if x == "step" else _label(x)
    default_y = "loss (nats/token)" if y == "loss" else _label(y)
    ax.set_xlabel(xlabel or default_x)
    ax.set_ylabel(ylabel or default_y)
    ax.set_title(title)
    return ax
