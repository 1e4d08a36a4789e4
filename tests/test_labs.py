"""The labs: the committed release is current and hides what it must, and a student's loop works.

That each lab's solution runs clean (visible tests included) and passes every hidden test is checked
where it is graded end to end, by nbgrader, in tests/test_autograde.py (the solution student of each
lab's class): running the source notebook here as well would cost a second full run per lab."""

import filecmp
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")
NotebookClient = pytest.importorskip("nbclient", reason="the lab tooling is in the dev extra").NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in (ROOT / "solutions").glob("lab*/*.ipynb"))


def test_there_are_labs():
    assert SOURCES, "solutions/ holds no lab"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_release_is_regenerated_from_the_source(source, tmp_path):
    name = source.parent.name
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(  # `nbgrader generate_assignment`, as `make labs` runs it (the grader's quicker start)
        [*grading_module("autograde").NBGRADER, "generate_assignment", name, "--force", "--log-level=WARN",
         f"--CourseDirectory.release_directory={tmp_path}", f"--CourseDirectory.db_url=sqlite:///{tmp_path}/gradebook.db"],
        cwd=ROOT / "grading", env=env, check=True, capture_output=True,
    )
    fresh, committed = tmp_path / name, ROOT / "labs" / name
    comparison = filecmp.dircmp(fresh, committed)
    assert not (comparison.left_only or comparison.right_only), f"files differ: {comparison.left_only} {comparison.right_only}"
    for f in comparison.common_files:
        assert (fresh / f).read_bytes() == (committed / f).read_bytes(), (
            f"labs/{name}/{f} is stale: run `make labs` and commit the result")


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_release_hides_solutions_and_hidden_tests(source):
    release = ROOT / "labs" / source.parent.name / source.name
    text = release.read_text()
    assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text and "run_hidden_tests" not in text
    assert "raise NotImplementedError()" in text


# lab -> the part tried, what is answered before it, a wrong answer, its message, the fix. None stands for
# the source's solution (before, right) or the demo class's wrong answer to that part (wrong).
STUDENT_LOOPS = {
    "lab01_transformer_basics": dict(
        part=2, before={},
        wrong="def rms_norm(x, weight, eps=1e-5):\n    return weight * x / x.abs().mean(-1, keepdim=True)",
        message="rms of [3, 4] is sqrt(12.5)",
        right=("def rms_norm(x, weight, eps=1e-5):\n    xf = x.float()\n"
               "    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)")),
    "lab02_rope": dict(part=2, before={"p1_solution": None}, wrong=None,
                       message="interleaved: pairs (2i, 2i+1)", right=None),
    "lab03_kv_cache": dict(part=2, before={"p1_solution": None}, wrong=None,
                           message="sequence 1's tokens belong at its positions 5 and 6", right=None),
    "lab04_gqa": dict(
        part=2, before={},
        wrong=("def pool_heads(weight, head_dim, n_groups):\n"
               "    n_heads = weight.shape[0] // head_dim\n"
               "    grouped = weight.reshape(n_heads // n_groups, n_groups, head_dim, *weight.shape[1:])\n"
               "    return grouped.mean(0).reshape(n_groups * head_dim, *weight.shape[1:])  # heads g, g+n, ...: strided"),
        message="new head 0 = mean of old heads 0 and 1",
        right=None),
    "lab05_quantization": dict(part=3, before={"p2_solution": None}, wrong=None,
                               message="not part 2's neighbours", right=None),
}


def grading_module(name: str):
    """A module of grading/ (``demo_submissions``, ``autograde``), imported from there."""
    sys.path.insert(0, str(ROOT / "grading"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def demo_class_wrong_answer(lab: str, grade_id: str) -> str:
    """The wrong answer the lab's demo class (grading/demo_submissions.py) gives to ``grade_id``."""
    return grading_module("demo_submissions").CLASSES[lab]["wrong"][grade_id]


@pytest.mark.parametrize("name", list(STUDENT_LOOPS))
def test_a_student_fails_a_visible_test_with_a_clear_message_then_passes(name, tmp_path):
    """The student's loop in JupyterLab, through a real kernel: open the release, answer a part
    wrongly, read the visible test's message, fix the answer, pass; the graded cell runs quietly."""
    loop = STUDENT_LOOPS[name]
    source = nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)
    solutions = {c.metadata.nbgrader.grade_id: re.sub(r"\n? *### (BEGIN|END) SOLUTION", "", c.source)
                 for c in source.cells if c.metadata.get("nbgrader", {}).get("solution")}
    nb = nbformat.read(ROOT / "labs" / name / f"{name}.ipynb", as_version=4)
    by_id = {c.metadata.nbgrader.grade_id: c for c in nb.cells}
    part = loop["part"]
    solution_id, visible_id, tests_id = f"p{part}_solution", f"p{part}_visible", f"p{part}_tests"
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        run = lambda cell: client.execute_cell(cell, nb.cells.index(cell))  # noqa: E731
        run(by_id["imports"])
        for grade_id, code in loop["before"].items():
            by_id[grade_id].source = code or solutions[grade_id]
            run(by_id[grade_id])
        by_id[solution_id].source = loop["wrong"] or demo_class_wrong_answer(name, solution_id)
        run(by_id[solution_id])
        run(by_id[visible_id])
        errors = [o for o in by_id[visible_id].outputs if o.output_type == "error"]
        assert errors and errors[0].ename == "AssertionError", by_id[visible_id].outputs
        assert loop["message"] in errors[0].evalue, f"unclear message: {errors[0].evalue}"
        by_id[solution_id].source = loop["right"] or solutions[solution_id]
        run(by_id[solution_id])
        run(by_id[visible_id])
        text = "".join(o.get("text", "") for o in by_id[visible_id].outputs)
        assert f"part {part}: visible tests passed" in text, by_id[visible_id].outputs
        run(by_id[tests_id])
        assert not [o for o in by_id[tests_id].outputs if o.output_type == "error"], "the released graded cell must run quietly"
