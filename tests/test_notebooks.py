"""Every committed notebook runs top to bottom on a CPU (the course budget is 3 minutes on 2 cores;
timings are reported, not asserted: each cell has a generous timeout)."""

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook runner is in the dev extra: pip install -e '.[dev]'")
NotebookClient = pytest.importorskip("nbclient", reason="the notebook runner is in the dev extra").NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_is_committed_executed(path, tmp_path):
    committed = nbformat.read(path, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.execution_count is not None for c in code), f"{path.name}: commit it executed, with outputs"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{path.name} has error outputs"

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s")
