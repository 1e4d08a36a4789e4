"""Lab 05's hidden suites (grading/hidden/lab05) pass the solution and fail realistic mistakes; every mistake
that gets an input form wrong (a code range, odd groups, a leading shape, all-equal groups, 16-bit weights,
the packing order, signs and tiny scales of a block, a bfloat16 input, a layer loaded from a checkpoint, a
tied model...) fails the part's visible tests too. No function of the release, no library function it uses
and no installed package a submission could call answers a part without being hidden while graded."""

import ast
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_part_fails, assert_part_passes, assert_visible_fails, hidden, lab_solution, visible_failure

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

LAB, NOTEBOOK = "lab05", "lab05_quantization"
PARTS = ["quantize", "packing", "q4_1", "quant_linear", "performance"]
RELEASE = ROOT / "labs" / NOTEBOOK / f"{NOTEBOOK}.ipynb"


@pytest.fixture(scope="module")
def solution():
    return lab_solution(NOTEBOOK)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread, as the grader's sandbox runs: on a busy 2-core machine two threads of matmuls wait on each
    other (this file took 3.5 minutes so, 1 with one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REAL_FILE_TESTS = {"test_solution_passes", "test_the_visible_tests_read_smollm2s_file"}


@pytest.fixture(autouse=True)
def without_smollm2(request, monkeypatch, tmp_path_factory):
    """SmolLM2's GGUF file, where the set-up step fetched it, is read (2 s a time) only by the tests that are
    about it: everywhere else the lab and its suites see none, as they would on a machine without it."""
    if request.node.originalname not in REAL_FILE_TESTS:
        monkeypatch.setenv("EFFML_CACHE", str(tmp_path_factory.mktemp("no-smollm2")))


def test_the_visible_tests_read_smollm2s_file(solution):
    from effml_lib.checkpoints import smollm2_path

    if smollm2_path() is None:
        pytest.skip("SmolLM2's GGUF file is not fetched here (make models)")
    assert visible_failure(NOTEBOOK, "q4_1", dict(solution)) is None


def solution_cells():
    """(grade_id, code) of the source's cells that a solved notebook runs, markers removed, in order."""
    cells = nbformat.read(ROOT / "solutions" / NOTEBOOK / f"{NOTEBOOK}.ipynb", as_version=4).cells
    return [(c.metadata.get("nbgrader", {}).get("grade_id", ""), re.sub(r"\n? *### (BEGIN|END) SOLUTION", "", c.source))
            for c in cells if c.cell_type == "code"
            and not c.metadata.get("nbgrader", {}).get("grade_id", "").endswith(("_tests", "_visible"))]


def solved(**edits):
    """The solved notebook with some answers edited: ``grade_id=[(old, new), ...]`` replaces text that must be
    in that cell. Every cell runs again in a fresh namespace, so later answers use the edited ones (the
    QuantLinear of part 4 calls part 1's quantize and part 2's pack_int4, as in a student's notebook)."""
    namespace = {"__name__": "__main__"}
    for grade_id, code in solution_cells():
        for old, new in edits.get(grade_id, []):
            assert old in code, f"{grade_id} no longer contains {old!r}: update this mistake"
            code = code.replace(old, new)
        exec(code, namespace)
    return namespace


def fails(part, namespace, mistake):
    """The part's hidden tests must reject a submission with ``mistake``."""
    return assert_part_fails(LAB, part, namespace, mistake)


def rejected(part, namespace, mistake):
    """The hidden tests reject ``mistake``, and so do the part's visible tests. Returns the visible message."""
    fails(part, namespace, mistake)
    return assert_visible_fails(NOTEBOOK, part, namespace, mistake)


@pytest.mark.parametrize("part", PARTS)
def test_solution_passes(part, solution):
    assert_part_passes(LAB, part, dict(solution))


# --- part 1: quantize and dequantize ---------------------------------------------------------------------

QUANTIZE_MISTAKES = {  # mistake -> (edits of p1_solution, what the visible message must say)
    "symmetric qmax 2**(bits-1), not 2**(bits-1) - 1": (
        [("qmax = 2 ** (bits - 1) - 1", "qmax = 2 ** (bits - 1)")], "wrong scale"),
    "asymmetric levels 2**bits, not 2**bits - 1": ([("levels = 2**bits - 1", "levels = 2**bits")], "wrong scale"),
    "range not widened to hold 0": (
        [("low = groups.amin(dim=-1).clamp(max=0.0)", "low = groups.amin(dim=-1)"),
         ("high = groups.amax(dim=-1).clamp(min=0.0)", "high = groups.amax(dim=-1)")], "wrong scale"),
    "an all-zero group divides by zero": (
        [("scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: scale 1, codes 0", "pass"),
         ("        scale = torch.where(scale > 0, scale, torch.ones_like(scale))\n        zero_point", "        zero_point")],
        "wrong scale"),
    "floor, not round": ([("torch.round(groups", "torch.floor(groups")], "half a step"),
    "computed in bfloat16, the scale cast at the end": (
        [("groups = w.float().reshape", "groups = w.reshape"),
         ("QTensor(codes.reshape(w.shape), scale,", "QTensor(codes.reshape(w.shape), scale.float(),")], "wrong scale"),
    "group_size=None as one scale for the whole tensor": (
        [("groups = w.float().reshape(*w.shape[:-1], n // group, group)",
          "groups = (w.float().reshape(*w.shape[:-1], n // group, group) if group_size is not None "
          "else w.float().reshape(1, 1, -1))")], "scale must be float32 of shape"),
    "only 2-D weights": ([("groups = w.float().reshape(*w.shape[:-1], n // group, group)",
                           "groups = w.float().reshape(w.shape[0], n // group, group)")], "your quantize raised"),
    "int64 codes": ([(".clamp(-qmax, qmax).to(torch.int8)", ".clamp(-qmax, qmax).long()")], "codes must be torch.int8"),
    "a float zero point": ([("zero = zero_point.to(torch.uint8)", "zero = zero_point")], "zero must be uint8"),
    "group_size stored as the group's length": (
        [("scale, zero, bits, group_size, w.shape", "scale, zero, bits, group, w.shape")], "group_size=None (as given)"),
    "dtype not recorded": ([("group_size, w.shape, w.dtype)", "group_size, w.shape)")], "dtype=torch.bfloat16"),
    "no error for bits": ([('raise ValueError(f"bits must be an int in 2..8, got {bits!r}")', "pass")],
                          "must raise a ValueError naming bits"),
    "another error for group_size": (
        [("raise ValueError(f\"group_size {group_size!r}", "raise IndexError(f\"group_size {group_size!r}")],
        "should raise a ValueError naming group_size, got IndexError"),
    "dequantize ignores the zero point": ([("groups = groups - qt.zero.float()[..., None]", "pass")], "wrong values"),
    "dequantize returns float32": ([(".reshape(qt.shape).to(qt.dtype)", ".reshape(qt.shape)")], "in qt.dtype"),
    "dequantize takes |scale|": ([("qt.scale.float()[..., None]", "qt.scale.float().abs()[..., None]")],
                                 "a negative scale"),
    "dequantize ignores group_size": ([("group = n if qt.group_size is None else qt.group_size", "group = n")],
                                      "your dequantize raised"),
}


@pytest.mark.parametrize("mistake", list(QUANTIZE_MISTAKES))
def test_quantize_mistakes(mistake):
    edits, said = QUANTIZE_MISTAKES[mistake]
    message = rejected("quantize", solved(p1_solution=edits), mistake)
    assert said in message, f"{mistake}: the visible failure does not say what was expected: {message}"


def test_a_qtensor_of_the_student_s_own_class_is_read_the_same(solution):
    """A student's own container with the same fields (not the library's QTensor) is graded alike."""
    from dataclasses import dataclass

    @dataclass
    class MyQTensor:
        codes: torch.Tensor
        scale: torch.Tensor
        zero: object
        bits: int
        group_size: object
        shape: tuple
        dtype: torch.dtype = torch.float32

    def quantize(w, bits=8, group_size=None, symmetric=True):
        qt = solution["quantize"](w, bits, group_size, symmetric)
        return MyQTensor(qt.codes, qt.scale, qt.zero, qt.bits, qt.group_size, qt.shape, qt.dtype)
    assert_part_passes(LAB, "quantize", dict(solution, quantize=quantize))


def test_a_missing_field_fails(solution):
    def quantize(w, bits=8, group_size=None, symmetric=True):
        qt = solution["quantize"](w, bits, group_size, symmetric)
        return qt.codes, qt.scale, qt.zero  # a tuple, not a QTensor
    message = rejected("quantize", dict(solution, quantize=quantize), "a tuple")
    assert "must return a QTensor" in message, message


# --- part 2: pack_int4 and unpack_int4 -------------------------------------------------------------------

PACKING_MISTAKES = {
    "element 2i in the high nibble": (
        [("c[..., 0::2] | (c[..., 1::2] << 4)", "(c[..., 0::2] << 4) | c[..., 1::2]")], "0x21"),
    "halves, not neighbours (GGUF's order)": (
        [("c[..., 0::2] | (c[..., 1::2] << 4)", "c[..., : c.shape[-1] // 2] | (c[..., c.shape[-1] // 2:] << 4)")],
        "wrong bytes"),
    "not converted to uint8": ([("c = codes.to(torch.uint8)", "c = codes")], "returns uint8"),
    "only 2-D codes": ([("c[..., 0::2] | (c[..., 1::2] << 4)", "c[:, 0::2] | (c[:, 1::2] << 4)")], "your pack_int4 raised"),
    "no range check": ([('raise ValueError(f"codes must lie in 0..15', 'print(f"codes must lie in 0..15')],
                       "must raise a ValueError naming codes"),
    "no check of an odd last dimension": (
        [('raise ValueError(f"codes\' last dimension must be even', 'print(f"codes\' last dimension must be even')],
        "should raise a ValueError naming codes"),
    "unpack gives the high nibble first": (
        [("torch.stack((packed & 0x0F, packed >> 4), dim=-1)", "torch.stack((packed >> 4, packed & 0x0F), dim=-1)")],
        "low nibble first"),
    "unpack returns int64": ([(".flatten(-2)  # (..., n, 2)", ".flatten(-2).long()  # (..., n, 2)")], "returns uint8"),
}


@pytest.mark.parametrize("mistake", list(PACKING_MISTAKES))
def test_packing_mistakes(mistake):
    edits, said = PACKING_MISTAKES[mistake]
    message = rejected("packing", solved(p2_solution=edits), mistake)
    assert said in message, f"{mistake}: the visible failure does not say what was expected: {message}"


# --- part 3: dequantize_q4_1 -----------------------------------------------------------------------------

FP16_BY_HAND = """raw = b[..., 0].int() | (b[..., 1].int() << 8)
    d = ((1 - 2 * (raw >> 15)) * 2.0 ** (((raw >> 10) & 31) - 15) * (1 + (raw & 1023) / 1024)).float()[..., None]"""

Q4_1_MISTAKES = {
    "pack_int4's order (neighbours)": ([("q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()", "q = unpack_int4(qs).float()")],
                                       "not part 2's neighbours"),
    "d and m swapped": ([("return d * q + m", "return m * q + d")], "wrong weights"),
    "w = d * q - m": ([("return d * q + m", "return d * q - m")], "wrong weights"),
    "float16 decoded by hand, without zero and subnormals": (
        [("d = b[..., 0:2].view(torch.float16).float()  # (..., 1)", FP16_BY_HAND)], "wrong weights"),
    "every run of blocks flattened to (n, 32)": ([("b = blocks.contiguous()", "b = blocks.reshape(-1, 20)")],
                                                  "decode to float32 (32,)"),
    "float16 weights": ([("return d * q + m", "return (d * q + m).half()")], "decode to float32"),
    "no error for a block of another size": (
        [('raise ValueError(f"blocks must have shape (..., 20)', 'print(f"blocks must have shape (..., 20)')],
        "must raise a ValueError naming blocks"),
}


@pytest.mark.parametrize("mistake", list(Q4_1_MISTAKES))
def test_q4_1_mistakes(mistake):
    edits, said = Q4_1_MISTAKES[mistake]
    message = rejected("q4_1", solved(p3_solution=edits), mistake)
    assert said in message, f"{mistake}: the visible failure does not say what was expected: {message}"


def test_the_demo_class_wrong_answer_says_what_the_release_says(solution):
    """tests/test_labs.py's student loop and tests/test_autograde.py expect these messages from the demo
    class's wrong answer (Q4_1 decoded with pack_int4's nibble order)."""
    sys.path.insert(0, str(ROOT / "grading"))
    import demo_submissions

    namespace = dict(solution)
    exec(demo_submissions.CLASSES[NOTEBOOK]["wrong"]["p3_solution"], namespace)
    assert "not pack_int4's neighbours" in fails("q4_1", namespace, "the demo's wrong answer")
    assert "not part 2's neighbours" in assert_visible_fails(NOTEBOOK, "q4_1", namespace, "the demo's wrong answer")


# --- part 4: QuantLinear ---------------------------------------------------------------------------------

QUANT_LINEAR_MISTAKES = {  # mistake -> (edits by cell, what the visible message must say)
    "its own packing order (high nibble first), used consistently": (
        {"p2_solution": [("c[..., 0::2] | (c[..., 1::2] << 4)", "(c[..., 0::2] << 4) | c[..., 1::2]"),
                         ("torch.stack((packed & 0x0F, packed >> 4), dim=-1)", "torch.stack((packed >> 4, packed & 0x0F), dim=-1)")]},
        "read in the library's layout, do not hold the weight"),
    "symmetric at 4 bits, codes shifted by 8": (
        {"p4_solution": [("symmetric=(bits == 8))", "symmetric=True)"),
                         ("qt.codes if bits == 8 else pack_int4(qt.codes)", "qt.codes if bits == 8 else pack_int4(qt.codes + 8)"),
                         ("layer.zero.copy_(qt.zero)", "layer.zero.fill_(8)")]}, "wrong scales"),
    "the scale kept in float32": ({"p4_solution": [("layer.scale.copy_(qt.scale)", "layer.scale = qt.scale")]},
                                  "scale must be float16"),
    "a float weight cached at the first call": (
        {"p4_solution": [("return F.linear(x, self.dequantized_weight(x.dtype), bias)",
                          "if not hasattr(self, 'cached'):\n            self.cached = self.dequantized_weight()\n"
                          "        return F.linear(x, self.cached.to(x.dtype), bias)")]},
        "compute the weight from the buffers at every call"),
    "the bias dropped in forward": ({"p4_solution": [("bias = None if self.bias is None else self.bias.to(x.dtype)", "bias = None")]},
                                    "wrong output"),
    "x flattened to 2-D": ({"p4_solution": [("return F.linear(x, self.dequantized_weight(x.dtype), bias)",
                                             "return F.linear(x.reshape(-1, self.in_features), self.dequantized_weight(x.dtype), bias)")]},
                           "x of shape (3, 7, 256) gives"),
    "float32 out for a bfloat16 x": (
        {"p4_solution": [("return F.linear(x, self.dequantized_weight(x.dtype), bias)",
                          "return F.linear(x.float(), self.dequantized_weight(), None if bias is None else bias.float())")]},
        "a bfloat16 x gives a bfloat16 output"),
    "dequantized_weight ignores dtype": (
        {"p4_solution": [(".view(self.out_features, self.in_features).to(dtype)", ".view(self.out_features, self.in_features)")]},
        "dequantized_weight(torch.bfloat16) is bfloat16"),
}


@pytest.mark.parametrize("mistake", list(QUANT_LINEAR_MISTAKES))
def test_quant_linear_mistakes(mistake):
    edits, said = QUANT_LINEAR_MISTAKES[mistake]
    message = rejected("quant_linear", solved(**edits), mistake)
    assert said in message, f"{mistake}: the visible failure does not say what was expected: {message}"


# --- part 5: model_bytes, and the speed of a decode step ---------------------------------------------------

MODEL_BYTES_MISTAKES = {
    "parameters only (no buffers: no codes, scales or zero points)": (
        [("for tensor in model.state_dict().values():", "for tensor in model.parameters():")], "W8 per channel"),
    "a tied tensor counted twice": ([("if tensor.data_ptr() in seen:", "if False:")], "tied"),
    "Parameters and buffers told apart by identity, not by their memory": (
        [("for tensor in model.state_dict().values():", "for tensor in [*model.parameters(), *model.buffers()]:"),
         ("if tensor.data_ptr() in seen:", "if False:")], "share one tensor"),
    "MiB, not bytes": ([("return total", "return total / 2**20")], "bytes, got"),
}


def as_the_sandbox_receives_it(namespace):
    """``namespace`` whose model_bytes gets its model as a sandboxed one does. In this process (LocalStudent) a
    call's arguments arrive as they are; in the sandbox a model arrives rebuilt from the channel's data, where a
    tied tensor (one object under two names) becomes two Parameters sharing one tensor's memory."""
    sys.path.insert(0, str(ROOT / "grading"))
    from trusted import roundtrip

    model_bytes = namespace["model_bytes"]
    return dict(namespace, model_bytes=lambda model: model_bytes(roundtrip(model)))


@pytest.mark.parametrize("mistake", list(MODEL_BYTES_MISTAKES))
def test_model_bytes_mistakes(mistake):
    edits, said = MODEL_BYTES_MISTAKES[mistake]
    namespace = solved(p5_solution=edits)
    fails("performance", as_the_sandbox_receives_it(namespace), mistake)
    message = assert_visible_fails(NOTEBOOK, "performance", namespace, mistake)
    assert said in message, f"{mistake}: the visible failure does not say what was expected: {message}"


def test_a_tied_model_as_the_sandbox_receives_it(solution):
    """The solution counts a tied model's embedding once however it arrives; counting by identity does only
    when it arrives as the same object, as it does in this process (so that mistake is tried as it arrives there)."""
    sys.path.insert(0, str(ROOT / "grading"))
    from trusted import roundtrip

    from effml_lib.model import ModelConfig, Transformer

    tied = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16, tie_embeddings=True))
    received = roundtrip(tied)
    assert received.output.weight is not received.tok_embeddings.weight
    assert received.output.weight.data_ptr() == received.tok_embeddings.weight.data_ptr()
    assert solution["model_bytes"](received) == solution["model_bytes"](tied) == 4 * tied.num_parameters()


def test_a_loop_over_rows_is_too_slow():
    loop = ("codes = self.codes if self.bits == 8 else unpack_int4(self.codes)  # (out, in)",
            "rows = [self.codes[r] if self.bits == 8 else unpack_int4(self.codes[r]) for r in range(self.out_features)]\n"
            "        codes = torch.stack(rows)")
    namespace = solved(p4_solution=[loop])
    out = fails("performance", namespace, "a loop over rows")
    assert "too slow" in out and "allowed 4×" in out, out
    message = assert_visible_fails(NOTEBOOK, "performance", namespace, "a loop over rows")
    assert "too slow" in message and "at most 4× is expected" in message, message


def test_a_fast_but_wrong_layer_is_not_timed():
    wrong = ("groups = groups - self.zero.float()[..., None]", "pass")  # no zero point: fast, and wrong
    out = fails("performance", solved(p4_solution=[wrong]), "no zero point")
    assert "only a correct layer is timed" in out and "too slow" not in out, out


# --- nothing in the release, the library or the environment answers a part ----------------------------------

SINGLE = {"quantize": ["quantize", "dequantize"], "packing": ["pack_int4", "unpack_int4"], "q4_1": ["dequantize_q4_1"]}
ARITY = {"quantize": 4, "dequantize": 1, "pack_int4": 1, "unpack_int4": 1, "dequantize_q4_1": 1}


def release_code_cells():
    cells = nbformat.read(RELEASE, as_version=4).cells
    return [(c.metadata.get("nbgrader", {}).get("grade_id", ""), c.source) for c in cells if c.cell_type == "code"]


def functions_in(source):
    """(name, code) of every function the code defines, at any depth (a lambda as ``_lambda``)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, ast.unparse(node)
        elif isinstance(node, ast.Lambda):
            yield "_lambda", f"_lambda = {ast.unparse(node)}"


def callable_with(fn, n_args: int) -> bool:
    """Whether ``fn`` takes the first argument of an asked function, positionally, and needs no more than n_args."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    var = any(p.kind is p.VAR_POSITIONAL for p in params)
    return (bool(positional) or var) and len(required) <= n_args


def sample_answer(target, fn) -> bool:
    """Whether ``fn``, called as ``target``, gives the library's answer on one typical input (a quick look:
    only what passes it is worth running the hidden suite on)."""
    from effml_lib.checkpoints import dequantize_q4_1
    from effml_lib.quant import dequantize, pack_int4, quantize, unpack_int4

    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 64, generator=g)
    blocks = torch.randint(0, 256, (3, 4, 20), generator=g, dtype=torch.uint8)
    blocks[..., :4] = (torch.randn(3, 4, 2, generator=g) * 0.05).half().view(torch.uint8)
    cases = {"quantize": ((w, 4, 16, False), lambda got: torch.equal(got.codes, quantize(w, 4, 16, False).codes)),
             "dequantize": ((quantize(w, 4, 16, False),), lambda got: torch.equal(got, dequantize(quantize(w, 4, 16, False)))),
             "pack_int4": ((w.abs().long().clamp(0, 15),), lambda got: torch.equal(got, pack_int4(w.abs().long().clamp(0, 15)))),
             "unpack_int4": ((blocks,), lambda got: torch.equal(got, unpack_int4(blocks))),
             "dequantize_q4_1": ((blocks,), lambda got: torch.equal(got, dequantize_q4_1(blocks)))}
    args, right = cases[target]
    try:
        return bool(right(fn(*args)))
    except Exception:  # noqa: BLE001 - raising, or returning something else, is not the answer
        return False


RELEASED_FUNCTIONS = [(grade_id, name, code) for grade_id, source in release_code_cells()
                      for name, code in functions_in(source)]


def test_the_release_defines_functions_to_check():
    names = {name for _, name, _ in RELEASED_FUNCTIONS}
    assert {"q4_1_block", "library_weight", "check_quantize", "held_out_loss", "quantize", "dequantize_q4_1"} <= names, names


def test_the_quick_look_sees_an_answer(solution):
    """The check below would see each of the lab's answers: the quick look passes them to the hidden suite."""
    for target in ARITY:
        assert sample_answer(target, solution[target]), target


@pytest.mark.parametrize("grade_id,name,code", RELEASED_FUNCTIONS, ids=[f"{g}-{n}" for g, n, _ in RELEASED_FUNCTIONS])
def test_no_function_of_the_release_answers_a_part(solution, grade_id, name, code):
    """A lab part is not answered by any cell of its notebook (DESIGN.md): every function a cell of the release
    defines (read-only, visible, the stubs), copied as the student's answer to a function a part asks for (where
    its arguments fit), fails that part's hidden tests."""
    for part, asked in SINGLE.items():
        for target in asked:
            namespace = {n: v for n, v in solution.items() if n != target}
            try:
                exec(code, namespace)
            except Exception:  # noqa: BLE001 - a function that cannot even be defined alone answers nothing
                return
            fn = namespace[name]
            if not callable_with(fn, ARITY[target]) or not sample_answer(target, fn):
                continue
            namespace[target] = fn
            assert not hidden(LAB, part, namespace)["ok"], (
                f"{grade_id}'s {name}, copied as {target}, passes part {part}'s hidden tests")


def library_callables_the_release_uses():
    """(dotted name, object) of every effml_lib function the release reaches: names it imports from the
    library, and attributes of the library modules it imports (``library.quantize``, ``checkpoints.X``)."""
    found = {}
    for _, source in release_code_cells():
        modules = {}
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("effml_lib"):
                for alias in node.names:
                    obj = getattr(importlib.import_module(node.module), alias.name)
                    if isinstance(obj, type(sys)):
                        modules[alias.asname or alias.name] = obj
                    elif callable(obj) and not isinstance(obj, type):
                        found[f"{node.module.removeprefix('effml_lib.')}.{alias.name}"] = obj
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                obj = getattr(modules[node.value.id], node.attr, None)
                if callable(obj) and not isinstance(obj, type):
                    found[f"{modules[node.value.id].__name__.removeprefix('effml_lib.')}.{node.attr}"] = obj
    return found


def test_library_functions_the_release_uses_are_hidden_if_they_answer_a_part(solution):
    """The visible tests compare with the library (quantize, pack_int4, dequantize_q4_1...): every library
    function the release reaches that answers a part here, in-process, is one the sandbox lacks while graded."""
    sys.path.insert(0, str(ROOT / "grading"))
    from parts import library_names

    hidden_names = library_names(LAB)
    answering = []
    for name, fn in library_callables_the_release_uses().items():
        for part, asked in SINGLE.items():
            for target in asked:
                if callable_with(fn, ARITY[target]) and sample_answer(target, fn) \
                        and hidden(LAB, part, dict(solution, **{target: fn}))["ok"]:
                    answering.append(name)
                    assert name in hidden_names, f"the release uses {name}, which answers {part}, and grading does not hide it"
    assert {"quant.quantize", "quant.dequantize", "quant.pack_int4", "quant.unpack_int4", "checkpoints.dequantize_q4_1"} \
        <= set(answering), answering


def checked(decoder):
    """A third-party decoder as a submission would call it: with the part's own check of the block size."""
    def dequantize_q4_1(blocks):
        if blocks.dim() == 0 or blocks.shape[-1] != 20:
            raise ValueError("blocks must have shape (..., 20)")
        return decoder(blocks)
    return dequantize_q4_1


def gguf_decoder(blocks):
    import gguf
    import numpy as np

    out = gguf.quants.dequantize(blocks.reshape(-1, 20).numpy(), gguf.GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(*blocks.shape[:-1], 32)


def transformers_decoder():
    """transformers' own Q4_1 decoder, loaded from its file alone (importing transformers takes long)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None:
        pytest.skip("transformers is not installed")
    path = Path(spec.submodule_search_locations[0]) / "integrations" / "gguf" / "dequant.py"
    if not path.is_file():
        pytest.skip("this transformers has no GGUF dequantizer")
    loader = importlib.util.spec_from_file_location("_effml_transformers_gguf_dequant", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return lambda blocks: module.dequantize(blocks.reshape(-1, 20), module.GGML_Q4_1).reshape(*blocks.shape[:-1], 32).float()


@pytest.mark.parametrize("package", ["gguf", "transformers.integrations.gguf"])
def test_installed_decoders_that_answer_part_3_are_hidden(solution, package):
    """gguf (llama.cpp's package, which the hidden tests compare with) and transformers' GGUF loader decode Q4_1
    blocks: a submission calling them would pass part 3, so grading/parts.py hides their folders from the sandbox
    (grading/sandbox.py package_folders; tests/test_sandbox.py checks that a hidden package cannot be imported)."""
    sys.path.insert(0, str(ROOT / "grading"))
    from parts import PARTS

    if package == "gguf":
        pytest.importorskip("gguf")
        decoder = gguf_decoder
    else:
        decoder = transformers_decoder()
    assert hidden(LAB, "q4_1", dict(solution, dequantize_q4_1=checked(decoder)))["ok"], f"{package}'s decoder no longer answers part 3"
    assert package in PARTS[LAB]["hide_packages"], f"{package} answers part 3 and the sandbox can import it"


def test_the_float_layer_sent_back_scores_nothing(solution):
    """A from_linear that returns the nn.Linear it was given (which crosses the channel as data, so the grader
    would run it itself): every test of its buffers fails, and so does the model's, which asks for codes."""
    class QuantLinear(solution["QuantLinear"]):
        @classmethod
        def from_linear(cls, linear, bits=4, group_size=128):
            return linear
    result = hidden(LAB, "quant_linear", dict(solution, QuantLinear=QuantLinear))
    failed = {name.split("[")[0] for name, _ in result["failures"]}
    assert not result["ok"] and "test_effml_tiny_keeps_its_loss" in failed, failed
