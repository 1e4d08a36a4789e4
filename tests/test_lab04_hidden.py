"""Lab 04's hidden suites (grading/hidden/lab04) pass the solution and fail realistic mistakes, and
every mistake that ignores an input form the hidden tests use fails the lab's visible tests too."""

import ast
import copy
import dataclasses
import importlib
import inspect
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import assert_part_fails, assert_part_passes, assert_visible_fails, hidden, lab_solution

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

LAB, NOTEBOOK = "lab04", "lab04_gqa"
PARTS = ["attention", "pooling", "conversion", "memory"]
RELEASE = Path(__file__).resolve().parents[1] / "labs" / NOTEBOOK / f"{NOTEBOOK}.ipynb"


@pytest.fixture(scope="module")
def solution():
    return lab_solution(NOTEBOOK)


def fails(part, namespace, mistake):
    """The part's hidden tests must reject a submission with ``mistake``."""
    return assert_part_fails(LAB, part, namespace, mistake)


def rejected(part, namespace, mistake):
    """The hidden tests reject ``mistake``, and so do the part's visible tests (before the student submits).
    Returns the visible failure's message."""
    fails(part, namespace, mistake)
    return assert_visible_fails(NOTEBOOK, part, namespace, mistake)


@pytest.mark.parametrize("part", PARTS)
def test_solution_passes(part, solution):
    assert_part_passes(LAB, part, dict(solution))


# --- part 1: attention ---------------------------------------------------------------------------------

def attention_with(mistake):
    """The solution's attention with one input form handled wrong (``mistake`` names which)."""
    def attention(q, k, v, causal=True, mask=None):
        b, h, tq, d = q.shape
        h_kv, tk = k.shape[1], k.shape[2]
        g = h // h_kv
        if mistake == "causal=False ignored":
            causal = True
        scores = q.float().reshape(b, h_kv, g * tq, d) @ k.float().transpose(-2, -1) / math.sqrt(d)
        scores = scores.view(b, h_kv, g, tq, tk)  # (B, Hkv, G, Tq, Tk)
        allowed = None
        if causal:
            allowed = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        use_mask = mask is not None and mistake != "mask ignored" and not (mistake == "mask or causal, not both" and causal)
        if use_mask:
            if mistake == "only full-shape masks":
                grouped = mask.view(b, h_kv, g, tq, tk)  # fails unless the mask is already (B, H, Tq, Tk)
            elif mistake == "mask heads read as KV heads":
                grouped = mask.unsqueeze(-3)  # (B|1, H|1, 1, Tq, Tk) against (B, Hkv, G, Tq, Tk)
            else:
                grouped = torch.broadcast_to(mask, (b, h, tq, tk)).reshape(b, h_kv, g, tq, tk)
            allowed = grouped if allowed is None else allowed & grouped
        if allowed is not None:
            fill = torch.finfo(scores.dtype).min if mistake == "large negative instead of -inf" else float("-inf")
            scores = scores.masked_fill(~allowed, fill)
        probs = scores.softmax(-1)
        if mistake != "NaN for a query with no key":
            probs = probs.nan_to_num(0.0)
        out = (probs.view(b, h_kv, g * tq, tk) @ v.float()).view(b, h, tq, d)
        return out if mistake == "float32 out" else out.to(q.dtype)
    return attention


ATTENTION_MISTAKES = {  # mistake -> what the visible tests' message must say
    "mask ignored": "mask",
    "mask or causal, not both": "both must allow a key",
    "only full-shape masks": "mask",
    "mask heads read as KV heads": "mask per head",
    "NaN for a query with no key": "must return zeros, got NaN",
    "large negative instead of -inf": "must return zeros",  # such a query averages every value instead
    "causal=False ignored": "every query sees every key",
    "float32 out": "return q's dtype",
}


@pytest.mark.parametrize("mistake", list(ATTENTION_MISTAKES))
def test_attention_mistakes(solution, mistake):
    message = rejected("attention", dict(solution, attention=attention_with(mistake)), mistake)
    assert ATTENTION_MISTAKES[mistake] in message, f"{mistake}: the visible failure does not say what was expected: {message}"


def test_interleaved_groups(solution):
    def attention(q, k, v, causal=True, mask=None):  # query head h reads KV head h % Hkv
        g = q.shape[1] // k.shape[1]
        order = torch.arange(q.shape[1]).view(g, -1).t().reshape(-1)  # heads regrouped by h % Hkv
        out = solution["attention"](q[:, order], k, v, causal, None if mask is None else mask)
        return out[:, torch.argsort(order)]
    message = rejected("attention", dict(solution, attention=attention), "h % Hkv")
    assert "uses KV head i // 4" in message, message


def test_mask_aligned_to_the_start(solution):
    def attention(q, k, v, causal=True, mask=None):
        b, h, tq, d = q.shape
        h_kv, tk = k.shape[1], k.shape[2]
        scores = q.float().reshape(b, h_kv, -1, d) @ k.float().transpose(-2, -1) / math.sqrt(d)
        scores = scores.view(b, h_kv, h // h_kv, tq, tk)
        if causal:
            scores = scores.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(), float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~torch.broadcast_to(mask, (b, h, tq, tk)).reshape(scores.shape), float("-inf"))
        probs = scores.view(b, h_kv, -1, tk).softmax(-1).nan_to_num(0.0)
        return (probs @ v.float()).view(b, h, tq, d).to(q.dtype)
    message = rejected("attention", dict(solution, attention=attention), "start-aligned mask")
    assert "keys 0 .. 4 + i" in message, message


def test_broadcasting_instead_of_grouping(solution):
    def attention(q, k, v, causal=True, mask=None):  # right for MHA and MQA, where k broadcasts; not for GQA
        tq, tk = q.shape[2], k.shape[2]
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
        allowed = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else torch.ones(tq, tk, dtype=torch.bool)
        if mask is not None:
            allowed = allowed & mask
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        return (probs @ v.float()).to(q.dtype)
    rejected("attention", dict(solution, attention=attention), "k broadcast over query heads")


def copied_heads_attention(q, k, v, causal=True, mask=None):
    """Right answer, but K/V copied to every query head first: what the lab asks not to do. (Once the lab's
    own read-only helper for its visible tests, a working answer to part 1 that a student could copy.)"""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, Tk, D)
    tq, tk = q.shape[2], k.shape[2]
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(tk - tq)
    if mask is not None:
        allowed = allowed & mask
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (probs @ v.double()).to(q.dtype)


def solution_on_copied_heads(solution):
    def attention(q, k, v, causal=True, mask=None):  # the solution's grouping, fed K/V copied per query head
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        return solution["attention"](q, k, v, causal, mask)
    return attention


@pytest.mark.parametrize("answer", ["copied_heads_attention", "solution_on_copied_heads"])
def test_repeating_the_cache(solution, answer):
    attention = copied_heads_attention if answer == "copied_heads_attention" else solution_on_copied_heads(solution)
    namespace = dict(solution, attention=attention)
    assert_part_passes(LAB, "attention", namespace)  # part 1 checks the function only
    message = rejected("memory", namespace, "repeat_interleave")
    assert "do not copy K/V per query head" in message, message


# --- no cell of the released lab answers part 1 ----------------------------------------------------------

def release_code_cells():
    """(grade_id, source) of every code cell of the released lab, as the student receives it."""
    cells = nbformat.read(RELEASE, as_version=4).cells
    return [(c.metadata.get("nbgrader", {}).get("grade_id", ""), c.source) for c in cells if c.cell_type == "code"]


def functions_in(source):
    """(name, code) of every function the code defines, at any depth: each def, and each lambda (bound to
    ``_lambda``), unparsed alone, as a student would copy it out of the cell."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, ast.unparse(node)
        elif isinstance(node, ast.Lambda):
            yield "_lambda", f"_lambda = {ast.unparse(node)}"


def as_part1_answer(solution, name, code):
    """The solved namespace whose ``attention`` is the function ``code`` defines under ``name``, pasted into
    the student's notebook (its globals are the notebook's, where ``attention`` is now that function)."""
    namespace = {n: value for n, value in solution.items() if n != "attention"}
    exec(code, namespace)
    namespace["attention"] = namespace[name]
    return namespace


def test_the_copy_check_catches_a_copyable_answer(solution):
    """The check below would have caught the lab's former read-only helper, a copy-based attention."""
    [(name, code)] = [f for f in functions_in(inspect.getsource(copied_heads_attention)) if f[0] == "copied_heads_attention"]
    assert_part_passes(LAB, "attention", as_part1_answer(solution, name, code))


RELEASED_FUNCTIONS = [(grade_id, name, code) for grade_id, source in release_code_cells()
                      for name, code in functions_in(source)]


@pytest.mark.parametrize("grade_id,name,code", RELEASED_FUNCTIONS,
                         ids=[f"{g}-{n}" for g, n, _ in RELEASED_FUNCTIONS])
def test_no_function_of_the_release_answers_part_1(solution, grade_id, name, code):
    """A lab part is not answered by any cell of its notebook (DESIGN.md): every function that a cell of the
    release defines (read-only, visible, the solution cells' stubs), copied as the student's
    ``attention``, fails part 1's hidden tests."""
    fails("attention", as_part1_answer(solution, name, code), f"{grade_id}'s {name} copied as attention")


def test_the_release_defines_functions_to_check():
    cells = {grade_id for grade_id, _, _ in RELEASED_FUNCTIONS}
    assert {"p1_solution", "p1_visible", "p3_visible"} <= cells, cells
    assert not any("softmax" in code for _, _, code in RELEASED_FUNCTIONS), "a released cell defines a softmax"


def test_library_functions_the_release_imports_are_hidden_if_they_answer_part_1(solution):
    """What the release imports from the library (attention_reference, for the visible tests) answers
    part 1 here, in-process; the sandbox must lack every such name while the lab is graded."""
    sys.path.insert(0, str(RELEASE.parents[2] / "grading"))
    from parts import library_names

    hidden_names = library_names(LAB)
    answering = []
    for _, source in release_code_cells():
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("effml_lib.")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                name = f"{node.module.removeprefix('effml_lib.')}.{alias.name}"
                fn = getattr(module, alias.name)
                if callable(fn) and not isinstance(fn, type) and hidden(LAB, "attention", dict(solution, attention=fn))["ok"]:
                    answering.append(name)
                    assert name in hidden_names, f"the release imports {name}, which answers part 1, and grading does not hide it"
    assert "attention.attention_reference" in answering, answering  # the visible tests' definition, checked here


# --- part 2: pool_heads --------------------------------------------------------------------------------

def test_pooling_strided_heads(solution):
    def pool_heads(weight, head_dim, n_groups):
        n_heads = weight.shape[0] // head_dim
        grouped = weight.float().reshape(n_heads // n_groups, n_groups, head_dim, *weight.shape[1:])
        return grouped.mean(0).reshape(n_groups * head_dim, *weight.shape[1:]).to(weight.dtype)
    message = rejected("pooling", dict(solution, pool_heads=pool_heads), "heads g, g+n, ... pooled")
    assert "new head 0 = mean of old heads 0 and 1" in message, message


def test_pooling_by_sum(solution):
    def pool_heads(weight, head_dim, n_groups):
        g = weight.shape[0] // head_dim // n_groups
        return solution["pool_heads"](weight, head_dim, n_groups) * g
    rejected("pooling", dict(solution, pool_heads=pool_heads), "sum")


def pool_heads_with(solution, mistake):
    """The solution's pool_heads with one input form handled wrong."""
    def pool_heads(weight, head_dim, n_groups):
        n_heads = weight.shape[0] // head_dim
        if mistake == "no error: heads dropped":
            weight = weight[: (n_heads // n_groups) * n_groups * head_dim]
            n_heads = weight.shape[0] // head_dim
        elif mistake == "assert, not ValueError":
            assert n_heads % n_groups == 0, "n_groups must divide the heads"
        elif mistake == "ValueError that does not name n_groups":
            if n_heads % n_groups:
                raise ValueError("the number of heads is not divisible")
        else:
            if n_heads % n_groups:
                raise ValueError(f"n_groups ({n_groups}) must divide the {n_heads} heads")
        group = n_heads // n_groups
        if mistake == "weights only, no bias":
            grouped = weight.float().reshape(n_groups, group, head_dim, weight.shape[1])
            return grouped.mean(1).reshape(n_groups * head_dim, weight.shape[1]).to(weight.dtype)
        if mistake == "summed head by head in the input's dtype":
            heads = [weight[i * head_dim:(i + 1) * head_dim] for i in range(n_heads)]
            return torch.cat([sum(heads[g * group:(g + 1) * group]) / group for g in range(n_groups)])
        if mistake == "changes its input":
            grouped = weight.view(n_groups, group, head_dim, *weight.shape[1:])
            grouped[:, 0] = grouped.mean(1)  # the mean written over each group's first head, in the caller's tensor
            return grouped[:, 0].reshape(n_groups * head_dim, *weight.shape[1:]).clone()
        grouped = weight.float().reshape(n_groups, group, head_dim, *weight.shape[1:])
        out = grouped.mean(1).reshape(n_groups * head_dim, *weight.shape[1:])
        return out if mistake == "float32 out" else out.to(weight.dtype)
    return pool_heads


POOLING_MISTAKES = {
    "no error: heads dropped": "raise a ValueError",
    "assert, not ValueError": "raise a ValueError",
    "ValueError that does not name n_groups": "names n_groups",
    "weights only, no bias": "a bias (n_heads * D,) of 4 heads of 2 into 1: your pool_heads raised",
    "summed head by head in the input's dtype": "average in float32 and round once",
    "float32 out": "return the input's dtype",
    "changes its input": "leave its input as it was",
}


@pytest.mark.parametrize("mistake", list(POOLING_MISTAKES))
def test_pooling_mistakes(solution, mistake):
    message = rejected("pooling", dict(solution, pool_heads=pool_heads_with(solution, mistake)), mistake)
    assert POOLING_MISTAKES[mistake] in message, f"{mistake}: the visible failure does not say what was expected: {message}"


# --- part 3: mha_to_gqa --------------------------------------------------------------------------------

def with_pool_heads(solution, pool_heads):
    """The solution's namespace whose pool_heads is ``pool_heads`` (its mha_to_gqa calls that one)."""
    namespace = dict(solution, pool_heads=pool_heads)
    namespace["mha_to_gqa"] = types.FunctionType(solution["mha_to_gqa"].__code__, namespace)
    return namespace


def test_conversion_keeping_the_first_head_of_each_group(solution):
    def pool_heads(weight, head_dim, n_groups):  # the naive conversion: drop all but one head per group
        n_heads = weight.shape[0] // head_dim
        return weight.reshape(n_groups, n_heads // n_groups, head_dim, *weight.shape[1:])[:, 0].reshape(
            n_groups * head_dim, *weight.shape[1:]).clone()
    message = rejected("conversion", with_pool_heads(solution, pool_heads), "first head kept")
    assert "the means [1.0, 4.0] / 100" in message, message


def test_conversion_in_place(solution):
    def mha_to_gqa(model, n_kv_heads):
        converted = solution["mha_to_gqa"](model, n_kv_heads)
        for mine, theirs in zip(model.layers, converted.layers):
            mine.attention.wk, mine.attention.wv = theirs.attention.wk, theirs.attention.wv
            mine.attention.n_kv_heads = n_kv_heads
        model.config = converted.config
        return model
    message = rejected("conversion", dict(solution, mha_to_gqa=mha_to_gqa), "changes the original")
    assert "leave the model you were given as it was" in message, message


def test_conversion_forgetting_the_config(solution):
    def mha_to_gqa(model, n_kv_heads):
        converted = solution["mha_to_gqa"](model, n_kv_heads)
        converted.config = copy.deepcopy(model.config)
        return converted
    rejected("conversion", dict(solution, mha_to_gqa=mha_to_gqa), "config not updated")


def conversion_with(solution, mistake):
    """A conversion like the solution's with one input form handled wrong."""
    pool_heads = solution["pool_heads"]

    def mha_to_gqa(model, n_kv_heads):
        converted = copy.deepcopy(model)
        layers = converted.layers[:1] if mistake == "only the first layer" else converted.layers
        for block in layers:
            attn = block.attention
            names = ("wk",) if mistake == "V not pooled" else ("wk", "wv")
            for name in names:
                old = getattr(attn, name)
                bias = old.bias is not None and mistake != "biases dropped"
                new = torch.nn.Linear(old.in_features, n_kv_heads * attn.head_dim, bias=bias, dtype=old.weight.dtype)
                with torch.no_grad():
                    if mistake == "groups counted from the query heads":  # right from MHA only
                        group = attn.n_heads // n_kv_heads
                        new.weight.copy_(old.weight.reshape(n_kv_heads, group, attn.head_dim, old.in_features).mean(1)
                                         .reshape(-1, old.in_features))
                    else:
                        new.weight.copy_(pool_heads(old.weight, attn.head_dim, n_kv_heads))
                    if bias:
                        new.bias.copy_(pool_heads(old.bias, attn.head_dim, n_kv_heads))
                setattr(attn, name, new)
            if mistake != "n_kv_heads not set":
                attn.n_kv_heads = n_kv_heads
        converted.config = dataclasses.replace(model.config, n_kv_heads=n_kv_heads)
        return converted
    return mha_to_gqa


CONVERSION_MISTAKES = {
    "V not pooled": "wv",
    "biases dropped": "bias must be pooled too",
    "groups counted from the query heads": "2 KV heads to 1: your mha_to_gqa raised",  # from a GQA model
    "only the first layer": "layer 1",
    "n_kv_heads not set": "attention.n_kv_heads must be",
}


@pytest.mark.parametrize("mistake", list(CONVERSION_MISTAKES))
def test_conversion_mistakes(solution, mistake):
    message = rejected("conversion", dict(solution, mha_to_gqa=conversion_with(solution, mistake)), mistake)
    assert CONVERSION_MISTAKES[mistake] in message, f"{mistake}: the visible failure does not say what was expected: {message}"
