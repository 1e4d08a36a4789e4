"""Build the course's notebooks and labs from their plain-text sources.

A source is a jupytext percent-format file: a cell starts at a `# %%` line (`# %% [markdown]` for prose,
whose lines are written as comments), and options after the marker become the cell's metadata:

    notebooks/src/NN_topic.py   ->  notebooks/NN_topic.ipynb                   (a notebook)
    grading/src/labNN_topic.py  ->  solutions/labNN_topic/labNN_topic.ipynb   (a lab's nbgrader source)

Options this tool reads, besides ordinary metadata such as `tags=["parameters"]`:

    shared="colab_setup"                 the cell's code is tools/cells/colab_setup.py: cells that many
                                         notebooks share live there once (leave the cell empty)
    nbgrader={"grade_id": "p1_solution", "solution": true}
                                         nbgrader's cell metadata; fields left out take the values below
    graded={"part": "rmsnorm"}           a lab's graded cell (leave it empty): tools/cells/graded.py, worth
                                         the points grading/parts.py gives that part; grading puts the
                                         results of the part's hidden tests in its output

Usage:
    python tools/build_notebooks.py SOURCE...            write each notebook, unexecuted
    python tools/build_notebooks.py --execute SOURCE...  write it, then run it and keep the outputs
"""

from __future__ import annotations

import argparse
import hashlib
import string
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SHARED_CELLS = ROOT / "tools" / "cells"
NOTEBOOK_SOURCES = ROOT / "notebooks" / "src"
LAB_SOURCES = ROOT / "grading" / "src"

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
# Every field nbgrader's schema 3 expects; a source names only those that differ.
NBGRADER_DEFAULTS = {"grade": False, "locked": False, "schema_version": 3, "solution": False, "task": False}
KEPT_METADATA = {"tags", "nbgrader"}
JUPYTEXT_LAYOUT = {"lines_to_next_cell"}  # how the .py spaces its cells: nothing a reader of the notebook sees


def all_sources() -> list[Path]:
    return sorted(NOTEBOOK_SOURCES.glob("*.py")) + sorted(LAB_SOURCES.glob("lab*.py"))


def target(source: Path) -> Path:
    """Where the notebook built from ``source`` is committed."""
    source = source.resolve()
    if source.parent == NOTEBOOK_SOURCES:
        return ROOT / "notebooks" / f"{source.stem}.ipynb"
    if source.parent == LAB_SOURCES:
        return ROOT / "solutions" / source.stem / f"{source.stem}.ipynb"
    raise ValueError(f"source must be a .py file in {NOTEBOOK_SOURCES} or {LAB_SOURCES}, got {source}")


def repository_url() -> str:
    """The course repository's address, kept once: pyproject.toml's [project.urls] Repository."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    try:
        return project["urls"]["Repository"]
    except KeyError:
        raise ValueError("pyproject.toml needs [project.urls] Repository = \"<the course's git URL>\"") from None


def shared_cell(name: str, **fields) -> str:
    """The text of tools/cells/<name>.py with its ${field}s filled in."""
    path = SHARED_CELLS / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in SHARED_CELLS.glob("*.py"))
        raise ValueError(f"shared={name!r}: there is no {path}; the shared cells are {known}")
    return string.Template(path.read_text().strip("\n")).substitute(fields)


def expand(cell, where: str, lab: str | None):
    """Turn one cell of a source into the notebook's cell: fill in shared code, complete nbgrader's metadata."""
    meta = cell.metadata
    for key in JUPYTEXT_LAYOUT:
        meta.pop(key, None)
    unknown = set(meta) - KEPT_METADATA - {"shared", "graded"}
    if unknown:
        raise ValueError(f"{where}: unknown cell option(s) {sorted(unknown)}; expected {sorted(KEPT_METADATA)}, "
                         f"shared=... or graded=...")
    if ("shared" in meta or "graded" in meta) and cell.source.strip():
        raise ValueError(f"{where}: a shared or graded cell takes its code from tools/cells/; leave it empty")
    if "shared" in meta:
        cell.source = shared_cell(meta.pop("shared"), repository=repository_url())
    if "graded" in meta:
        cell.source, grading = graded_cell(meta.pop("graded"), where, lab, meta.get("nbgrader", {}).get("grade_id"))
        meta["nbgrader"] = {**meta.get("nbgrader", {}), **grading}
    if "nbgrader" in meta:
        meta["nbgrader"] = nbgrader_metadata(meta["nbgrader"], where)
    return cell


def graded_cell(graded: dict, where: str, lab: str | None, grade_id: str | None) -> tuple[str, dict]:
    """A graded cell's text and its nbgrader fields; its points come from grading/parts.py's table."""
    if lab is None:
        raise ValueError(f"{where}: graded cells belong in labs (grading/src/labNN_*.py)")
    if not isinstance(graded, dict) or set(graded) != {"part"}:
        raise ValueError(f'{where}: graded must be {{"part": <hidden suite part>}} (points are in grading/parts.py), '
                         f'got {graded!r}')
    sys.path.insert(0, str(ROOT / "grading"))
    from parts import PARTS

    table = {p["part"]: p for p in PARTS.get(lab, {}).get("parts", [])}
    part = table.get(graded["part"])
    if part is None or part["grade_id"] != grade_id:
        raise ValueError(f"{where}: grading/parts.py has no part {graded['part']!r} of {lab} with grade_id {grade_id!r}")
    source = shared_cell("graded", lab=lab, part=part["part"], points=part["points"])
    return source, {"grade": True, "locked": True, "points": part["points"]}


def nbgrader_metadata(given: dict, where: str) -> dict:
    unknown = set(given) - set(NBGRADER_DEFAULTS) - {"grade_id", "points"}
    if "grade_id" not in given or unknown:
        raise ValueError(f"{where}: nbgrader needs a grade_id and takes only {sorted(NBGRADER_DEFAULTS)} "
                         f"and points; got {sorted(given)}")
    return {**NBGRADER_DEFAULTS, **given}


def cell_ids(cells) -> None:
    """Ids from each cell's text, so rebuilding an unchanged cell does not change its id in git."""
    seen = set()
    for cell in cells:
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()
        cell.id = next(digest[i:i + 8] for i in range(0, 32) if digest[i:i + 8] not in seen)
        seen.add(cell.id)


def build(source: Path) -> nbformat.NotebookNode:
    """The notebook that ``source`` describes, unexecuted."""
    source = Path(source)
    is_lab = source.resolve().parent == LAB_SOURCES
    lab = source.stem.split("_")[0] if is_lab else None  # "lab01_transformer_basics" -> "lab01"
    parsed = jupytext.read(source, fmt="py:percent")
    cells = [expand(cell, f"{source.name}, cell {i + 1}", lab) for i, cell in enumerate(parsed.cells)]
    cell_ids(cells)
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": dict(KERNELSPEC)})
    if not is_lab:
        nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> float:
    """Run ``nb`` in place in a scratch folder (so it cannot lean on the repository), return seconds taken."""
    from nbclient import NotebookClient

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        NotebookClient(nb, timeout=timeout, kernel_name=KERNELSPEC["name"], record_timing=False,
                       resources={"metadata": {"path": scratch}}).execute()
    tidy_streams(nb)
    return time.perf_counter() - start


def tidy_streams(nb) -> None:
    """Keep what a reader would see of printed output. A progress bar prints each state over the last
    one, after a carriage return: coalescing keeps only the finished bar. Its closing newline can arrive
    as an output of its own, after later prints: a stream of nothing but whitespace is dropped."""
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    CoalesceStreamsPreprocessor().preprocess(nb, {})
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if o.output_type != "stream" or o.text.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", type=Path, help="source files (default: every source)")
    parser.add_argument("--execute", action="store_true", help="run each notebook and keep its outputs")
    args = parser.parse_args(argv)
    for source in [s.resolve() for s in args.sources] or all_sources():
        out, nb = target(source), build(source)
        took = f", executed in {execute(nb):.0f} s" if args.execute else ""
        nbformat.write(nb, out)
        print(f"{source.relative_to(ROOT)} -> {out.relative_to(ROOT)} ({len(nb.cells)} cells{took})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
