"""The labs: each nbgrader source runs clean with its solutions, and the committed release is current."""

import filecmp
import os
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
def test_solution_passes_its_visible_and_hidden_tests(source, tmp_path):
    nb = nbformat.read(source, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    graded = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert graded, "a lab needs graded cells"
    for cell in graded:
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert "hidden tests passed" in text and "FAILED" not in text, f"{cell.metadata.nbgrader.grade_id}: {text}"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_release_is_regenerated_from_the_source(source, tmp_path):
    name = source.parent.name
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [str(bin_dir / "nbgrader"), "generate_assignment", name, "--force", "--log-level=WARN",
         f"--CourseDirectory.release_directory={tmp_path}"],
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
