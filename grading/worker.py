"""The student's side of grading: runs inside the sandbox, never trusted.

    python -I -S worker.py READ_FD WRITE_FD SYS_PATH_JSON [--echo]

It runs the student's notebook cell by cell as the trusted grader asks (``run``), keeps the names
each graded cell would see (a snapshot of the namespace at that cell), and then answers the
grader's calls on those names (``lookup``, ``call``, ``getattr``, ``stage``, ``batch``). Every
answer is only data (grading/channel.py); the grader checks it. Nothing here decides anything: a
student's code may replace any of it, and the worst that does is give the grader wrong answers,
which fail.

With ``--echo`` it runs no student code and only answers ``echo``: the grader times it to learn
what the channel itself costs, so a performance part can subtract that from a student's timing.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

READ_FD, WRITE_FD, ARENA_FD = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
sys.path[:0] = json.loads(sys.argv[3])
ECHO = "--echo" in sys.argv[5:]

import torch  # noqa: E402

from channel import Arena, ChannelError, Decoder, Encoder, Endpoint, pack, parse  # noqa: E402

MAX_TEXT = 64 * 2**10  # per stream per cell: the grader cuts again, this only saves the copying


class Objects:
    """What the grader holds handles to: the student's functions, classes, objects and staged inputs."""

    def __init__(self):
        self.by_id: dict[int, object] = {}
        self.ids: dict[int, int] = {}  # id(obj) -> handle

    def register(self, obj) -> tuple[int, str]:
        key = id(obj)
        if key not in self.ids:
            self.ids[key] = len(self.by_id) + 1
            self.by_id[self.ids[key]] = obj
        kind = "class" if isinstance(obj, type) else "function" if callable(obj) else "object"
        return self.ids[key], kind

    def get(self, handle: int):
        if handle not in self.by_id:
            raise ChannelError(f"no object {handle}")
        return self.by_id[handle]


class Trusted:
    """An object of the grader's (a test's reference cache, say), used through callbacks."""

    def __init__(self, worker: "Worker", handle: int):
        object.__setattr__(self, "_worker", worker)
        object.__setattr__(self, "_handle", handle)

    def __getattr__(self, name):
        return self._worker.callback("getattr", self._handle, name=name)

    def __call__(self, *args, **kwargs):
        return self._worker.callback("call", self._handle, args=list(args), kwargs=kwargs)


class TrustedMethod:
    def __init__(self, worker, handle):
        self.worker, self.handle = worker, handle

    def __call__(self, *args, **kwargs):
        return self.worker.callback("call", self.handle, args=list(args), kwargs=kwargs)


class Worker:
    def __init__(self):
        self.channel = Endpoint(READ_FD, WRITE_FD, max_bytes=2**33)
        self.arena = Arena(ARENA_FD) if ARENA_FD >= 0 else None
        self.objects = Objects()
        self.namespace: dict = {"__name__": "__main__"}
        self.snapshots: dict[str, dict] = {}
        self.shell = None
        self.echoes: dict = {}

    # -- the wire
    def send(self, shared=False, **message) -> None:
        """``shared``: the tensors go through the arena's second half (the answer to timed calls)."""
        if shared:
            self.arena.region(results=True)
        self.channel.send(pack(message, Encoder(self.objects.register, arena=self.arena if shared else None)))

    def receive(self) -> dict:
        text, data = self.channel.receive()
        local = (lambda handle: None) if ECHO else self.objects.get  # an echo has none of the objects
        return parse(text, data, lambda d: Decoder(d, self.proxy, local, arena=self.arena))

    def proxy(self, handle):
        return TrustedMethod(self, handle.id) if handle.kind == "function" else Trusted(self, handle.id)

    def callback(self, what, handle, **fields):
        """Ask the grader; while waiting, answer what it asks in turn (a library function run there
        may call an object of the student's)."""
        self.send(callback=what, target=handle, **fields)
        while True:
            message = self.receive()
            if "op" not in message:
                break
            self.reply_to(message)
        if "raised" in message:
            if what == "library":
                raise NotImplementedError(str(message["raised"]))
            raise RuntimeError(f"the grader's object refused: {message['raised']}")
        return message.get("value")

    def library_call(self, name, params):
        return self.callback("library", 0, name=name, params=dict(params))

    # -- running the notebook
    def start_shell(self) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        self.shell = InteractiveShell.instance(colors="NoColor", user_ns=self.namespace)
        self.errors: list = []
        self.results: list = []
        self.shell._showtraceback = lambda etype, evalue, stb: self.errors.append(
            {"ename": _safe(lambda: etype.__name__, "Exception"), "evalue": _safe(lambda: str(evalue)[:2000], ""),
             "traceback": [line[:2000] for line in (stb or [])[-20:]]})
        hook = self.shell.displayhook
        hook.write_output_prompt = lambda: None
        hook.write_format_data = lambda data, md=None: self.results.append(dict(data))
        try:
            self.shell.enable_matplotlib("inline")
        except Exception:  # the inline backend is set even when no GUI event loop can be
            pass

    def run_cell(self, source: str) -> dict:
        from IPython.utils.capture import capture_output

        if self.shell is None:
            self.start_shell()
        self.errors.clear()
        self.results.clear()
        with capture_output(display=True) as captured:
            self.shell.run_cell(source, store_history=True)
        outputs = []
        for name, text in (("stdout", captured.stdout), ("stderr", captured.stderr)):
            if text:
                outputs.append({"output_type": "stream", "name": name, "text": text[:MAX_TEXT]})
        for data in [*(o.data for o in captured.outputs), *self.results]:
            outputs.append({"output_type": "display_data", "data": {k: v for k, v in data.items() if type(v) is str}})
        for error in self.errors:
            outputs.append({"output_type": "error", **error})
        return {"outputs": outputs, "ok": not self.errors}

    def warm(self, shape, dtype):
        """A tensor of the shape asked, made once and touched, so copying it costs what copying a
        result just computed costs (a fresh allocation would add page faults no result pays)."""
        key = (shape, dtype)
        if key not in self.echoes:
            self.echoes[key] = [torch.zeros(shape, dtype=dtype)]
        return self.echoes[key][0]

    # -- answering the grader
    def serve(self) -> None:
        while True:
            self.reply_to(self.receive())

    def reply_to(self, request: dict) -> None:
        try:
            reply = self.answer(request)
        except ChannelError:
            raise
        except BaseException as error:  # noqa: BLE001 - the student's code raised: say what, go on
            reply = {"raised": _describe(error)}
        try:
            self.send(shared=request.get("op") in ("batch", "echo") and self.arena is not None, **reply)
        except (TypeError, ValueError, RecursionError) as error:  # an answer that cannot be sent is an error too
            self.send(raised={"type": "TypeError", "message": f"the result cannot be sent: {error}"[:2000],
                              "builtin": True, "unsendable": True})

    def answer(self, request: dict) -> dict:
        op = request.get("op")
        if op == "echo":  # the channel's own cost: the calls came in; send results the size asked for
            for args, kwargs in request["calls"]:  # read every input once, as any function of them must:
                for value in [*args, *kwargs.values()]:  # data the grader just wrote is not in this core's cache
                    if isinstance(value, torch.Tensor):
                        value.sum()
            return {"results": [self.warm(tuple(like[1]), like[2]) if like[0] == "tensor" else like[1]
                                for like in request["result_like"]]}
        if ECHO:
            raise ChannelError("an echo worker runs no student code")
        if op == "setup":  # before any student code: what the grader decides about this process
            torch.set_num_threads(int(request["threads"]))
            for module in request.get("preload", []):  # imported before any ban, as a notebook would
                __import__(module)
            try:
                import effml_lib._hidden as hidden

                hidden.hook = self.library_call
            except ImportError:
                pass
            if request.get("ban_sdpa"):
                import bans

                bans.ban_sdpa()
            return {"ok": True}
        if op == "run":
            return self.run_cell(request["source"])
        if op == "snapshot":
            self.snapshots[request["part"]] = dict(self.namespace)
            return {"ok": True}
        if op == "lookup":
            names = self.snapshots.get(request["part"], self.namespace)
            if request["name"] not in names:
                return {"missing": True}
            return {"value": names[request["name"]]}
        if op == "call":
            target = request["target"]
            args, kwargs = request.get("args", []), request.get("kwargs", {})
            result = target(*args, **kwargs)
            after = [args[i] for i in request.get("restore", []) if i < len(args)]
            return {"value": result, "after": after}
        if op == "getattr":
            return {"value": getattr(request["target"], request["name"])}
        if op == "stage":  # an input kept here for later calls (a model, a timed part's fixed inputs)
            return {"staged": self.objects.register(request["value"])[0]}
        if op == "batch":  # the timed calls of a performance part: each result goes back, to be checked
            target = request["target"]
            return {"results": [target(*args, **kwargs) for args, kwargs in request["calls"]]}
        raise ChannelError(f"unknown request {str(op)[:20]!r}")


def _safe(fn, default):
    try:
        return fn()
    except BaseException:  # noqa: BLE001
        return default


def _describe(error: BaseException) -> dict:
    """What the grader may use of an exception: its class's name and message, for checks such as
    "a ValueError that names positions". The grader never shows either to anyone."""
    return {"type": _safe(lambda: type(error).__name__, "Exception")[:100],
            "builtin": type(error).__module__ == "builtins",
            "message": _safe(lambda: str(error), "")[:2000],
            "trace": _safe(lambda: "".join(traceback.format_exception(error))[-4000:], "")}


def main() -> None:
    worker = Worker()
    worker.send(ready=True)
    try:
        worker.serve()
    except ChannelError:
        os._exit(0)  # the grader is done with us (or gone): nothing to save


if __name__ == "__main__":
    main()
