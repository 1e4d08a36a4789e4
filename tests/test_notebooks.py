"""Every committed notebook runs top to bottom on a CPU, from a plain `pip install` of the package
outside the repository, as on Colab or in a user's venv (the course budget is 3 minutes on 2 cores;
timings are reported, not asserted: each cell has a generous timeout)."""

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook runner is in the dev extra: pip install -e '.[dev]'")
NotebookClient = pytest.importorskip("nbclient", reason="the notebook runner is in the dev extra").NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Appended to the notebook when it is run: every effml_lib module it used must come from the installed
# copy, and no module from the repository (outside the venv), or the run proved nothing about a plain
# install (the venv's editable install, or the repository on sys.path, would have served what a plain
# install lacks).
WHERE_FROM = """
import sys
from pathlib import Path
_installed, _repo, _venv = (Path(p).resolve() for p in ({installed!r}, {repo!r}, sys.prefix))
_files = {{name: Path(m.__file__).resolve() for name, m in list(sys.modules.items()) if getattr(m, "__file__", None)}}
_wrong = sorted(f"{{name}} from {{file}}" for name, file in _files.items()
                if (name.split(".")[0] == "effml_lib" and not file.is_relative_to(_installed))
                or (file.is_relative_to(_repo) and not file.is_relative_to(_venv)))
assert "effml_lib" in sys.modules, "the notebook never imported effml_lib"
assert not _wrong, "imported from elsewhere than the plain install: " + "; ".join(_wrong)
"""


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_from_a_plain_install_and_is_committed_executed(path, installed_package, tmp_path, monkeypatch):
    committed = nbformat.read(path, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.execution_count is not None for c in code), f"{path.name}: commit it executed, with outputs"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{path.name} has error outputs"

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(WHERE_FROM.format(installed=str(installed_package), repo=str(ROOT))))
    # The kernel inherits this environment: the installed copy comes first on its path, and it runs in a
    # folder of its own, so neither the repository nor the venv's editable install can serve effml_lib.
    monkeypatch.setenv("PYTHONPATH", str(installed_package))
    monkeypatch.delenv("EFFML_HIDDEN_TESTS", raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()
    start = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    print(f"{path.name}: executed from a plain install in {time.perf_counter() - start:.0f} s")
