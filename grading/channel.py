"""The narrow channel between the trusted grader and a student's sandboxed process: values as JSON
plus raw tensor bytes, never pickle.

Both sides import this file (the sandbox gets a read-only copy). What crosses it:

- ``None``, ``bool``, ``int``, ``float``, ``str``, lists, tuples and dicts with string keys;
- ``torch.Tensor``: dtype, shape and bytes; the receiver builds a new, plain ``torch.Tensor`` (never
  a subclass, never a view of anything the sender controls);
- ``torch.dtype`` and ``torch.device``;
- ``nn.Module`` trees of the library's or ``torch.nn``'s classes, as data: the class's name, its
  parameters, buffers, children and plain attributes. The receiver rebuilds the tree from its *own*
  copy of those classes without running their ``__init__``, so the code that runs is always the
  receiver's;
- dataclasses of the library (``ModelConfig``), rebuilt with their own validation;
- anything else as a *handle*: a number that names an object kept on the sender's side. Calling it
  or reading its attributes goes back over the channel.

A message is a 16-byte header (the JSON's length and the tensor bytes' length), the JSON, then the
bytes. Every JSON object is a tagged node, ``{"$<kind>": ...}``, so no value can pass for another.
The reader checks lengths, dtypes and shapes before it allocates anything, and refuses a message
over its size limit.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import select
import struct
import time

import torch
from torch import nn

HEADER = struct.Struct("<QQ")
MAX_JSON_BYTES = 64 * 2**20

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}
# Where a rebuilt module's or dataclass's class may come from: the course's library and torch.nn.
CLASS_PREFIXES = ("effml_lib.", "torch.nn.modules.")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
# nn.Module's own bookkeeping: rebuilt from the tree's structure, never copied as attributes.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}


class ChannelError(Exception):
    """A message that breaks the format, or a channel that closed or ran past its deadline."""


class Handle:
    """A handle received from the other side: ``id`` names an object kept there."""

    def __init__(self, id: int, kind: str):
        self.id, self.kind = id, kind


# ----------------------------------------------------------------------------- shared memory

class Arena:
    """Memory both processes map (a memfd the grader makes and passes to the sandbox), for the
    tensors of a performance part's timed calls: copying them through it costs a memcpy, steady
    enough to subtract, where a pipe costs hand-overs between processes, which are not. The first
    half holds what the grader sends, the second what the worker answers."""

    def __init__(self, fd: int):
        import mmap

        self.size = os.fstat(fd).st_size
        self.map = mmap.mmap(fd, self.size)
        self.view = memoryview(self.map)
        self.half = self.size // 2
        self.cursor = 0
        self.limit = self.half

    def region(self, results: bool) -> None:
        """Start writing at the beginning of the grader's half, or of the worker's."""
        self.cursor, self.limit = (self.half, self.size) if results else (0, self.half)

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        offset = (self.cursor + 63) // 64 * 64
        if offset + len(data) > self.limit:
            raise TypeError(f"the shared memory for timed calls is full ({self.size // 2**20} MiB)")
        self.view[offset:offset + len(data)] = data
        self.cursor = offset + len(data)
        return offset

    def read(self, offset, nbytes: int, results: bool) -> memoryview:
        low, high = (self.half, self.size) if results else (0, self.half)
        if type(offset) is not int or not low <= offset <= high - nbytes:
            raise ChannelError("a tensor outside its half of the shared memory")
        return self.view[offset:offset + nbytes]


# ----------------------------------------------------------------------------- encoding

class Encoder:
    """Turns a value into a JSON tree and a list of byte buffers. ``register(obj) -> (id, kind)``
    keeps an object this side cannot send by value and names it; ``local_id(obj)`` says whether
    ``obj`` is a proxy for an object of the *other* side (sent back as ``$yours``)."""

    def __init__(self, register, local_id=lambda obj: None, arena: Arena | None = None):
        self.register, self.local_id, self.arena = register, local_id, arena
        self.buffers: list = []  # bytes, or memoryviews of tensors' own storage
        self.size = 0
        self.memo: dict[int, int] = {}  # id(tensor) -> index of its first node: aliasing survives

    def tensor(self, t: torch.Tensor) -> dict:
        key = id(t)
        if key in self.memo:
            return {"$same": self.memo[key]}
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES or t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise TypeError(f"a tensor of dtype {t.dtype} and layout {t.layout} cannot be sent")
        flat = torch.Tensor.detach(t).cpu().contiguous().reshape(-1)
        # A view of the tensor's own bytes (no copy): it is written to the pipe before anything can change it.
        data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""
        self.memo[key] = len(self.memo)
        if self.arena is not None and len(data) >= 4096:
            return {"$shm": [dtype, list(t.shape), self.arena.write(data), len(data)], "$i": self.memo[key]}
        node = {"$tensor": [dtype, list(t.shape), self.size, len(data)], "$i": self.memo[key]}
        self.buffers.append(data)
        self.size += len(data)
        return node

    def __call__(self, value, depth: int = 0):
        if depth > 64:
            raise TypeError("a value nested more than 64 levels deep cannot be sent")
        if value is None or type(value) in (bool, int, str):
            return value
        if type(value) is float:
            return value if value == value and value not in (float("inf"), float("-inf")) else {"$float": repr(value)}
        other = self.local_id(value)
        if other is not None:
            return {"$yours": other}
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if type(value) is list:
            return [self(v, depth + 1) for v in value]
        if type(value) is tuple or type(value) is torch.Size:
            return {"$tuple": [self(v, depth + 1) for v in value]}
        if type(value) is dict and all(type(k) is str for k in value):
            return {"$dict": [[k, self(v, depth + 1)] for k, v in value.items()]}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, nn.Module) and _class_name(type(value)).startswith(CLASS_PREFIXES):
            return {"$module": self.module(value, depth)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and _class_name(type(value)).startswith("effml_lib."):
            return {"$dataclass": [_class_name(type(value)),
                                   [[f.name, self(getattr(value, f.name), depth + 1)] for f in dataclasses.fields(value)]]}
        if type(value) in (int, float, str, bool):  # exotic subclasses of plain types: not by value
            pass
        handle, kind = self.register(value)
        return {"$handle": [handle, kind]}

    def module(self, m: nn.Module, depth: int) -> dict:
        attrs = []
        for name, value in vars(m).items():
            if name in _MODULE_INTERNALS or name.startswith("__") or callable(value) and not isinstance(value, nn.Module):
                continue
            try:
                attrs.append([name, self.plain(value, depth + 1)])
            except TypeError:
                continue  # hooks, caches and other objects that are not data: left behind
        return {
            "class": _class_name(type(m)),
            "training": bool(m.training),
            "params": [[n, None if p is None else self.tensor(p), bool(p is not None and p.requires_grad)]
                       for n, p in m._parameters.items()],
            "buffers": [[n, None if b is None else self.tensor(b), n not in m._non_persistent_buffers_set]
                        for n, b in m._buffers.items()],
            "children": [[n, None if c is None else self.module(c, depth + 1)] for n, c in m._modules.items()],
            "attrs": attrs,
        }

    def plain(self, value, depth):
        """A module attribute: only data (no handles: a module's attribute never becomes one)."""
        node = self(value, depth)
        if "$handle" in json.dumps(node):
            raise TypeError("not data")
        return node


def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------- decoding

class Decoder:
    """Builds values from a JSON tree and the message's bytes. ``proxy(handle)`` makes the object
    that stands for one of the other side's handles; ``local(id)`` finds one of this side's own."""

    def __init__(self, buffers: memoryview, proxy, local, arena: Arena | None = None, arena_results: bool = False):
        self.buffers, self.proxy, self.local = buffers, proxy, local
        self.arena, self.arena_results = arena, arena_results  # which half of the arena this side reads
        self.tensors: dict[int, torch.Tensor] = {}

    def tensor(self, node) -> torch.Tensor:
        spec = node.get("$tensor") or node.get("$shm")
        if not (isinstance(spec, list) and len(spec) == 4):
            raise ChannelError("a malformed tensor")
        dtype, shape, offset, nbytes = spec
        if dtype not in DTYPES or not isinstance(shape, list) or len(shape) > 16 \
                or not all(type(s) is int and 0 <= s < 2**40 for s in shape):
            raise ChannelError("a tensor with an unknown dtype or a bad shape")
        dtype = DTYPES[dtype]
        count = 1
        for s in shape:
            count *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        shared = "$shm" in node
        if shared and self.arena is None:
            raise ChannelError("a tensor in shared memory where there is none")
        if type(offset) is not int or type(nbytes) is not int or nbytes != count * itemsize or offset < 0 \
                or not shared and offset + nbytes > len(self.buffers):
            raise ChannelError("a tensor whose bytes do not match its shape")
        if shared:  # read from the other side's half; the grader copies (the memory is reused), the worker need not
            view = self.arena.read(offset, nbytes, self.arena_results)
            raw = torch.frombuffer(view, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
            raw = raw.clone() if self.arena_results else raw
            t = raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
        elif nbytes == 0:
            t = torch.empty(shape, dtype=dtype)
        else:  # a view of this message's own buffer, which nothing else holds: no copy needed
            raw = torch.frombuffer(self.buffers[offset:offset + nbytes], dtype=torch.uint8)
            t = raw.view(dtype).reshape(shape) if offset % itemsize == 0 else raw.clone().view(dtype).reshape(shape)
        index = node.get("$i")
        if type(index) is int:
            self.tensors[index] = t
        return t

    def __call__(self, node, depth: int = 0):
        if depth > 64:
            raise ChannelError("a value nested too deep")
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            return [self(v, depth + 1) for v in node]
        if type(node) is not dict or not node or not next(iter(node)).startswith("$"):
            raise ChannelError("an untagged object")
        kind = next(iter(node))
        body = node[kind]
        if kind in ("$tensor", "$shm"):
            return self.tensor(node)
        if kind == "$same":
            if body not in self.tensors:
                raise ChannelError("a reference to a tensor not yet sent")
            return self.tensors[body]
        if kind == "$float":
            if body not in ("nan", "inf", "-inf"):
                raise ChannelError("a bad float")
            return float(body)
        if kind == "$tuple":
            return tuple(self(v, depth + 1) for v in _list(body))
        if kind == "$dict":
            out = {}
            for pair in _list(body):
                if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is str):
                    raise ChannelError("a bad dict entry")
                out[pair[0]] = self(pair[1], depth + 1)
            return out
        if kind == "$dtype":
            if body not in DTYPES:
                raise ChannelError("an unknown dtype")
            return DTYPES[body]
        if kind == "$device":
            if body != "cpu" and not (type(body) is str and re.fullmatch(r"cuda(:\d+)?", body)):
                raise ChannelError("an unknown device")
            return torch.device(body)
        if kind == "$module":
            return self.module(body, depth)
        if kind == "$dataclass":
            name, fields = _list(body)
            cls = _import_class(name)
            if not dataclasses.is_dataclass(cls):
                raise ChannelError(f"{name} is not a dataclass")
            values = {}
            for pair in _list(fields):
                if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is str and NAME.match(pair[0])):
                    raise ChannelError("a bad dataclass field")
                values[pair[0]] = self(pair[1], depth + 1)
            try:
                return cls(**values)
            except Exception as error:  # the dataclass's own validation
                raise ChannelError(f"{name.rsplit('.', 1)[-1]} refused its fields ({type(error).__name__})") from None
        if kind == "$handle":
            handle, hkind = _list(body)
            if type(handle) is not int or type(hkind) is not str:
                raise ChannelError("a bad handle")
            return self.proxy(Handle(handle, hkind))
        if kind == "$yours":
            if type(body) is not int:
                raise ChannelError("a bad handle")
            return self.local(body)
        raise ChannelError(f"an unknown kind of value {kind[:20]!r}")

    def module(self, body, depth) -> nn.Module:
        if type(body) is not dict:
            raise ChannelError("a malformed module")
        cls = _import_class(body.get("class"))
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ChannelError("a module of a class that is not an nn.Module")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.training = bool(body.get("training", False))
        for name, node, flag in _triples(body.get("params")):
            m.register_parameter(name, None if node is None else nn.Parameter(self(node, depth + 1), requires_grad=bool(flag)))
        for name, node, flag in _triples(body.get("buffers")):
            m.register_buffer(name, None if node is None else self(node, depth + 1), persistent=bool(flag))
        for pair in _list(body.get("children")):
            if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is str and NAME.match(pair[0]) or
                    type(pair) is list and len(pair) == 2 and type(pair[0]) is str and pair[0].isdigit()):
                raise ChannelError("a bad child module")
            m.add_module(pair[0], None if pair[1] is None else self.module(pair[1], depth + 1))
        for pair in _list(body.get("attrs")):
            if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is str and NAME.match(pair[0])) \
                    or pair[0] in _MODULE_INTERNALS or pair[0].startswith("__") or hasattr(type(m), pair[0]) \
                    or pair[0] in m._parameters or pair[0] in m._buffers or pair[0] in m._modules:
                raise ChannelError("a bad module attribute")
            if _refers(pair[1]):
                raise ChannelError("a module attribute that is not data")
            value = self(pair[1], depth + 1)
            if isinstance(value, nn.Module):
                raise ChannelError("a module attribute that is not data")
            object.__setattr__(m, pair[0], value)
        return m


def _refers(node) -> bool:
    """Whether a JSON tree holds a handle or a reference to the receiver's objects anywhere."""
    if type(node) is list:
        return any(_refers(v) for v in node)
    if type(node) is dict:
        return any(k in ("$handle", "$yours", "$module") or _refers(v) for k, v in node.items())
    return False


def _list(value) -> list:
    if type(value) is not list:
        raise ChannelError("expected a list")
    return value


def _triples(value):
    for item in _list(value):
        if not (type(item) is list and len(item) == 3 and type(item[0]) is str and NAME.match(item[0])):
            raise ChannelError("a bad parameter or buffer entry")
        yield item


def _import_class(name):
    if type(name) is not str or not name.startswith(CLASS_PREFIXES) or not re.fullmatch(r"[A-Za-z0-9_.]+", name):
        raise ChannelError("a class from outside the library and torch.nn")
    module_name, _, qualname = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError):
        raise ChannelError(f"no class {name}") from None
    if not isinstance(cls, type):
        raise ChannelError(f"{name} is not a class")
    return cls


# ----------------------------------------------------------------------------- messages

def pack(message: dict, encoder: Encoder) -> list[bytes]:
    """A message's bytes: header, JSON, tensor bytes (the JSON is encoded by ``encoder``)."""
    tree = {key: encoder(value) for key, value in message.items()}
    text = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode()
    return [HEADER.pack(len(text), encoder.size), text, *encoder.buffers]


def unpack_header(header: bytes, max_bytes: int) -> tuple[int, int]:
    json_len, data_len = HEADER.unpack(header)
    if json_len > MAX_JSON_BYTES or data_len > max_bytes:
        raise ChannelError(f"a message of {(json_len + data_len) / 2**20:.0f} MiB, over the "
                           f"{max_bytes / 2**20:.0f} MiB allowed")
    return json_len, data_len


def parse(text: bytes, data: memoryview, decoder_factory) -> dict:
    try:
        tree = json.loads(text)
    except (ValueError, RecursionError):
        raise ChannelError("a message that is not JSON") from None
    if type(tree) is not dict:
        raise ChannelError("a message that is not an object")
    decoder = decoder_factory(data)
    return {key: decoder(value) if not key.startswith("_raw") else value for key, value in tree.items()}


class Endpoint:
    """One side of the channel: a file descriptor to read and one to write. ``deadline`` (a
    ``time.monotonic()`` value) bounds how long a read or write may wait; None waits forever (the
    sandbox's side, which is killed from outside if it hangs)."""

    def __init__(self, read_fd: int, write_fd: int, max_bytes: int = 2**30):
        self.read_fd, self.write_fd, self.max_bytes = read_fd, write_fd, max_bytes
        for fd in (read_fd, write_fd):  # a larger pipe: fewer hand-overs between the two processes per message
            try:
                import fcntl

                fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
            except OSError:
                pass

    def send(self, chunks: list, deadline: float | None = None) -> None:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while view:
                self._wait(self.write_fd, select.POLLOUT, deadline)
                try:
                    written = os.write(self.write_fd, view[:1 << 20])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, OSError) as error:
                    raise ChannelError(f"the other side closed the channel ({type(error).__name__})") from None
                view = view[written:]

    def receive(self, deadline: float | None = None) -> tuple[bytes, memoryview]:
        json_len, data_len = unpack_header(self._read(HEADER.size, deadline), self.max_bytes)
        text = bytes(self._read(json_len, deadline))
        data = memoryview(self._read(data_len, deadline)) if data_len else memoryview(bytearray())
        return text, data

    def _read(self, n: int, deadline) -> bytearray:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            self._wait(self.read_fd, select.POLLIN, deadline)
            try:
                chunk = os.readv(self.read_fd, [view[got:got + (1 << 20)]])
            except BlockingIOError:
                continue
            if chunk == 0:
                raise ChannelError("the other side closed the channel")
            got += chunk
        return out

    @staticmethod
    def _wait(fd: int, event: int, deadline) -> None:
        if deadline is None:
            return
        poller = select.poll()
        poller.register(fd, event | select.POLLHUP | select.POLLERR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError("timed out")
            if poller.poll(min(left, 1.0) * 1000):
                return
