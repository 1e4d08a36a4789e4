"""Grading support for the labs: run one part's hidden tests against what the student defined.

A graded cell of a lab calls, inside its hidden-test region::

    from effml_lib.grading import run_hidden_tests
    run_hidden_tests("lab01", "attention", globals())

which runs the pytest suite ``grading/hidden/lab01/test_attention.py`` in the student's kernel. The
suite reaches the student's definitions through the ``student`` fixture (``student.causal_attention``).
While the student's functions run, the library's own implementation of the graded function is
unavailable: the library functions that a lab asks students to write call :func:`guard` first, which
raises :class:`GradingError` for the names being graded, however the student imported them. Parts that
grade attention also ban PyTorch's own fused attention (:data:`TORCH_SDPA`, see :func:`sdpa_unavailable`).
The hidden tests themselves may still call the library, to compute expected values.

Only each test's name and its failure message are printed, never the test code, so feedback can be
shown to students without revealing the hidden tests. Any failure raises ``AssertionError``, which
nbgrader scores as zero points for that cell: one graded cell per lab part, so partial credit is real.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import statistics
import time
import types
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Qualified names ("attention.attention") whose library implementation is unavailable right now.
_unavailable: set[str] = set()

# In BLOCKED_DURING, this name bans PyTorch's fused attention (F.scaled_dot_product_attention), not a
# library function.
TORCH_SDPA = "torch.sdpa"

# For each lab part: what a submission must not call while that part is graded.
_LAB01_ALL = ("attention.attention", "model.RMSNorm", "model.FeedForward", "model.Block")
BLOCKED_DURING: dict[tuple[str, str], tuple[str, ...]] = {
    ("lab01", "attention"): ("attention.attention", TORCH_SDPA),
    ("lab01", "rmsnorm"): ("model.RMSNorm",),
    ("lab01", "swiglu"): ("model.FeedForward",),
    ("lab01", "block"): _LAB01_ALL + (TORCH_SDPA,),  # the block must be built from the student's own parts
    ("lab01", "performance"): ("attention.attention", TORCH_SDPA),  # the attention timed must be the student's
    ("lab02", "frequencies"): ("rope.rope_frequencies",),
    ("lab02", "apply_rope"): ("rope.apply_rope",),
    ("lab02", "conversion"): ("rope.permute_qk_weight",),
    ("lab02", "distance"): ("rope.apply_rope",),
    ("lab02", "performance"): ("rope.apply_rope",),
    ("lab03", "bytes"): ("kvcache.kv_cache_bytes",),
    # The library's cache (and so the model's own cached forward and generate) is off for the rest.
    ("lab03", "cache"): ("kvcache.StaticKVCache",),
    ("lab03", "forward"): ("kvcache.StaticKVCache",),
    ("lab03", "generate"): ("kvcache.StaticKVCache",),
    ("lab03", "performance"): ("kvcache.StaticKVCache",),
    ("lab04", "attention"): ("attention.attention", TORCH_SDPA),
    ("lab04", "pooling"): ("attention.mha_to_gqa",),
    ("lab04", "conversion"): ("attention.mha_to_gqa",),
    ("lab04", "memory"): ("attention.attention", TORCH_SDPA),
}

SDPA_MESSAGE = ("F.scaled_dot_product_attention is unavailable while this part is graded: "
                "write the softmax(qkᵀ/√d)v yourself")


class GradingError(RuntimeError):
    """Raised when a submission calls the library's own implementation of what is being graded, or
    PyTorch's fused attention where that is banned."""


def guard(name: str) -> None:
    """Called first thing by every library function that a lab asks students to implement.

    Inside torch.compile it is skipped at trace time (grading never compiles), so it costs compiled
    code nothing and causes no graph break.
    """
    if torch.compiler.is_compiling():
        return
    if name in _unavailable:
        raise GradingError(
            f"effml_lib.{name} is unavailable while this part is graded: the lab asks for your own "
            f"implementation, so it cannot call the library's."
        )


@contextlib.contextmanager
def library_unavailable(*names: str):
    """Within the block, ``guard(name)`` raises for each of ``names``."""
    added = [n for n in names if n not in _unavailable]
    _unavailable.update(added)
    try:
        yield
    finally:
        _unavailable.difference_update(added)


# PyTorch's attention, by operator name. Its public entry point (and the math fallback, which breaks
# into ordinary matmuls below the dispatcher) is caught where Python calls it: a TorchFunctionMode sees
# every torch call made from Python, however imported, torch.ops.aten.* included. The fused kernels it
# dispatches to are caught by a TorchDispatchMode, which also sees calls made from C++ (inside
# nn.MultiheadAttention, TorchScript). On CPU, torch 2.13 runs _scaled_dot_product_flash_attention_for_cpu.
_SDPA_OPS = frozenset({
    "scaled_dot_product_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
})


def _op_name(func) -> str:
    """``aten._foo.default`` -> ``_foo``; a Python-visible torch function's own name otherwise."""
    name = getattr(func, "__name__", None)
    return name.split(".")[0] if isinstance(name, str) else ""


class _NoSDPACalls(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _op_name(func) in _SDPA_OPS:
            raise GradingError(SDPA_MESSAGE)
        return func(*args, **(kwargs or {}))


class _NoSDPAKernels(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _op_name(func) in _SDPA_OPS:
            raise GradingError(SDPA_MESSAGE)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def sdpa_unavailable():
    """Within the block, any call of PyTorch's scaled-dot-product attention raises :class:`GradingError`.

    Every torch op then passes through Python twice (both modes), which is fine for correctness checks
    but would distort a timing: performance parts time without it (see :func:`without_sdpa_ban`).
    """
    with _NoSDPACalls(), _NoSDPAKernels():
        yield


HIDDEN_TESTS_ENV = "EFFML_HIDDEN_TESTS"


def hidden_tests_dir() -> Path:
    """The folder of the labs' hidden suites (``<lab>/test_<part>.py``): ``$EFFML_HIDDEN_TESTS`` if set,
    else ``grading/hidden`` of the course repository, found beside ``effml_lib`` when the package runs
    from a clone (``pip install -e .``). A plain ``pip install`` ships no hidden tests: graders outside
    the repository set the variable. Raises ``FileNotFoundError`` saying which folder is missing and how
    to point at one."""
    env = os.environ.get(HIDDEN_TESTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{HIDDEN_TESTS_ENV} is set to {env!r}, which is not a folder: point it at a folder laid out "
                f"like the course repository's grading/hidden (lab01/test_attention.py, ...)")
        return path
    package = Path(__file__).resolve().parent
    path = package.parent / "grading" / "hidden"
    if not path.is_dir():
        raise FileNotFoundError(
            f"cannot find the labs' hidden tests: effml_lib runs from {package}, which has no "
            f"grading/hidden beside it ({path}); a plain `pip install` of the package does not ship them. "
            f"Set {HIDDEN_TESTS_ENV} to a folder laid out like the course repository's grading/hidden, or "
            f"grade from a clone of the course repository with the package installed from it in editable "
            f"mode (pip install -e .).")
    return path


def _while_blocked(fn, blocked: tuple[str, ...]):
    """``fn`` made to run with what ``blocked`` names unavailable (only during its own calls, so the
    hidden tests can still use the library to compute their expected values)."""
    names = tuple(n for n in blocked if n != TORCH_SDPA)
    ban_sdpa = TORCH_SDPA in blocked

    def wrapper(*args, **kwargs):
        with library_unavailable(*names), sdpa_unavailable() if ban_sdpa else contextlib.nullcontext():
            return fn(*args, **kwargs)

    def for_timing(*args, **kwargs):  # the library stays blocked: that costs a set lookup, not a mode
        with library_unavailable(*names):
            return fn(*args, **kwargs)

    for w in (wrapper, for_timing):
        try:
            functools.update_wrapper(w, fn)
        except Exception:  # an exotic callable whose attributes cannot be read: the wrapper works anyway
            pass
    wrapper._effml_for_timing = for_timing
    return wrapper


def without_sdpa_ban(fn):
    """A student's function as a performance part times it: still without the library's implementation,
    but without :func:`sdpa_unavailable`, whose modes would route every torch op through Python and slow
    the student unfairly. Check the function's output under the ban (call ``fn`` itself) before timing
    this. Anything not given to the tests by :func:`run_hidden_tests` is returned unchanged.
    """
    return getattr(fn, "_effml_for_timing", fn)


def close_enough(actual, expected, atol: float, rtol: float) -> bool:
    """For hidden tests: True when ``actual`` is a tensor of ``expected``'s shape and every element is
    within ``atol + rtol * |expected|`` (compared in float64)."""
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    return bool(torch.isclose(actual.double(), expected.double(), atol=atol, rtol=rtol).all())


def expect_value_error(call, name: str, what: str) -> None:
    """For hidden tests: ``call()`` must raise a ValueError whose message names ``name``; ``what``
    describes the bad input, for the student's message. Anything else raised fails with its type."""
    try:
        call()
    except ValueError as error:
        assert name in str(error), f"the error for {what} should name {name}: {error}"
        return
    except Exception as error:  # noqa: BLE001 - a student's code may raise anything
        raise AssertionError(f"{what} should raise a ValueError naming {name}, "
                             f"got {type(error).__name__}: {error}") from None
    raise AssertionError(f"{what} must raise a ValueError naming {name}")


class _Collector:
    """A pytest plugin: hands the student's namespace to tests and records outcomes without code."""

    def __init__(self, namespace: dict, blocked: tuple[str, ...]):
        # Every callable but a class is wrapped: a functools.partial or an object with __call__
        # must not slip past the blocks.
        self.namespace = {
            name: _while_blocked(value, blocked) if callable(value) and not isinstance(value, type) else value
            for name, value in namespace.items()
        }
        self.results: list[tuple[str, str, str]] = []  # (test name, outcome, message)

    def pytest_configure(self, config):
        import pytest

        namespace = self.namespace

        class StudentFixture:
            # The fixtures every lab's hidden tests share; a lab's own conftest.py adds the rest.
            @pytest.fixture
            def student(self):
                return types.SimpleNamespace(**namespace)

            @pytest.fixture
            def gen(self):
                return torch.Generator().manual_seed(2026)

            @pytest.fixture
            def close(self):
                """``close(actual, expected, atol, rtol)``"""
                return close_enough

            @pytest.fixture
            def value_error(self):
                """``value_error(call, name, what)``"""
                return expect_value_error

        config.pluginmanager.register(StudentFixture(), "effml-student")

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome == "failed":
            message = ""
            if report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(report.longrepr).splitlines()[-1]
                # Keep the test's own message; drop any expression pytest's assertion rewriting
                # appended after it (it would quote the hidden test's code).
                message = message.split("\nassert ")[0].strip()
            self.results.append((report.nodeid.split("::")[-1], report.outcome, message))


def run_hidden_tests(lab: str, part: str, namespace: dict, blocked: tuple[str, ...] | None = None) -> int:
    """Run ``grading/hidden/<lab>/test_<part>.py`` against ``namespace``; raise if any test fails.

    Returns the number of tests passed. ``blocked`` defaults to ``BLOCKED_DURING[(lab, part)]``.
    """
    import pytest

    suite = hidden_tests_dir() / lab / f"test_{part}.py"
    if not suite.is_file():
        raise FileNotFoundError(f"no hidden tests for {lab} part {part!r} at {suite}")
    blocked = BLOCKED_DURING.get((lab, part), ()) if blocked is None else blocked
    collector = _Collector(namespace, blocked)
    args = [str(suite), "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", "--tb=no", "--import-mode=importlib", "--assert=plain",
            "-rN", "--disable-warnings", "-o", "console_output_style=classic"]
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        exit_code = pytest.main(args, plugins=[collector])
    passed = sum(outcome == "passed" for _, outcome, _ in collector.results)
    failed = [(name, msg) for name, outcome, msg in collector.results if outcome == "failed"]
    print(f"{lab} / {part}: {passed} of {len(collector.results)} hidden tests passed")
    for name, msg in failed:
        print(f"  FAILED {name}: {msg}")
    if failed or exit_code not in (0,) or not collector.results:
        raise AssertionError(f"{lab} / {part}: {len(failed)} hidden test(s) failed" if failed
                             else f"{lab} / {part}: the hidden tests did not run (pytest exit code {int(exit_code)})")
    return passed


# ----------------------------------------------------------------------------- performance parts

def _seconds(fn, args, n: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_interleaved(fns: dict, args: tuple, device: str = "cpu", warmup: int = 3, reps: int = 15,
                     sample_s: float = 0.02, max_sample_s: float = 0.5, budget_s: float = 1.0) -> dict:
    """Median seconds per call of each of ``fns`` (name -> fn) on ``args``, for a lab's performance part.

    After warm-up the functions take turns, one sample each per round, so whatever else loads the
    machine hits them alike. One sample is n back-to-back calls, n chosen so the faster function's
    sample lasts about ``sample_s``: long against the OS's time slices, so a process sharing the cores
    takes the same share of both functions' samples. Stops after ``budget_s`` (and at least 3 rounds).
    """
    one_call = {name: min(_seconds(fn, args, 1, device) for _ in range(warmup)) for name, fn in fns.items()}
    n = max(1, min(round(sample_s / max(min(one_call.values()), 1e-9)),
                   int(max_sample_s / max(max(one_call.values()), 1e-9))))
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    for round_ in range(reps):
        if round_ >= 3 and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            samples[name].append(_seconds(fn, args, n, device) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


@contextlib.contextmanager
def one_thread():
    """Time on one thread: a second grading process on the same cores then takes a core of its own
    instead of stalling ours, and a ratio of two timings stays put."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def judge_speed(medians: list[dict], seq_lens, factor: float, name: str, title: str, advice: str) -> None:
    """A performance part's verdict: ``medians[i]`` holds the seconds per call of ``"yours"`` and
    ``"reference"`` at ``seq_lens[i]``. Shows both as a plot in the graded cell (the plot never changes
    the grade), then asserts that yours takes at most ``factor`` times the reference at the longest
    length, with a message naming both times and ``advice`` for a too-slow submission."""
    yours_ms, ref_ms = medians[-1]["yours"] * 1e3, medians[-1]["reference"] * 1e3
    ratio, longest = yours_ms / ref_ms, seq_lens[-1]
    rows = [{"seq_len": t, "implementation": label, "median_ms": m[key] * 1e3}
            for t, m in zip(seq_lens, medians)
            for key, label in (("yours", f"your {name}"), ("reference", "reference"))]
    try:
        _show_latency_plot(rows, (seq_lens, [factor * m["reference"] * 1e3 for m in medians], f"{factor:g}× reference (the limit)"),
                           f"{title}\npasses if ≤ {factor:g}× the reference at T = {longest} (yours: {ratio:.1f}×)")
    except Exception:
        pass
    assert ratio <= factor, (
        f"too slow: at T = {longest} your {name} takes {yours_ms:.2f} ms, the reference {ref_ms:.2f} ms, "
        f"{ratio:.1f}× (allowed {factor:g}×). {advice}")


def _show_latency_plot(rows: list[dict], limit: tuple[list, list, str], title: str) -> None:
    """Display the latency plot in the graded cell's output; outside a Jupyter kernel do nothing.
    ``limit``: (lengths, ms, label) of the pass line, drawn dashed. The PNG is made in memory: grading
    writes no file."""
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

    from .plots import latency_vs_size

    fig = Figure(figsize=(6.5, 4.2))  # not pyplot's: nothing else will draw it again at the cell's end
    ax = latency_vs_size(pd.DataFrame(rows), "seq_len", "median_ms", hue="implementation", ax=fig.subplots(),
                         xlabel="sequence length T (tokens)", ylabel="latency (ms)", title=title)
    xs, ms, label = limit
    ax.plot(xs, ms, color="0.4", ls="--", label=label)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    display(Image(data=png.getvalue()))
