"""The grader's isolation, piece by piece: the channel's format, the library copy without the graded
code, the SDPA ban, and the bubblewrap sandbox's walls. (tests/test_autograde.py grades whole hostile
submissions end to end; these say which wall holds.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "grading"))

from channel import ChannelError, Decoder, Encoder, pack, parse  # noqa: E402
from trusted import Remote, RemoteStudent, StudentGone, StudentRaised, roundtrip  # noqa: E402


# --- the channel ------------------------------------------------------------------------------------

def decode(message_json: dict, data: bytes = b""):
    return parse(json.dumps(message_json).encode(), memoryview(bytearray(data)),
                 lambda d: Decoder(d, lambda h: ("handle", h.id), lambda i: ("mine", i)))


def test_a_tensor_subclass_arrives_as_a_plain_tensor_with_its_data():
    class Sly(torch.Tensor):
        def __eq__(self, other):
            return True

    sent = torch.arange(6.0).reshape(2, 3).as_subclass(Sly)
    got = roundtrip(sent)
    assert type(got) is torch.Tensor and torch.equal(got, torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8, torch.bool, torch.complex64])
def test_dtypes_and_values_survive(dtype):
    x = (torch.randn(3, 5) * 4).to(dtype)
    got = roundtrip({"x": x, "t": (x[:0], 3, 2.5, float("inf"), None, "s"), "d": dtype})
    assert got["x"].dtype == dtype and torch.equal(got["x"], x)
    assert got["t"][0].shape == (0, 5) and got["t"][1:] == (3, 2.5, float("inf"), None, "s") and got["d"] is dtype


@pytest.mark.parametrize("message,data,why", [
    ({"v": {"$tensor": ["float32", [4], 0, 12]}}, b"\0" * 16, "bytes that do not match the shape"),
    ({"v": {"$tensor": ["object", [1], 0, 8]}}, b"\0" * 8, "an unknown dtype"),
    ({"v": {"$tensor": ["float32", [2], 8, 8]}}, b"\0" * 8, "bytes past the end"),
    ({"v": {"plain": 1}}, b"", "an untagged object"),
    ({"v": {"$module": {"class": "os.system"}}}, b"", "a class outside the library"),
    ({"v": {"$dataclass": ["builtins.dict", []]}}, b"", "a class outside the library"),
    ({"v": {"$shm": ["float32", [1], 0, 4]}}, b"", "shared memory where there is none"),
], ids=["nbytes", "dtype", "bounds", "untagged", "module_class", "dataclass_class", "shm"])
def test_malformed_messages_are_refused(message, data, why):
    with pytest.raises(ChannelError):
        decode(message, data)


def test_a_module_is_rebuilt_from_data_without_running_its_constructor(monkeypatch):
    from effml_lib.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=16)).eval()

    def refuse(self, *args, **kwargs):
        raise AssertionError("the receiver ran the class's __init__")

    monkeypatch.setattr(Transformer, "__init__", refuse)
    copy = roundtrip(model)
    tokens = torch.randint(0, 32, (1, 6))
    assert type(copy) is Transformer and torch.equal(copy(tokens), model(tokens))


def test_objects_that_are_not_data_become_handles_not_pickles():
    handles = []
    encoder = Encoder(lambda obj: (handles.append(obj) or len(handles), "function"))
    chunks = pack({"v": [len, {"f": print}]}, encoder)
    tree = json.loads(bytes(chunks[1]))
    assert tree == {"v": [{"$handle": [1, "function"]}, {"$dict": [["f", {"$handle": [2, "function"]}]]}]}
    assert handles == [len, print]


# --- the library the sandbox sees ------------------------------------------------------------------

@pytest.fixture(scope="module")
def stubbed(tmp_path_factory):
    from sandbox import library_without

    folder = library_without(["attention.attention", "model.RMSNorm.forward", "kvcache.StaticKVCache", "kernels.rope"],
                             tmp_path_factory.mktemp("lib"))
    return folder / "effml_lib"


def test_the_hidden_code_is_not_in_the_copy(stubbed):
    attention = (stubbed / "attention.py").read_text()
    body = attention.split("def attention(", 1)[1].split("\ndef ", 1)[0]
    assert "softmax" not in body and "_effml_hidden('attention.attention', locals())" in body
    assert "def attention_reference(" in attention, "the rest of the module stays"
    assert "raise ImportError" in (stubbed / "kernels" / "rope.py").read_text()
    assert "rsqrt" not in (stubbed / "model.py").read_text().split("class RMSNorm", 1)[1].split("class ", 1)[0]


def test_a_hidden_function_forwards_only_when_the_grader_lets_it(stubbed):
    probe = f"""
import sys, json, torch
sys.path.insert(0, {str(stubbed.parent)!r})
import effml_lib, effml_lib.attention as a, effml_lib.kvcache as kv, effml_lib._hidden as hidden
assert effml_lib.__file__.startswith({str(stubbed)!r})
out = {{}}
q = torch.randn(1, 1, 2, 4)
try:
    a.attention(q, q, q)
except NotImplementedError as e:
    out["no_hook"] = str(e)
hidden.hook = lambda name, params: (name, sorted(params))
out["forwarded"] = a.attention(q, q, q)
try:
    kv.StaticKVCache(1, 1, 4, 1, 4)
except NotImplementedError as e:
    out["class"] = str(e)
try:
    import effml_lib.kernels.rope
except ImportError as e:
    out["module"] = str(e)
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert "not available while this lab is graded" in out["no_hook"]
    assert out["forwarded"] == ["attention.attention", ["causal", "impl", "k", "mask", "q", "v"]]
    assert "kvcache.StaticKVCache" in out["class"] and "kernels.rope" in out["module"]


# --- the sandbox itself -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(bubblewrap_available, stubbed, tmp_path_factory):
    """A sandboxed worker with lab 01's library, the SDPA ban, a secret in this process's environment, and
    an installed package hidden as lab 05 hides gguf."""
    from sandbox import Limits, Sandbox, package_folders

    os.environ["EFFML_TEST_SECRET"] = "s3cret-in-the-grader"
    work = tmp_path_factory.mktemp("sandbox")
    box = Sandbox(stubbed.parent, work, Limits(processes=32, file_bytes=8 * 2**20, scratch_bytes=64 * 2**20),
                  hide=(ROOT / "grading", *package_folders(["gguf"])), require_sandbox=True)
    remote = Remote(box.start(), time.monotonic() + 120, box.arena)
    assert remote.decode(*remote.endpoint.receive(remote.deadline)) == {"ready": True}
    remote.deadline = time.monotonic() + 300
    remote.library = {"attention.attention"}
    remote.request(op="setup", threads=1, ban_sdpa=True, preload=["effml_lib", "effml_lib.model"])
    yield box, remote
    box.kill()
    os.environ.pop("EFFML_TEST_SECRET")


def run(remote, source: str) -> str:
    reply = remote.request(op="run", source=source)
    return "".join(o.get("text", "") + o.get("evalue", "") for o in reply["outputs"])


def test_it_sees_no_grader_files_environment_or_network(worker):
    _, remote = worker
    out = run(remote, f"""
import os, socket
print("grading:", os.path.exists({str(ROOT / 'grading')!r}), "repo:", os.listdir({str(ROOT)!r}) if os.path.exists({str(ROOT)!r}) else None)
print("secret:", "EFFML_TEST_SECRET" in os.environ, "uid:", os.getuid())
try:
    socket.create_connection(("1.1.1.1", 80), timeout=2)
except OSError as e:
    print("network:", type(e).__name__)
""")
    assert "grading: False" in out and "secret: False" in out and "uid: 65534" in out
    assert "network: OSError" in out or "network: " in out and "reached" not in out
    repo = out.split("repo: ", 1)[1].split("\n", 1)[0]
    assert repo in ("None", "['.venv']"), f"the sandbox sees the repository: {repo}"


def test_it_writes_only_to_its_own_small_scratch_folder(worker):
    _, remote = worker
    out = run(remote, f"""
import os
for path in ["/effml-probe", {str(ROOT / 'effml-probe')!r}, "/dev/effml-probe", "/tmp/effml-probe"]:
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as e:
        print("refused", path)
try:
    open("/tmp/big", "wb").write(b"0" * (16 * 2**20))
except OSError as e:
    print("file too big:", type(e).__name__)
""")
    assert "wrote /tmp/effml-probe" in out and "refused /effml-probe" in out and "refused /dev/effml-probe" in out, out
    # The repository refuses the write, unless it lies under /tmp: then the path is in the sandbox's own
    # scratch /tmp (around the read-only venv), and the real folder is untouched.
    repo_refused = f"refused {ROOT / 'effml-probe'}" in out
    assert repo_refused or str(ROOT).startswith("/tmp/"), out
    assert not (ROOT / "effml-probe").exists(), "the sandbox wrote into the repository"
    assert "file too big" in out
    assert not Path("/tmp/effml-probe").exists(), "the sandbox's /tmp is not this machine's"


def test_the_graded_code_is_forwarded_while_the_notebook_runs_and_refused_while_graded(worker):
    _, remote = worker
    run(remote, "import torch\nfrom effml_lib.attention import attention\ndef mine(q, k, v):\n    return attention(q, k, v)")
    q = torch.randn(1, 2, 3, 8)
    remote.library_open = True
    assert run(remote, "print(attention(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4)).shape)").strip() \
        == "torch.Size([1, 1, 2, 4])"
    remote.library_open = False
    with pytest.raises(StudentRaised, match="NotImplementedError"):
        RemoteStudent(remote, "any").mine(q, q, q)


def test_pytorch_fused_attention_is_banned_in_every_form(worker):
    _, remote = worker
    out = run(remote, """
import gc, torch, torch.nn.functional as F
q = torch.randn(1, 1, 3, 4)
for name, call in [("F", lambda: F.scaled_dot_product_attention(q, q, q)),
                   ("aten", lambda: torch.ops.aten.scaled_dot_product_attention(q, q, q)),
                   ("math", lambda: torch.ops.aten._scaled_dot_product_attention_math(q, q, q)),
                   ("cpu", lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q))]:
    try:
        call()
        print(name, "ran")
    except RuntimeError as e:
        print(name, "banned")
for o in gc.get_objects():
    if isinstance(o, torch.library.Library):
        o._destroy()
try:
    F.scaled_dot_product_attention(q, q, q)
    print("after destroying every Library: ran")
except RuntimeError:
    print("after destroying every Library: banned")
""")
    assert "ran" not in out and out.count("banned") == 5, out


def test_everything_it_started_dies_with_it(bubblewrap_available, stubbed, tmp_path):
    from sandbox import Limits, Sandbox

    box = Sandbox(stubbed.parent, tmp_path, Limits(processes=16), require_sandbox=True)
    remote = Remote(box.start(), time.monotonic() + 120, box.arena)
    remote.decode(*remote.endpoint.receive(remote.deadline))
    remote.deadline = time.monotonic() + 120
    out = run(remote, """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "effml-sandbox-orphan"], start_new_session=True)
n = 0
try:
    for _ in range(200):
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        n += 1
except OSError:
    print("forks stopped at", n)
""")
    if os.geteuid() == 0:  # as root the sandbox gets a PID cgroup; otherwise the limit counts all of this user's processes
        assert "forks stopped at" in out and int(out.split("forks stopped at ")[1].split()[0]) < 16, out
    box.kill()
    time.sleep(0.5)
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "effml-sandbox-orphan" not in left, "a process the sandbox started outlived it"


def test_package_folders_finds_a_package_or_a_subpackage_and_skips_what_is_missing():
    from sandbox import package_folders

    pytest.importorskip("gguf")
    [gguf] = package_folders(["gguf"])
    assert (gguf / "quants.py").is_file(), gguf
    assert package_folders(["no_such_package_effml", "gguf.no_such_subpackage"]) == []
    if importlib.util.find_spec("transformers") is not None:  # located, not imported
        [sub] = package_folders(["transformers.integrations.gguf"])
        assert sub.name == "gguf" and sub.parent.name == "integrations", sub


def test_a_package_a_lab_hides_is_an_empty_folder_in_the_sandbox(worker):
    """grading/parts.py's hide_packages (lab 05: gguf, whose own Q4_1 decoder answers a part) are covered
    by empty folders: nothing of theirs can be imported or read; the rest of the environment is there."""
    from sandbox import package_folders

    folders = package_folders(["gguf"])
    if not folders:
        pytest.skip("gguf is not installed")
    _, remote = worker
    out = run(remote, f"""
import os
try:
    from gguf import quants
    print("gguf: imported")
except ImportError:
    print("gguf: not importable")
print("files:", os.listdir({str(folders[0])!r}))
import numpy
print("numpy:", numpy.__name__)
""")
    assert "gguf: not importable" in out and "files: []" in out and "numpy: numpy" in out, out


def test_a_hung_worker_costs_only_its_deadline(worker):
    _, remote = worker
    remote.deadline = time.monotonic() + 2
    started = time.monotonic()
    with pytest.raises(StudentGone, match="ran past the time"):
        remote.request(op="run", source="while True:\n    pass")
    assert time.monotonic() - started < 5
