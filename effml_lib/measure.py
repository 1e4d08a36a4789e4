"""Measuring time, memory and bandwidth honestly, and recording where it was measured.

- :func:`benchmark`: median and spread of repeated runs after warm-up (CUDA events on GPU).
- :func:`peak_memory`: the extra memory a call needs at its peak (CUDA allocator stats on GPU;
  on CPU, the profiler's allocation/free events replayed in order).
- :func:`copy_bandwidth`: device-to-device copy speed, the physical limit benchmarks compare to.
- :func:`env_info` / :func:`save_result`: every result file says which machine and versions made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from . import __version__
from .device import _as_device, cpu_count, cpu_name, describe, get_device

MAX_REPS = 100_000  # cap for min_time_s, so a near-empty function cannot loop for ever


# ----------------------------------------------------------------------------- timing

def _format_seconds(s: float) -> tuple[float, str]:
    """Scale seconds to the unit that makes the number readable (thresholds allow for rounding)."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if abs(s) >= 0.9995 * scale:
            return s / scale, unit
    return s / 1e-9, "ns"


@dataclasses.dataclass
class Timing:
    """Wall time of repeated runs of one call, in seconds; print it for a one-line summary."""

    median_s: float
    q25_s: float
    q75_s: float
    min_s: float
    max_s: float
    reps: int
    samples_s: list[float]
    device: str

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def median_us(self) -> float:
        return self.median_s * 1e6

    @property
    def q25_ms(self) -> float:
        return self.q25_s * 1e3

    @property
    def q75_ms(self) -> float:
        return self.q75_s * 1e3

    @property
    def iqr_s(self) -> float:
        """Interquartile range: the spread of the middle half of the samples."""
        return self.q75_s - self.q25_s

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        """A flat dict for a DataFrame row or JSON (``median_ms``, ``q25_ms``, ``q75_ms``... included)."""
        d = dataclasses.asdict(self)
        if not samples:
            del d["samples_s"]
        for k in ("median", "q25", "q75", "min", "max"):
            d[f"{k}_ms"] = d[f"{k}_s"] * 1e3
        return d

    def __str__(self) -> str:
        value, unit = _format_seconds(self.median_s)
        scale = value / self.median_s if self.median_s else 1.0
        return f"{value:.3g} {unit} ± {self.iqr_s * scale:.2g} (IQR), n={self.reps}"


def _find_device(args, kwargs) -> torch.device | None:
    """The device of the first tensor in the (possibly nested) arguments, CUDA winning over CPU."""
    found = []

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            found.append(obj.device)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                visit(o)
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                found.append(p.device)
                break

    visit(args)
    visit(kwargs)
    for kind in ("cuda", "mps", "cpu"):
        for d in found:
            if d.type == kind:
                return d
    return None


def _check_count(name: str, value, minimum: int) -> None:
    # bool is an int in Python, but benchmark(f, reps=True) is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _resolve_device(device, args, kwargs) -> torch.device:
    if device is not None:
        return _as_device(device)
    # No tensors in the arguments (e.g. a closure): assume the default device, so that a closure
    # over CUDA tensors is still synchronised. CPU work timed with CUDA events is timed correctly too.
    return _find_device(args, kwargs) or get_device()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def benchmark(
    fn: Callable,
    *args,
    warmup: int = 3,
    reps: int = 20,
    device=None,
    min_time_s: float | None = None,
    **kwargs,
) -> Timing:
    """Time ``fn(*args, **kwargs)``: ``warmup`` untimed calls, then at least ``reps`` timed ones.

    With ``min_time_s``, keeps timing past ``reps`` until the timed calls add up to that long
    (at most ``MAX_REPS``). ``device`` defaults to that of the tensor arguments (else the default
    device). On CUDA each call is timed with CUDA events, starting from an idle GPU, so a sample
    is the latency of one call; elsewhere with ``time.perf_counter`` around a synchronised call.
    ``warmup``, ``reps``, ``device`` and ``min_time_s`` are taken by benchmark, not passed to fn.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    _check_count("warmup", warmup, 0)
    _check_count("reps", reps, 1)
    if min_time_s is not None:
        if isinstance(min_time_s, bool) or not isinstance(min_time_s, (int, float)):
            raise TypeError(f"min_time_s must be a number of seconds or None; got {min_time_s!r}")
        if not (min_time_s >= 0 and math.isfinite(min_time_s)):
            raise ValueError(f"min_time_s must be a finite number >= 0; got {min_time_s}")
    dev = _resolve_device(device, args, kwargs)

    # Warm-up: first calls pay for compilation, autotuning, allocator growth, cold caches.
    for _ in range(warmup):
        fn(*args, **kwargs)
    _sync(dev)
    gc.collect()  # so that a collection of the warm-up's garbage does not land in a sample

    samples: list[float] = []
    total = 0.0
    # Events record on the current stream of the current device: make that dev's.
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        while len(samples) < reps or (min_time_s is not None and total < min_time_s and len(samples) < MAX_REPS):
            if dev.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()  # the GPU is idle: previous calls do not overlap this one
                start.record()
                fn(*args, **kwargs)
                end.record()
                end.synchronize()
                t = start.elapsed_time(end) / 1e3  # elapsed_time is in ms
            else:
                _sync(dev)
                t0 = time.perf_counter()
                fn(*args, **kwargs)
                _sync(dev)
                t = time.perf_counter() - t0
            samples.append(t)
            total += t

    q25, median, q75 = np.percentile(samples, [25, 50, 75]).tolist()
    return Timing(
        median_s=median, q25_s=q25, q75_s=q75, min_s=min(samples), max_s=max(samples),
        reps=len(samples), samples_s=samples, device=str(dev),
    )


# ----------------------------------------------------------------------------- memory

class PeakMemory(NamedTuple):
    """What :func:`peak_memory` returns; unpacks as ``result, peak_bytes = peak_memory(...)``."""

    result: Any
    peak_bytes: int

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


@contextlib.contextmanager
def _quiet_profiler():
    """Hide the profiler's own chatter while it starts and stops: Kineto's "profiler_start/stop"
    lines on the C++ stderr (file descriptor 2) and, in some torch versions, a UserWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, AttributeError, ValueError):  # no real fd 2 (some GUIs, Windows services)
            yield
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def _cpu_peak_bytes(fn, args, kwargs):
    """Run fn under the profiler and replay its CPU allocation (+) and free (-) events in time
    order: the peak of the running sum is the most extra tensor memory alive at any moment."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_profiler():
        prof.start()
    try:
        result = fn(*args, **kwargs)  # fn's own output and warnings are left alone
    finally:
        with _quiet_profiler():
            prof.stop()
    # The raw Kineto events keep each allocation and free with its own timestamp; the aggregated
    # FunctionEvents fold them into their ops and would hide peaks inside an op.
    try:
        events = prof.profiler.kineto_results.events()
        deltas = [
            (e.start_ns(), e.nbytes()) for e in events
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        ]
    except AttributeError as e:  # the profiler's raw-event API moved
        raise RuntimeError(f"peak_memory on CPU needs torch.profiler's raw memory events: {e}") from None
    deltas.sort(key=lambda d: d[0])  # stable: simultaneous events keep their recorded order
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return result, peak


def peak_memory(fn: Callable, *args, device=None, **kwargs) -> PeakMemory:
    """Run ``fn(*args, **kwargs)`` once; return ``PeakMemory(result, peak_bytes)``.

    ``peak_bytes`` is the most extra tensor memory alive at any moment during the call, above
    what was allocated when it started (a returned tensor counts; memory freed before the peak
    does not add up). On CUDA it comes from the caching allocator's peak statistic; on CPU from
    the profiler's allocation and free events replayed in order. Other devices raise.
    ``device`` defaults to that of the tensor arguments, else the default device.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    dev = _resolve_device(device, args, kwargs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(dev)
        return PeakMemory(result, int(torch.cuda.max_memory_allocated(dev) - base))
    if dev.type == "cpu":
        result, peak = _cpu_peak_bytes(fn, args, kwargs)
        return PeakMemory(result, int(peak))
    raise NotImplementedError(f"peak_memory measures cpu and cuda, not {dev}; pass device='cpu' with CPU tensors")


# ----------------------------------------------------------------------------- bandwidth

def copy_bandwidth(device=None, nbytes: int | None = None, warmup: int = 3, reps: int = 20) -> float:
    """Bytes per second of copying ``nbytes`` within ``device`` (bytes read + written).

    Default size: 1 GiB on CUDA, 256 MiB elsewhere; both dwarf every cache, so this measures
    memory. On an H100 a 256 MiB copy lasts ~0.2 ms and per-call overhead still shows (~4%).
    """
    dev = get_device() if device is None else _as_device(device)
    if nbytes is None:
        nbytes = 2**30 if dev.type == "cuda" else 2**28
    _check_count("nbytes", nbytes, 1)
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)  # ones, not empty: touch every page
    dst = torch.empty_like(src)
    t = benchmark(dst.copy_, src, warmup=warmup, reps=reps, device=dev)
    return 2 * nbytes / t.median_s


# ----------------------------------------------------------------------------- environment

def env_info(device=None) -> dict[str, Any]:
    """Where and with what a measurement was made; JSON-serialisable."""
    dev = get_device() if device is None else _as_device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "effml_lib": __version__,
        "device": str(dev),
        "device_name": describe(dev),
        "device_memory_bytes": None,
        "cpu": cpu_name(),
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev.index if dev.index is not None else torch.cuda.current_device())
        info["device_memory_bytes"] = int(props.total_memory)
        info["device_capability"] = f"{props.major}.{props.minor}"
        info["device_sm_count"] = int(props.multi_processor_count)
    return info


def _jsonable(obj):
    """json.dump's fallback for what results usually hold: Timings, numpy and torch scalars, frames."""
    if isinstance(obj, Timing):
        return obj.to_dict(samples=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (np.generic, np.ndarray, torch.Tensor)):
        return obj.tolist()  # a scalar becomes a Python number, an array nested lists
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # a pandas DataFrame
        return obj.to_dict(orient="records")
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def device_slug(device=None) -> str:
    """A folder name for a device's results: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    dev = get_device() if device is None else _as_device(device)
    return re.sub(r"[^a-z0-9]+", "-", describe(dev).lower()).strip("-")


def save_result(path, results: dict | list, device=None) -> Path:
    """Write ``{"env": env_info(device), "results": results}`` as JSON to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"env": env_info(device), "results": results}
    text = json.dumps(payload, indent=2, default=_jsonable, allow_nan=True)
    path.write_text(text + "\n")
    return path


# ----------------------------------------------------------------------------- shipped results

# Benchmark results that notebooks show as "precomputed on a GPU". The scripts in bench/ write them to
# bench/results/<device>/; the ones the notebooks read are copied here, inside the package, so that a
# plain `pip install` (Colab, a user's venv) has them too. tests/test_shipped_results.py keeps the
# two copies identical.
RESULTS_DIR = Path(__file__).resolve().parent / "assets" / "results"


def load_result(device: str, name: str) -> dict:
    """The result file ``bench/results/<device>/<name>.json`` as shipped with the package:
    ``{"env": ..., "results": ...}``. ``device`` is a :func:`device_slug`, e.g. ``"nvidia-h200"``."""
    path = RESULTS_DIR / device / f"{name}.json"
    if not path.is_file():
        shipped = sorted(f"{p.parent.name}/{p.stem}" for p in RESULTS_DIR.glob("*/*.json"))
        raise FileNotFoundError(
            f"no shipped result {device}/{name}.json; the package ships {shipped}. To ship another, run its "
            f"benchmark (bench/) and copy bench/results/{device}/{name}.json to {RESULTS_DIR}/{device}/"
        )
    return json.loads(path.read_text())
