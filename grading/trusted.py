"""The trusted side of grading one student: runs the notebook in a sandbox, then the hidden tests here.

    python grading/trusted.py JOB.json RESULT.json

``JOB.json`` names the lab, the notebook's cells (code and graded markers, in order) and the
limits; ``RESULT.json`` gets each cell's outputs and each part's hidden-test results. The
autograde driver (grading/autograde.py) runs one of these per student and turns the result into
nbgrader's graded notebook, scores and feedback.

Nothing the student wrote runs in this process. The notebook runs in a sandboxed worker
(grading/sandbox.py, grading/worker.py); the hidden tests run here under pytest and reach the
student's names through the ``student`` fixture, whose calls go over grading/channel.py and come
back as plain data. Every comparison, every timing and every message is made here. The sandbox is
killed before the result is written.

The same fixtures also run hidden suites against a namespace in this process (``LocalStudent``),
which is how tests/test_labNN_hidden.py tries the solution and realistic mistakes quickly; values
still cross the channel's encoding both ways, so a submission sees the same types either way.
"""

from __future__ import annotations

import base64
import contextlib
import io
import signal
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

GRADING = Path(__file__).resolve().parent
if str(GRADING) not in sys.path:
    sys.path.insert(0, str(GRADING))

from channel import ChannelError, Decoder, Encoder, pack, parse  # noqa: E402

ROOT = GRADING.parent
MAX_MESSAGE = 400  # characters of one failure message in feedback


# ----------------------------------------------------------------------------- failures

BUILTIN_EXCEPTIONS = {name for name, value in vars(__import__("builtins")).items()
                      if isinstance(value, type) and issubclass(value, BaseException)}


class StudentRaised(Exception):
    """The student's code raised. ``type_name`` and ``message`` may be checked (is it a ValueError
    that names ``positions``?) but are never shown: the text is the student's."""

    def __init__(self, what: str, raised: dict):
        self.type_name = str(raised.get("type", "Exception"))[:100]
        self.builtin = bool(raised.get("builtin"))
        self.message = str(raised.get("message", ""))
        shown = self.type_name if self.builtin and self.type_name in BUILTIN_EXCEPTIONS else "an exception"
        why = (" (its result could not be read)" if raised.get("unsendable") else
               " (a stub not yet written, or a library function this lab hides while your code is graded)"
               if shown == "NotImplementedError" else "")
        super().__init__(f"{what} raised {shown}{why}")


class StudentMissing(AttributeError):
    """The student's notebook does not define a name a test asks for."""


class StudentGone(Exception):
    """The student's process hung past its time, crashed or broke the channel: nothing more can be asked."""


# ----------------------------------------------------------------------------- the remote side

class Remote:
    """The trusted end of one worker's channel. ``request`` sends one message and returns the
    final reply, answering the worker's callbacks (calls on the test's objects) in between."""

    def __init__(self, endpoint, deadline: float | None = None, arena=None):
        self.endpoint, self.arena = endpoint, arena
        self.deadline = deadline
        self.objects: dict[int, object] = {}  # this side's objects the worker holds handles to
        self.dead: str | None = None
        self.library: set[str] = set()  # the lab's hidden library names, run here on request ...
        self.library_open = False  # ... only while the notebook runs

    def register(self, obj) -> tuple[int, str]:
        handle = len(self.objects) + 1
        self.objects[handle] = obj
        return handle, "function" if callable(obj) else "object"

    def encoder(self, allow_handles=True, method_of=None) -> Encoder:
        def refuse(obj):  # a callback's answer is data, or a method of the object it was asked of
            if method_of is not None and callable(obj) and getattr(obj, "__self__", None) is method_of:
                return self.register(obj)
            raise TypeError(f"a {type(obj).__name__} is not data")

        return Encoder(self.register if allow_handles else refuse,
                       lambda obj: obj._id if isinstance(obj, RemoteObject) and obj._remote is self else None)

    def decode(self, text, data) -> dict:
        def local(handle):
            if handle not in self.objects:
                raise ChannelError("a handle this side never gave")
            return self.objects[handle]

        try:
            return parse(text, data, lambda d: Decoder(d, lambda h: RemoteObject(self, h.id, h.kind), local,
                                                       arena=self.arena, arena_results=True))
        except ChannelError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a crafted message breaks, it is a broken message
            raise ChannelError(f"a message that could not be read ({type(error).__name__})") from None

    def request(self, shared: bool = False, **message) -> dict:
        """``shared``: send the message's tensors through the arena (a performance part's timed calls)."""
        if self.dead:
            raise StudentGone(self.dead)
        try:
            encoder = self.encoder()
            if shared and self.arena is not None:
                self.arena.region(results=False)
                encoder.arena = self.arena
            self.endpoint.send(pack(message, encoder), self.deadline)
            while True:
                reply = self.decode(*self.endpoint.receive(self.deadline))
                if "callback" not in reply:
                    return reply
                answer, method_of = self.callback(reply)
                self.endpoint.send(pack(answer, self.encoder(allow_handles=False, method_of=method_of)), self.deadline)
        except ChannelError as error:
            timed_out = "timed out" in str(error)
            self.dead = ("it ran past the time this part may take and was stopped" if timed_out
                         else "its process crashed or closed the channel")
            raise StudentGone(self.dead) from None

    def callback(self, reply: dict):
        """Something the student's code asked of this side, answered with data only: a call of a
        hidden library function while the notebook runs (``library``), or a public attribute or
        method of a test's object (a handle to anything else would let the caller walk to this
        process's modules and files). Returns the answer and the object whose methods it may name."""
        what = reply.get("callback")
        if what == "library":
            return self.library_call(reply.get("name"), reply.get("params")), None
        target = reply.get("target")
        if type(target) is not int or target not in self.objects:
            return {"raised": "an unknown object"}, None
        obj = self.objects[target]
        try:
            if what == "getattr":
                name = reply.get("name")
                if type(name) is not str or name.startswith("_"):
                    return {"raised": "only public attributes can be read"}, None
                return {"value": getattr(obj, name)}, obj
            if what == "call" and callable(obj):
                return {"value": obj(*reply.get("args", []), **reply.get("kwargs", {}))}, None
        except Exception as error:  # noqa: BLE001 - the test object refused: tell the caller which way
            return {"raised": type(error).__name__}, None
        return {"raised": "not callable"}, None

    def library_call(self, name, params) -> dict:
        """A hidden library function, run here on the sandbox's data while the notebook runs; refused
        while the hidden tests run, so a submission cannot pass by calling the library."""
        if type(name) is not str or name not in self.library or type(params) is not dict:
            return {"raised": "no such library function"}
        if not self.library_open:
            return {"raised": f"effml_lib.{name} is not available while your code is graded: the lab asks for "
                              f"your own implementation"}
        function = real_function(name)
        if isinstance(function, type):  # a constructor would let the caller size the grader's allocations
            return {"raised": "no such library function"}
        try:
            return {"value": call_with(function, params)}
        except Exception as error:  # noqa: BLE001 - the library refused the arguments, as it would there
            return {"raised": f"effml_lib.{name} raised {type(error).__name__}"}


def real_function(name: str):
    """The trusted library's own function for a hidden name ("model.RMSNorm.forward")."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("effml_lib." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = obj.__dict__[attr] if isinstance(obj, type) else getattr(obj, attr)
        return obj
    raise KeyError(name)


def call_with(fn, params: dict):
    """Call ``fn`` with the parameters a forwarding stub sent (its ``locals()`` at entry)."""
    import inspect

    args, kwargs = [], {}
    signature = inspect.signature(fn)
    has_var_positional = any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values())
    for p in signature.parameters.values():
        if p.name not in params:
            continue
        value = params[p.name]
        if p.kind is p.VAR_POSITIONAL:
            args.extend(value)
        elif p.kind is p.VAR_KEYWORD:
            kwargs.update(value)
        elif p.kind is p.POSITIONAL_ONLY or (has_var_positional and p.kind is p.POSITIONAL_OR_KEYWORD):
            args.append(value)
        else:
            kwargs[p.name] = value
    return fn(*args, **kwargs)


class RemoteObject:
    """Something of the student's that is not data: a function, a class, an instance. Calling it
    calls it in the sandbox; reading an attribute asks for it there."""

    def __init__(self, remote: Remote, handle: int, kind: str, name: str = "your code"):
        object.__setattr__(self, "_remote", remote)
        object.__setattr__(self, "_id", handle)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        restore = [i for i, a in enumerate(args) if isinstance(a, (torch.Tensor, nn.Module))]
        reply = self._remote.request(op="call", target=self, args=list(args), kwargs=kwargs, restore=restore)
        if "raised" in reply:
            raise StudentRaised(self._name, reply["raised"] if isinstance(reply["raised"], dict) else {})
        for i, after in zip(restore, reply.get("after", [])):
            copy_back(args[i], after, self._name)
        return named(reply.get("value"), self._name)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        reply = self._remote.request(op="getattr", target=self, name=name)
        if "raised" in reply:
            raise StudentRaised(f"{self._name}.{name}", reply["raised"] if isinstance(reply["raised"], dict) else {})
        return named(reply.get("value"), f"{self._name}.{name}")

    def __setattr__(self, name, value):
        raise AttributeError("the student's objects are read here, not changed")

    def __repr__(self):
        return f"<the student's {self._name}>"


def named(value, name):
    if isinstance(value, RemoteObject):
        object.__setattr__(value, "_name", name)
    return value


def copy_back(arg, after, name: str) -> None:
    """A function that changes an argument in place fails: the test's own inputs (from which it may
    compute the expected value after the call) are never overwritten with what the student made of them."""
    if isinstance(arg, torch.Tensor):
        same = isinstance(after, torch.Tensor) and after.shape == arg.shape and after.dtype == arg.dtype \
            and torch.equal(after, arg.detach().cpu())
    else:
        ours, theirs = arg.state_dict(), after.state_dict() if isinstance(after, nn.Module) else None
        same = (theirs is not None and ours.keys() == theirs.keys() and getattr(arg, "config", None) == getattr(after, "config", None)
                and all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in ours))
    if not same:
        raise AssertionError(f"{name} changed an input passed to it, in place: it must leave its inputs as they were")


class RemoteStudent:
    """The ``student`` fixture: the names a graded cell's part sees, looked up in the sandbox."""

    def __init__(self, remote: Remote, part: str):
        object.__setattr__(self, "_remote", remote)
        object.__setattr__(self, "_part", part)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        reply = self._remote.request(op="lookup", part=self._part, name=name)
        if reply.get("missing"):
            raise StudentMissing(f"your notebook defines no {name}")
        return named(reply.get("value"), name)

    def stage(self, value):
        """Keep ``value`` (a model, a timed part's fixed inputs) in the sandbox; returns a handle to
        pass to later calls instead of sending it again each time."""
        reply = self._remote.request(op="stage", value=value)
        return RemoteObject(self._remote, int(reply["staged"]), "object", "a staged input")


class LocalStudent:
    """A namespace of this process, seen as a submission would be: each call's arguments and result
    go through the channel's encoding, so types are what a sandboxed student's would be."""

    def __init__(self, namespace: dict):
        self.namespace = namespace

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in self.namespace:
            raise StudentMissing(f"your notebook defines no {name}")
        return roundtrip(self.namespace[name], name)

    def stage(self, value):
        return value


class _LocalObject:
    """An object of a local namespace that is not data (a class, an instance, a function), used the
    way the grader uses a sandboxed one: its calls and attributes come back as the channel would
    deliver them, and what it raises arrives as StudentRaised."""

    def __init__(self, obj, name):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        args = [a._obj if isinstance(a, _LocalObject) else a for a in args]
        kwargs = {k: v._obj if isinstance(v, _LocalObject) else v for k, v in kwargs.items()}
        try:
            result = self._obj(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - as a sandboxed student's error would arrive
            raise StudentRaised(self._name, {"type": type(error).__name__, "message": str(error),
                                             "builtin": type(error).__module__ == "builtins"}) from None
        return roundtrip(result, self._name)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            value = getattr(self._obj, name)
        except Exception as error:  # noqa: BLE001
            raise StudentRaised(f"{self._name}.{name}", {"type": type(error).__name__, "message": str(error),
                                                         "builtin": type(error).__module__ == "builtins"}) from None
        return roundtrip(value, f"{self._name}.{name}")



def roundtrip(value, name: str = "your code"):
    """``value`` as the other side of the channel would receive it; what is not data stays here,
    behind a _LocalObject, as it would stay in the sandbox behind a handle."""
    kept = {}

    def keep(obj):
        kept[len(kept) + 1] = obj
        return len(kept), "object"

    encoder = Encoder(keep)
    chunks = pack({"value": value}, encoder)
    text, data = bytes(chunks[1]), memoryview(bytearray(b"".join(chunks[2:])))
    return parse(text, data, lambda d: Decoder(d, lambda h: _LocalObject(kept[h.id], name), kept.__getitem__))["value"]


# ----------------------------------------------------------------------------- checks the tests share

def close_enough(actual, expected, atol: float, rtol: float) -> bool:
    """True when ``actual`` is a plain tensor of ``expected``'s shape within ``atol + rtol * |expected|``
    everywhere (compared in float64). Anything else, a subclass included, is not close."""
    if type(actual) is not torch.Tensor or actual.shape != expected.shape or actual.is_complex():
        return False
    return bool(torch.isclose(actual.double(), expected.double(), atol=atol, rtol=rtol).all())


def expect_value_error(call, name: str, what: str) -> None:
    """``call()`` must raise a ValueError whose message names ``name``. The student's message is
    checked, never quoted."""
    try:
        call()
    except StudentRaised as error:
        if error.type_name != "ValueError" or not error.builtin:
            shown = error.type_name if error.builtin and error.type_name in BUILTIN_EXCEPTIONS else "another exception"
            raise AssertionError(f"{what} should raise a ValueError naming {name}, got {shown}") from None
        assert name in error.message, f"the ValueError for {what} should name {name}"
        return
    raise AssertionError(f"{what} must raise a ValueError naming {name}")


def describe(value) -> str:
    """A student's value, described in words this side chose (for a failure message)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value) if abs(value) < 1e15 else "a huge number"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return "a value of another type" if not isinstance(value, str) else "a string"


# ----------------------------------------------------------------------------- performance parts

class Timing:
    """The ``timing`` fixture: times the student's calls from this side, against a reference run
    here, in turns. Each round makes fresh inputs, so nothing can be remembered from a round
    before; every timed result is checked against the reference's; the channel's own cost is
    measured alike on a worker that runs no student code (an echo) and subtracted."""

    def __init__(self, echo: Remote | None, threads: int = 1):
        self.echo, self.threads = echo, threads

    def compare(self, yours, reference, inputs, check, sample_s: float = 0.02, rounds: int = 9,
                budget_s: float = 1.0, max_calls: int = 64) -> dict:
        """Median seconds per call of ``yours`` and ``reference``. ``inputs(n)`` returns n pairs
        ``(your_args, reference_args)`` (tuples), new each time; ``check(got, expected)`` says
        whether a timed result of yours is right. Raises AssertionError on a wrong timed result."""
        def timed_reference(pairs):
            with self.frozen(yours):  # the student's processes cannot load the machine while the reference runs
                start = time.perf_counter()
                outs = [reference(*ref_args) for _, ref_args in pairs]
                return time.perf_counter() - start, outs

        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t_ref, _ = timed_reference(inputs(1))
            t_yours = self._timed_batch(yours, inputs(1), None)[0]
            t_ref = min(t_ref, timed_reference(inputs(1))[0])
            t_yours = min(t_yours, self._timed_batch(yours, inputs(1), None)[0])
            n = max(1, min(max_calls, round(sample_s / max(min(t_ref, t_yours), 1e-6))))
            samples = {"yours": [], "reference": []}
            start = time.perf_counter()
            for r in range(rounds):
                if r >= 3 and time.perf_counter() - start > budget_s:
                    break
                pairs = inputs(n)
                elapsed, expected = timed_reference(pairs)
                samples["reference"].append(elapsed / n)
                seconds, got = self._timed_batch(yours, pairs, expected)
                for g, e in zip(got, expected):
                    if not check(g, e):
                        raise AssertionError("a timed call of yours returned a wrong result: only correct "
                                             "results are timed")
                samples["yours"].append(seconds / n)
        finally:
            torch.set_num_threads(threads)
        return {name: statistics.median(s) for name, s in samples.items()}

    def _timed_batch(self, yours, pairs, expected) -> tuple[float, list]:
        calls = [[list(y), {}] for y, _ in pairs]
        if not isinstance(yours, RemoteObject):  # a local namespace (tests/test_labNN_hidden.py)
            start = time.perf_counter()
            got = [yours(*args) for args, _ in calls]
            return time.perf_counter() - start, got
        remote = yours._remote
        start = time.perf_counter()  # from before the inputs are written to the arena until the results are read
        reply = remote.request(shared=True, op="batch", target=yours, calls=calls)
        seconds = time.perf_counter() - start
        if "raised" in reply:
            raise StudentRaised(yours._name, reply["raised"] if isinstance(reply["raised"], dict) else {})
        got = reply.get("results")
        if not isinstance(got, list) or len(got) != len(calls):
            raise AssertionError(f"{yours._name}: the timed calls returned no results")
        if self.echo is not None and expected is not None:
            like = [["tensor", list(e.shape), e.dtype] if isinstance(e, torch.Tensor) else ["value", e] for e in expected]
            with self.frozen(yours):  # nothing of the student's runs while the channel's own cost is measured
                echo_start = time.perf_counter()
                self.echo.request(shared=True, op="echo", calls=_for_echo(calls), result_like=like)
                echo_seconds = time.perf_counter() - echo_start
            if os.environ.get("EFFML_TIMING_LOG"):
                with open(os.environ["EFFML_TIMING_LOG"], "a") as log:
                    log.write(json.dumps({"calls": len(calls), "rtt": seconds, "echo": echo_seconds}) + "\n")
            seconds -= echo_seconds
        return max(seconds, 0.0), got

    def frozen(self, yours):
        """Stop every process of the student's sandbox (SIGSTOP) for the length of a block."""
        box = _BOXES.get(yours._remote) if isinstance(yours, RemoteObject) else None
        return _Frozen(box) if box is not None else contextlib.nullcontext()

    def peak_bytes(self, fn, *args) -> int:
        """The most memory the student's process held during one call of ``fn(*args)`` above what it
        held before, as the operating system counts it (the sandbox's resident set's high-water
        mark), so it cannot be faked from inside. Stage large inputs first (``student.stage``)."""
        if not isinstance(fn, RemoteObject):
            from effml_lib.measure import peak_memory

            return peak_memory(fn, *args).peak_bytes
        watch = _WATCH.get(fn._remote)
        if watch is None:
            raise RuntimeError("no process to watch")
        base = watch.reset()
        fn(*args)
        return max(watch.peak() - base, 0)


def _for_echo(calls):
    """The echo gets the same bytes to read; handles to staged inputs mean nothing to it."""
    return [[[None if isinstance(a, RemoteObject) else a for a in args], kwargs] for args, kwargs in calls]


_WATCH: dict = {}
_BOXES: dict = {}  # Remote -> its Sandbox, for freezing


class _Frozen:
    """SIGSTOP to every process of a sandbox on entry, SIGCONT on exit (whatever happens in between)."""

    def __init__(self, box):
        self.box, self.stopped = box, []

    def __enter__(self):
        for _ in range(3):  # again, for anything started while the first ones were being stopped
            for pid in _descendants(self.box.proc.pid):
                if pid not in self.stopped:
                    try:
                        os.kill(pid, signal.SIGSTOP)
                        self.stopped.append(pid)
                    except OSError:
                        pass
        return self

    def __exit__(self, *exc):
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        return False


def _descendants(root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
        except OSError:
            continue
    return found


class _Watch:
    """High-water mark of a process's resident memory (VmHWM), resettable through clear_refs."""

    def __init__(self, pid: int):
        self.pid = pid

    def _status(self, key):
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {key} for process {self.pid}")

    def reset(self) -> int:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")


def judge_speed(medians: list[dict], sizes, factor: float, name: str, title: str, advice: str,
                xlabel: str = "sequence length T (tokens)") -> None:
    """A performance part's verdict: at the largest size, yours may take at most ``factor`` times the
    reference. Draws both (the figure goes into the graded cell's output; it never changes the grade)."""
    yours_ms, ref_ms = medians[-1]["yours"] * 1e3, medians[-1]["reference"] * 1e3
    if os.environ.get("EFFML_TIMING_LOG"):  # for tuning a part: every measurement, appended to a file
        with open(os.environ["EFFML_TIMING_LOG"], "a") as log:
            log.write(json.dumps({"name": name, "sizes": list(sizes), "medians": medians}) + "\n")
    ratio = yours_ms / ref_ms
    try:
        FIGURES.append(_latency_png(medians, sizes, factor, name, title + f"\npasses if ≤ {factor:g}× the reference "
                                    f"at {sizes[-1]} (yours: {ratio:.1f}×)", xlabel))
    except Exception:  # noqa: BLE001 - a figure that cannot be drawn costs nothing
        pass
    assert ratio <= factor, (f"too slow: at {sizes[-1]} your {name} takes {yours_ms:.2f} ms, the reference "
                             f"{ref_ms:.2f} ms, {ratio:.1f}× (allowed {factor:g}×). {advice}")


FIGURES: list[str] = []  # base64 PNGs for the graded cell of the part being run


def _latency_png(medians, sizes, factor, name, title, xlabel) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    ax.plot(sizes, [m["yours"] * 1e3 for m in medians], "o-", label=f"your {name}")
    ax.plot(sizes, [m["reference"] * 1e3 for m in medians], "s-", label="reference")
    ax.plot(sizes, [factor * m["reference"] * 1e3 for m in medians], "--", color="0.4", label=f"{factor:g}× reference (the limit)")
    ax.set(xlabel=xlabel, ylabel="latency per call (ms)", title=title)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return base64.b64encode(png.getvalue()).decode()


# ----------------------------------------------------------------------------- pytest

@contextlib.contextmanager
def input_form(what: str):
    try:
        yield
    except StudentRaised as error:  # its text is "<name> raised <builtin type>": the student's message is never shown
        raise AssertionError(f"{what}: {error}") from None


class Plugin:
    """Gives the hidden tests their fixtures and records each test's outcome and message."""

    def __init__(self, student, timing: Timing):
        self.student, self.timing = student, timing
        self.results: list[tuple[str, str, str]] = []

    def pytest_configure(self, config):
        import pytest

        plugin = self

        class Fixtures:
            @pytest.fixture
            def student(self):
                return plugin.student

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

            @pytest.fixture
            def timing(self):
                return plugin.timing

            @pytest.fixture
            def form(self):
                """``with form("a bf16 weight"): ...``: if the student's code raises inside, the failure
                names the input form it was given (and the exception's type, never its text)."""
                return input_form

        config.pluginmanager.register(Fixtures(), "effml-fixtures")

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome == "failed":
            message = ""
            if report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(report.longrepr).splitlines()[-1]
                message = message.split("\nassert ")[0].strip()
                kind = message.split(":", 1)[0].strip()
                if kind not in ("AssertionError", "trusted.StudentRaised", "trusted.StudentGone", "trusted.StudentMissing",
                                "Failed"):
                    # raised while checking a student's value: its text may quote that value
                    shown = kind if kind in BUILTIN_EXCEPTIONS else "an error"
                    message = f"what your code returned could not be checked ({shown} while checking it)"
            self.results.append((report.nodeid.split("::")[-1], report.outcome, clean(message)))


def clean(message: str) -> str:
    for prefix in ("trusted.StudentRaised: ", "trusted.StudentGone: ", "trusted.StudentMissing: "):
        message = message.removeprefix(prefix)
    message = re.sub(r"[^\S\n]+", " ", "".join(ch for ch in message if ch.isprintable() or ch == "\n"))
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " …"


def hidden_tests_dir() -> Path:
    env = os.environ.get("EFFML_HIDDEN_TESTS")
    path = Path(env).expanduser() if env else GRADING / "hidden"
    if not path.is_dir():
        raise FileNotFoundError(f"no hidden tests at {path}: set EFFML_HIDDEN_TESTS to a folder laid out like "
                                f"grading/hidden (lab01/test_attention.py, ...)")
    return path


def run_part(lab: str, part: str, student, timing: Timing | None = None) -> dict:
    """Run ``<hidden>/<lab>/test_<part>.py`` with ``student``; returns passed, total, failures, figures."""
    import pytest

    suite = hidden_tests_dir() / lab / f"test_{part}.py"
    if not suite.is_file():
        raise FileNotFoundError(f"no hidden tests for {lab} part {part!r} at {suite}")
    plugin = Plugin(student, timing or Timing(None))
    FIGURES.clear()
    args = [str(suite), "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", "--tb=no",
            "--import-mode=importlib", "--assert=plain", "-rN", "--disable-warnings", "-p", "no:randomly",
            "--rootdir", str(suite.parent.parent), "-o", "console_output_style=classic"]
    with open(os.devnull, "w") as devnull:
        stdout = sys.stdout
        sys.stdout = devnull
        try:
            code = pytest.main(args, plugins=[plugin])
        finally:
            sys.stdout = stdout
    passed = sum(outcome == "passed" for _, outcome, _ in plugin.results)
    failures = [[name, msg] for name, outcome, msg in plugin.results if outcome == "failed"]
    ran = bool(plugin.results) and int(code) in (0, 1)
    return {"passed": passed, "total": len(plugin.results), "failures": failures, "figures": list(FIGURES),
            "ok": ran and not failures and passed == len(plugin.results)}


# ----------------------------------------------------------------------------- one student

def grade(job: dict) -> dict:
    """Run the notebook's cells in a sandbox, then each part's hidden tests against it."""
    from parts import PARTS, library_names, preload
    from sandbox import Limits, Sandbox, library_without, package_folders

    lab, cells = job["lab"], job["cells"]
    work = Path(job["work"])
    limits = Limits(**job.get("limits", {}))
    cell_timeout, threads = float(job["cell_timeout"]), int(job.get("threads", 1))
    table = PARTS[lab]
    lib = work / "lib"
    if not (lib / "effml_lib").is_dir():
        library_without(library_names(lab), lib)
    hide = tuple(Path(p) for p in job.get("hide", [])) + tuple(package_folders(table.get("hide_packages", ())))
    sandbox_state = {"box": None, "remote": None}
    broken: dict[int, str] = {}
    outputs: dict[int, list] = {}
    notes: list[str] = []

    def start():
        box = Sandbox(lib, work, limits, threads=threads, hide=hide)
        remote = Remote(box.start(), time.monotonic() + 120, box.arena)
        remote.library = set(library_names(lab))
        remote.library_open = True
        hello = remote.decode(*remote.endpoint.receive(remote.deadline))
        if not hello.get("ready"):
            raise StudentGone("the sandbox did not start")
        box.worker_pid = _worker_pid(box)  # found now, before any student code can start a look-alike
        remote.request(op="setup", threads=threads, ban_sdpa=table["ban_sdpa"], preload=preload(lab))
        _BOXES[remote] = box
        sandbox_state.update(box=box, remote=remote)
        return box, remote

    def stop():
        if sandbox_state["box"] is not None:
            sandbox_state["box"].kill()
            sandbox_state.update(box=None, remote=None)

    def run_notebook():
        """Every cell in order (those that hung or crashed before skipped); True when all ran."""
        box, remote = start()
        for cell in cells:
            index = cell["index"]
            if index in broken:
                continue
            remote.deadline = time.monotonic() + cell_timeout
            try:
                if cell.get("part"):
                    remote.request(op="snapshot", part=cell["part"])
                else:
                    reply = remote.request(op="run", source=cell["source"])
                    outputs[index] = _capped(reply.get("outputs"))
            except StudentGone:
                broken[index] = "timeout" if time.monotonic() >= remote.deadline else "crash"
                stop()
                return False
        return True

    started = time.monotonic()
    stages = {}
    echo_box = None
    if any(p.get("timed") for p in table["parts"]):  # started now, so its start-up overlaps the notebook's
        echo_box = Sandbox(lib, work, limits, threads=threads, echo=True, hide=hide)
        echo_endpoint = echo_box.start()
    for _ in range(job.get("max_restarts", 10) + 1):
        outputs.clear()
        if run_notebook():
            break
    else:
        notes.append("too many cells hung or crashed: the rest of the notebook was not run")
    stages["notebook"] = round(time.monotonic() - started, 2)
    results = {}
    isolated = None
    echo = None
    for part in table["parts"]:
        name = part["part"]
        part_started = time.monotonic()
        if sandbox_state["remote"] is None or sandbox_state["remote"].dead:
            stop()
            if not run_notebook():
                results[name] = {"ok": False, "passed": 0, "total": 0, "failures": [],
                                 "error": "the notebook could not be run up to this part"}
                continue
        box, remote = sandbox_state["box"], sandbox_state["remote"]
        remote.library_open = False  # from here on the student's code is being graded
        isolated = box.isolated
        remote.deadline = time.monotonic() + cell_timeout
        if part.get("timed"):
            if echo is None:
                echo = Remote(echo_endpoint, time.monotonic() + cell_timeout, echo_box.arena)
                echo.decode(*echo.endpoint.receive(echo.deadline))
            echo.deadline = time.monotonic() + cell_timeout
            if box.worker_pid:
                _WATCH[remote] = _Watch(box.worker_pid)
        try:
            result = run_part(lab, name, RemoteStudent(remote, name), Timing(echo, threads))
        except Exception as error:  # noqa: BLE001 - a fault of the grader's: the part scores zero, say why
            result = {"ok": False, "passed": 0, "total": 0, "failures": [], "error": f"grader error: {type(error).__name__}"}
        if remote.dead:
            result["ok"] = False
            result["error"] = ("the hidden tests stopped: your code " + remote.dead)
        results[name] = result
        stages[name] = round(time.monotonic() - part_started, 2)
    if echo_box is not None:
        echo_box.kill()
    output_lost = sandbox_state["box"].output_lost if sandbox_state["box"] else 0
    stop()  # the sandbox is gone before anything is written
    return {"cells": {str(k): v for k, v in outputs.items()}, "broken": {str(k): v for k, v in broken.items()},
            "parts": results, "notes": notes, "isolated": isolated, "output_lost": output_lost,
            "stages": stages, "seconds": time.monotonic() - started}


def _capped(outputs, limit: int = 256 * 2**10) -> list:
    """A cell's outputs as the sandbox sent them, each text cut here already (the driver cuts again)."""
    if not isinstance(outputs, list):
        return []
    kept = []
    for output in outputs[:50]:
        if isinstance(output, dict):
            kept.append({k: (v[:limit] if isinstance(v, str) else v) for k, v in list(output.items())[:8]})
    return kept


def _worker_pid(box) -> int | None:
    """The sandboxed worker's process id as this side sees it: the descendant running worker.py."""
    todo = [box.proc.pid]
    while todo:
        pid = todo.pop()
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"worker.py" in cmdline and b"bwrap" not in cmdline.split(b"\0")[0]:
                return pid
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(f"trusted.py started at {time.strftime('%H:%M:%S')}", flush=True)
    job = json.loads(Path(argv[0]).read_text())
    result = grade(job)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":  # run as the module "trusted", the one the hidden tests import (one FIGURES, one StudentRaised)
    import trusted

    sys.exit(trusted.main())
