"""Grading support for the labs: run one part's hidden tests against what the student defined.

A graded cell of a lab calls, inside its hidden-test region::

    from effml_lib.grading import run_hidden_tests
    run_hidden_tests("lab01", "attention", globals())

which runs the pytest suite ``grading/hidden/lab01/test_attention.py`` in the student's kernel. The
suite reaches the student's definitions through the ``student`` fixture (``student.causal_attention``).
While the student's functions run, the library's own implementation of the graded function is
unavailable: the library functions that a lab asks students to write call :func:`guard` first, which
raises :class:`GradingError` for the names being graded, however the student imported them. The
hidden tests themselves may still call the library, to compute expected values.

Only each test's name and its failure message are printed, never the test code, so feedback can be
shown to students without revealing the hidden tests. Any failure raises ``AssertionError``, which
nbgrader scores as zero points for that cell: one graded cell per lab part, so partial credit is real.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from pathlib import Path

import torch

# Qualified names ("attention.attention") whose library implementation is unavailable right now.
_unavailable: set[str] = set()

# For each lab part: the library functions a submission must not call while that part is graded.
_LAB01_ALL = ("attention.attention", "model.RMSNorm", "model.FeedForward", "model.Block")
BLOCKED_DURING: dict[tuple[str, str], tuple[str, ...]] = {
    ("lab01", "attention"): ("attention.attention",),
    ("lab01", "rmsnorm"): ("model.RMSNorm",),
    ("lab01", "swiglu"): ("model.FeedForward",),
    ("lab01", "block"): _LAB01_ALL,  # the block must be built from the student's own parts
}


class GradingError(RuntimeError):
    """Raised when a submission calls the library's own implementation of what is being graded."""


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


def hidden_tests_dir() -> Path:
    """``$EFFML_HIDDEN_TESTS`` if set, else ``grading/hidden`` of the checkout effml_lib runs from."""
    env = os.environ.get("EFFML_HIDDEN_TESTS")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "grading" / "hidden"
    if not path.is_dir():
        raise FileNotFoundError(
            f"hidden tests not found at {path}; set EFFML_HIDDEN_TESTS to the course's grading/hidden folder"
        )
    return path


def _while_blocked(fn, blocked: tuple[str, ...]):
    """``fn`` made to run with the graded library functions unavailable (only during its own calls,
    so the hidden tests can still use the library to compute their expected values)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with library_unavailable(*blocked):
            return fn(*args, **kwargs)

    return wrapper


class _Collector:
    """A pytest plugin: hands the student's namespace to tests and records outcomes without code."""

    def __init__(self, namespace: dict, blocked: tuple[str, ...]):
        self.namespace = {
            name: _while_blocked(value, blocked) if isinstance(value, types.FunctionType) else value
            for name, value in namespace.items()
        }
        self.results: list[tuple[str, str, str]] = []  # (test name, outcome, message)

    def pytest_configure(self, config):
        import pytest

        namespace = self.namespace

        class StudentFixture:
            @pytest.fixture
            def student(self):
                return types.SimpleNamespace(**namespace)

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
