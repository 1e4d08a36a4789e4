"""Lab 03's hidden suites (grading/hidden/lab03) pass the solution and fail realistic mistakes; a mistake
that ignores an input form (sequences at different positions, several KV heads, a bf16 cache, GQA, a
float32 model, stale cache entries...) fails the part's visible tests too, so a student finds it before
submitting."""

import re
import types

import pytest
import torch

from conftest import ROOT, assert_part_fails, assert_part_passes, assert_visible_fails, lab_solution, visible_failure

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

LAB = "lab03_kv_cache"
PARTS = ["bytes", "cache", "forward", "generate", "performance"]


@pytest.fixture(scope="module")
def solution():
    return lab_solution(LAB)


def rebound(namespace, **functions):
    """``namespace`` with some names replaced, and every solution function rebound to it, so that
    generate_greedy calls the replaced forward_with_cache or StaticKVCache, as in a student's notebook."""
    out = dict(namespace, **functions)
    for name in ("forward_with_cache", "generate_greedy"):
        if name not in functions:
            out[name] = types.FunctionType(namespace[name].__code__, out)
    return out


def variant(solution, grade_id, *edits):
    """The solution with one cell's answer edited: each ``(old, new)`` replaces text that must be in
    the cell; the edited cell runs in a copy of the namespace (its names replace the solution's)."""
    cells = nbformat.read(ROOT / "solutions" / LAB / f"{LAB}.ipynb", as_version=4).cells
    source = next(c.source for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    source = re.sub(r"\n? *### (BEGIN|END) SOLUTION", "", source)
    for old, new in edits:
        assert old in source, f"{grade_id} no longer contains {old!r}: update this mistake"
        source = source.replace(old, new)
    namespace = dict(solution)
    exec(source, namespace)
    return namespace


def fails(part, namespace, mistake):
    """The part's hidden tests must reject a submission with ``mistake``."""
    return assert_part_fails("lab03", part, namespace, mistake)


def fails_both(part, namespace, mistake):
    """An input form handled wrong: the hidden tests reject it, and so do the part's visible tests."""
    fails(part, namespace, mistake)
    return assert_visible_fails(LAB, part, namespace, mistake)


@pytest.mark.parametrize("part", PARTS)
def test_solution_passes(part, solution):
    assert_part_passes("lab03", part, dict(solution))


@pytest.mark.parametrize("part", PARTS[:4])
def test_solution_passes_the_visible_tests(part, solution):
    assert visible_failure(LAB, part, dict(solution)) is None


# --- part 1: kv_cache_bytes and sequences_that_fit ----------------------------------------------

def test_bytes_without_the_factor_two(solution):
    def kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2):
        return int(batch_size * seq_len * n_layers * n_kv_heads * head_dim * bytes_per_elem)  # K only
    fails_both("bytes", dict(solution, kv_cache_bytes=kv_cache_bytes), "K only")


def test_bytes_with_query_heads(solution):
    # Counting n_heads where n_kv_heads belongs is a formula bug the tests see through GQA shapes; here the
    # student's function is right but the answer to the question is computed for MHA.
    fails_both("bytes", dict(solution, sequences_that_fit=(80 * 2**30 - 2 * 8_030_261_248) // (2 * 4096 * 32 * 32 * 128 * 2)),
               "question answered with 32 KV heads")


def test_bytes_integer_division_of_a_fraction(solution):
    def kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2):
        return 2 * batch_size * seq_len * n_layers * n_kv_heads * head_dim * int(bytes_per_elem)  # int4 as 0
    fails_both("bytes", dict(solution, kv_cache_bytes=kv_cache_bytes), "int4 as 0")


def test_bytes_a_float_for_int4(solution):
    def kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2):
        return 2 * batch_size * seq_len * n_layers * n_kv_heads * head_dim * bytes_per_elem  # 0.5: a float
    fails_both("bytes", dict(solution, kv_cache_bytes=kv_cache_bytes), "a float for a fractional width")


def test_bytes_ignoring_the_element_width(solution):
    def kv_cache_bytes(batch_size, seq_len, n_layers, n_kv_heads, head_dim, bytes_per_elem=2):
        return 2 * batch_size * seq_len * n_layers * n_kv_heads * head_dim * 2  # always bf16
    fails_both("bytes", dict(solution, kv_cache_bytes=kv_cache_bytes), "bytes_per_elem ignored")


def test_sequences_typed_as_a_float(solution):
    fails_both("bytes", dict(solution, sequences_that_fit=float(solution["sequences_that_fit"])), "a float")


# --- part 2: StaticKVCache.update ----------------------------------------------------------------

def cache_with(solution, update):
    """The solution's namespace with a StaticKVCache whose update is ``update`` (the given __init__ kept)."""
    return dict(solution, StaticKVCache=type("StaticKVCache", (solution["StaticKVCache"],), {"update": update}))


def test_cache_ignoring_per_sequence_positions(solution):
    base = solution["StaticKVCache"]

    def update(self, layer, k_new, v_new, positions):  # every sequence written at sequence 0's positions
        return base.update(self, layer, k_new, v_new, positions[:1].expand_as(positions))
    message = fails_both("cache", cache_with(solution, update), "positions[0] for all")
    assert "sequence 1's tokens belong at its positions 5 and 6" in message, message


def test_cache_returning_only_the_new_entries(solution):
    base = solution["StaticKVCache"]

    def update(self, layer, k_new, v_new, positions):
        _, _, context_lens = base.update(self, layer, k_new, v_new, positions)
        return k_new, v_new, context_lens
    fails_both("cache", cache_with(solution, update), "returns the new tokens")


def test_cache_returning_two_values(solution):
    base = solution["StaticKVCache"]

    def update(self, layer, k_new, v_new, positions):  # the lab's old interface: no context_lens
        return base.update(self, layer, k_new, v_new, positions)[:2]
    fails_both("cache", cache_with(solution, update), "(k, v) only")


CONTEXT_LENS_MISTAKES = {  # mistake -> the context_lens it returns, from positions (B, T)
    "off by one: positions[:, -1]": lambda positions: positions[:, -1].to(torch.int32),
    "the batch's longest for every sequence": lambda positions: (positions.max() + 1).to(torch.int32).expand(positions.shape[0]),
    "row 0's length for every sequence": lambda positions: (positions[0, -1] + 1).to(torch.int32).expand(positions.shape[0]),
    "int64, not int32": lambda positions: positions[:, -1] + 1,
    "shape (B, 1), not (B,)": lambda positions: (positions[:, -1:] + 1).to(torch.int32),
    "the step's T, not the sequence's length": lambda positions: torch.full((positions.shape[0],), positions.shape[1], dtype=torch.int32),
}


@pytest.mark.parametrize("mistake", CONTEXT_LENS_MISTAKES)
def test_cache_context_lens(solution, mistake):
    base, wrong = solution["StaticKVCache"], CONTEXT_LENS_MISTAKES[mistake]

    def update(self, layer, k_new, v_new, positions):
        k, v, _ = base.update(self, layer, k_new, v_new, positions)
        return k, v, wrong(positions)
    fails_both("cache", cache_with(solution, update), f"context_lens {mistake}")


def test_cache_without_errors(solution):
    def update(self, layer, k_new, v_new, positions):  # no checks: overflow raises IndexError, if anything
        rows = torch.arange(k_new.shape[0])[:, None]
        self.k[layer][rows, :, positions] = k_new.transpose(1, 2)
        self.v[layer][rows, :, positions] = v_new.transpose(1, 2)
        return self.k[layer], self.v[layer], (positions[:, -1] + 1).to(torch.int32)
    fails_both("cache", cache_with(solution, update), "no clear errors")


CHECK_MISTAKES = {  # mistake -> the solution's check, edited
    "no check of negative positions (-1 wraps to the last slot)":
        ("positions.min() < 0 or positions.max() >= self.max_seq_len", "positions.max() >= self.max_seq_len"),
    "overflow check off by one (the last position refused)":
        ("positions.max() >= self.max_seq_len", "positions.max() >= self.max_seq_len - 1"),
    "no check that rows are consecutive": ("if not bool((positions.diff(dim=1) == 1).all()):", "if False:"),
    "rows checked increasing, not consecutive": ("(positions.diff(dim=1) == 1)", "(positions.diff(dim=1) >= 1)"),
    "only row 0 checked consecutive": ("(positions.diff(dim=1) == 1)", "(positions[:1].diff(dim=1) == 1)"),
    "v_new's shape not checked": ('(("k_new", k_new), ("v_new", v_new))', '(("k_new", k_new),)'),
    "every shape error names k_new": ("raise ValueError(f\"{name} must", "raise ValueError(f\"k_new must"),
}


@pytest.mark.parametrize("mistake", CHECK_MISTAKES)
def test_cache_checks(solution, mistake):
    fails_both("cache", variant(solution, "p2_solution", CHECK_MISTAKES[mistake]), mistake)


STORE_MISTAKES = {  # mistake -> the solution's store, edited
    "tokens and heads swapped (reshape, not transpose)":
        ("k_new.transpose(1, 2).to(k_layer.dtype)", "k_new.reshape(b, t, h_kv, d).to(k_layer.dtype)"),
    "stored as float32 (a bf16 cache fails)": ("k_new.transpose(1, 2).to(k_layer.dtype)", "k_new.transpose(1, 2).float()"),
    "always layer 0": ("k_layer, v_layer = self.k[layer], self.v[layer]", "k_layer, v_layer = self.k[0], self.v[0]"),
}


@pytest.mark.parametrize("mistake", STORE_MISTAKES)
def test_cache_stores(solution, mistake):
    fails_both("cache", variant(solution, "p2_solution", STORE_MISTAKES[mistake]), mistake)


# --- part 3: forward_with_cache ----------------------------------------------------------------------

def test_forward_without_a_mask(solution):
    forward = solution["forward_with_cache"]
    from effml_lib.attention import attention

    def forward_with_cache(model, cache, tokens, positions):
        ns = dict(solution, attention=lambda q, k, v, causal=True, mask=None: attention(q, k, v, causal=False))
        return types.FunctionType(forward.__code__, ns)(model, cache, tokens, positions)
    fails_both("forward", rebound(solution, forward_with_cache=forward_with_cache), "no mask")


def test_forward_with_positions_of_sequence_zero(solution):
    forward = solution["forward_with_cache"]

    def forward_with_cache(model, cache, tokens, positions):  # one position row for the whole batch
        return forward(model, cache, tokens, positions[:1].expand_as(positions))
    fails_both("forward", rebound(solution, forward_with_cache=forward_with_cache), "positions[0] for all")


def test_forward_without_rope(solution):
    forward = solution["forward_with_cache"]

    def forward_with_cache(model, cache, tokens, positions):
        ns = dict(solution, apply_rope_qk=lambda q, k, cos, sin, positions: (q, k))
        return types.FunctionType(forward.__code__, ns)(model, cache, tokens, positions)
    fails_both("forward", rebound(solution, forward_with_cache=forward_with_cache), "no RoPE")


FORWARD_MISTAKES = {  # mistake -> the solution's forward_with_cache, edited
    "k and v viewed with n_heads (a GQA model fails)":
        [("att.wk(h).view(b, t, att.n_kv_heads,", "att.wk(h).view(b, t, att.n_heads,"),
         ("att.wv(h).view(b, t, att.n_kv_heads,", "att.wv(h).view(b, t, att.n_heads,")],
    "RoPE at 0 .. T-1, not at positions": [("apply_rope_qk(q, k, cos, sin, positions)",
                                            "apply_rope_qk(q, k, cos, sin, torch.arange(t).expand(b, t))")],
    "every query sees up to its row's last position (not causal within a call)":
        [("positions[:, :, None])[:, None]", "positions[:, -1:, None])[:, None]")],
    "one mask for the batch (up to the batch's furthest position)":
        [("positions[:, :, None])[:, None]", "positions.max(0).values[None, :, None])[:, None]")],
}


@pytest.mark.parametrize("mistake", FORWARD_MISTAKES)
def test_forward_input_forms(solution, mistake):
    namespace = variant(solution, "p3_solution", *FORWARD_MISTAKES[mistake])
    fails_both("forward", rebound(solution, forward_with_cache=namespace["forward_with_cache"]), mistake)


# --- part 4: generate_greedy -------------------------------------------------------------------------

def test_generate_reading_the_padding(solution):
    """The first new token taken at the end of the padded prompt, not at each prompt's last token."""
    def generate_greedy(model, prompts, max_new_tokens):
        longest = max(map(len, prompts))
        padded = [p + [0] * (longest - len(p)) for p in prompts]
        return solution["generate_greedy"](model, padded, max_new_tokens)
    fails_both("generate", dict(solution, generate_greedy=generate_greedy), "padding read as prompt")


def test_generate_one_prompt_at_a_time_is_fine_but_a_shared_position_is_not(solution):
    forward = solution["forward_with_cache"]

    def forward_with_cache(model, cache, tokens, positions):  # decode steps at the longest prompt's position
        if tokens.shape[1] == 1:
            positions = positions.max().expand_as(positions)
        return forward(model, cache, tokens, positions)
    fails_both("generate", rebound(solution, forward_with_cache=forward_with_cache), "one position for the batch")


GENERATE_MISTAKES = {  # mistake -> the solution's generate_greedy, edited
    "the cache always float64 (a float32 model fails)": ("config.head_dim, dtype=dtype)", "config.head_dim, dtype=torch.float64)"),
    "the cache sized with n_heads (a GQA model fails)": ("longest + max_new_tokens, config.n_kv_heads,",
                                                        "longest + max_new_tokens, config.n_heads,"),
}


@pytest.mark.parametrize("mistake", GENERATE_MISTAKES)
def test_generate_input_forms(solution, mistake):
    fails_both("generate", variant(solution, "p4_solution", GENERATE_MISTAKES[mistake]), mistake)


# --- part 5: what the cache buys ---------------------------------------------------------------------

def test_recomputing_everything(solution):
    def generate_greedy(model, prompts, max_new_tokens):
        out = []
        with torch.no_grad():
            for prompt in prompts:
                tokens = list(prompt)
                for _ in range(max_new_tokens):
                    tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
                out.append(tokens[len(prompt):])
        return out
    fails("performance", dict(solution, generate_greedy=generate_greedy), "no cache")


# --- the check itself ------------------------------------------------------------------------------------

def test_a_visible_test_that_misses_a_form_is_caught(solution, monkeypatch):
    """Break the visible tests on purpose (drop part 2's bf16 cache): a cache that stores float32
    then passes them, and assert_visible_fails says so."""
    helpers = visible_failure.__globals__  # tests/conftest.py's, as imported above (a later import may be another copy)
    cells = helpers["_lab_cells"](LAB)
    cell = next(c for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == "p2_visible")
    start, end = "# A bf16 cache stays bf16", "# Clear errors"
    assert start in cell.source and end in cell.source, "part 2's visible cell changed: update this test"
    cell.source = cell.source[:cell.source.index(start)] + cell.source[cell.source.index(end):]
    monkeypatch.setitem(helpers, "_lab_cells", lambda name: cells)
    namespace = variant(solution, "p2_solution", STORE_MISTAKES["stored as float32 (a bf16 cache fails)"])
    with pytest.raises(pytest.fail.Exception, match="visible tests pass an answer"):
        assert_visible_fails(LAB, "cache", namespace, "float32 stores")
