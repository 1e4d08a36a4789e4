"""Shared test helpers: seeded inputs, per-dtype tolerances, the labs' solved namespaces, and the package
installed as a user installs it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter (on CPU tensors). Triton reads this
# when a kernel is defined, so it is set before any test imports effml_lib.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]

# (atol, rtol) by dtype, for comparing a fast path with a float32/float64 reference
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close(actual, expected, dtype=None, what="output"):
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol,
        msg=lambda m: f"{what} differs from the reference ({actual.dtype}, atol={atol}, rtol={rtol}):\n{m}",
    )


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def lab_solution(name: str) -> dict:
    """What a student who solved lab ``name`` (e.g. "lab03_kv_cache") has defined: the nbgrader
    source's code cells run in order with their solutions; graded cells and visible tests are skipped
    (they only check)."""
    import nbformat

    namespace = {}
    for cell in nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4).cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "")
        if cell.cell_type != "code" or grade_id.endswith(("_tests", "_visible")):
            continue
        exec(re.sub(r"\n? *### (BEGIN|END) SOLUTION", "", cell.source), namespace)
    return namespace


@pytest.fixture(scope="session")
def bubblewrap_available():
    """Grading's sandbox (grading/sandbox.py) needs bubblewrap. Without it these tests skip, saying how
    to install it; in CI, which installs it (`make test` runs `make system-deps`), they fail."""
    sys.path.insert(0, str(ROOT / "grading"))
    from sandbox import bubblewrap

    if bubblewrap() is None:
        message = ("the grader's sandbox needs bubblewrap, which is missing or cannot make namespaces here: "
                   "sudo apt-get install bubblewrap (or `make system-deps`)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return True


def _lab_cells(name: str) -> list:
    import nbformat

    return nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4).cells


def visible_failure(name: str, part: str, namespace: dict) -> str | None:
    """Lab ``name``'s visible tests of ``part`` (a hidden suite's name, e.g. "apply_rope") run on
    ``namespace``, as a student runs them: the visible cells up to that part's, in order, in one copy of
    the namespace (a visible cell may set up what a later one uses; an earlier part's failure is not
    this part's). Returns the failure's message, or None when the part's visible tests pass."""
    sys.path.insert(0, str(ROOT / "grading"))
    from parts import BY_NOTEBOOK, PARTS

    grade_id = next(p["grade_id"] for p in PARTS[BY_NOTEBOOK[name]]["parts"] if p["part"] == part)
    target = grade_id.removesuffix("_tests") + "_visible"
    scope = dict(namespace)
    for cell in _lab_cells(name):
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "")
        if cell.cell_type != "code" or not grade_id.endswith("_visible"):
            continue
        try:
            exec(cell.source, scope)
        except Exception as error:  # noqa: BLE001 - a student's answer may raise anything
            if grade_id == target:
                return f"{type(error).__name__}: {error}"
        if grade_id == target:
            return None
    raise KeyError(f"{name} has no visible cell {target}")


def assert_visible_fails(name: str, part: str, namespace: dict, mistake: str) -> str:
    """Visible tests cover every input form the hidden tests use: an answer with ``mistake`` (one
    input form handled wrong) that the hidden tests reject must fail the visible tests too, before
    the student submits. Returns the visible failure's message."""
    message = visible_failure(name, part, namespace)
    if message is None:
        pytest.fail(f"{name} {part}: the visible tests pass an answer with this mistake, which the hidden "
                    f"tests reject: {mistake}")
    return message


def hidden(lab: str, part: str, namespace: dict) -> dict:
    """Lab ``lab``'s hidden suite of ``part`` run against ``namespace`` in this process, as the grader
    runs it against a sandboxed notebook (grading/trusted.py; values still cross the channel's
    encoding). Returns passed, total, failures ([test, message]) and ok."""
    sys.path.insert(0, str(ROOT / "grading"))
    from trusted import LocalStudent, run_part

    return run_part(lab, part, LocalStudent(namespace))


def assert_part_passes(lab: str, part: str, namespace: dict) -> int:
    result = hidden(lab, part, namespace)
    assert result["ok"] and result["passed"] > 0, f"{lab} {part}: {result['failures'][:3] or result}"
    return result["passed"]


def assert_part_fails(lab: str, part: str, namespace: dict, mistake: str) -> str:
    """Lab ``lab``'s hidden tests of ``part`` must reject a submission with ``mistake``, by a failing
    test (not by not running). Returns the failures' messages, for checking what they say."""
    result = hidden(lab, part, namespace)
    if result["ok"]:
        pytest.fail(f"{lab} {part}: the hidden tests passed a submission with this mistake: {mistake}")
    assert result["total"] > 0 and result["failures"], f"{part}: failed for another reason than its tests: {result}"
    return "\n".join(message for _, message in result["failures"])


# What a clone of the repository has that a user's copy would not: left out of the copy pip builds from.
_NOT_IN_A_CLONE = {".git", ".venv", "build", "dist", "graded", ".pytest_cache"}


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory) -> Path:
    """effml-lib installed the way Colab or a user's venv gets it, ``pip install <repo>`` (a wheel, not
    the editable install the venv has), into a folder outside the repository; once per test session.

    Returns that folder: a Python started with it first on ``PYTHONPATH``, in a working directory
    outside the repository, imports this copy of ``effml_lib``, with only what the wheel ships. pip
    builds from a fresh copy of the working tree, so no build/ left over from an earlier build (which
    could still hold a deleted module) reaches the wheel, and nothing is written into the checkout."""
    tmp = tmp_path_factory.mktemp("pip-install")
    source, target = tmp / "source", tmp / "site-packages"
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        n for n in names if n in ("__pycache__", ".ipynb_checkpoints") or n.endswith(".egg-info")
        or (Path(folder) == ROOT and n in _NOT_IN_A_CLONE)])
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"pip install of the package failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert (target / "effml_lib" / "__init__.py").is_file(), f"pip installed no effml_lib into {target}"
    return target
