"""Every committed notebook and lab source notebook is what its plain-text source builds.

Contributors edit notebooks/src/*.py and grading/src/*.py; `make notebooks` and `make labs` write the
.ipynb files. A notebook edited by hand, or a source changed without rebuilding, fails here. Outputs are
not compared (they come from running the notebook), only what the source decides: each cell's type,
text, tags and nbgrader metadata.
"""

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tooling is in the dev extra: pip install -e '.[dev]'")
pytest.importorskip("jupytext", reason="the notebook sources are read with jupytext, in the dev extra")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "tools" / "build_notebooks.py")
build_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_notebooks)

SOURCES = build_notebooks.all_sources()


def what_the_source_decides(nb) -> list[dict]:
    return [{"type": c.cell_type, "source": c.source, "tags": c.metadata.get("tags"),
             "nbgrader": c.metadata.get("nbgrader")} for c in nb.cells]


def first_difference(built: list[dict], committed: list[dict]) -> str:
    for i, (b, c) in enumerate(zip(built, committed)):
        for key in b:
            if b[key] == c[key]:
                continue
            if key != "source":
                return f"cell {i + 1}: {key} is {c[key]!r} in the notebook but {b[key]!r} in the source"
            ours, theirs = b[key].splitlines(), c[key].splitlines()
            n = next((n for n, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
            return f"cell {i + 1}, line {n + 1}: the notebook has {theirs[n:n + 1]}, the source {ours[n:n + 1]}"
    return f"the source builds {len(built)} cells, the notebook has {len(committed)}"


def test_every_notebook_has_a_source():
    built = {build_notebooks.target(s) for s in SOURCES}
    committed = set((ROOT / "notebooks").glob("*.ipynb")) | set((ROOT / "solutions").glob("lab*/*.ipynb"))
    assert committed and committed == built, (
        f"notebooks without a source: {sorted(map(str, committed - built))}; "
        f"sources never built: {sorted(map(str, built - committed))}")


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_committed_notebook_matches_its_source(source):
    out = build_notebooks.target(source)
    assert out.is_file(), f"{out.relative_to(ROOT)} is missing: build it from {source.relative_to(ROOT)}"
    built = what_the_source_decides(build_notebooks.build(source))
    committed = what_the_source_decides(nbformat.read(out, as_version=4))
    make = "make labs" if "solutions" in out.parts else "make notebooks"
    assert built == committed, (f"{out.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: "
                                f"{first_difference(built, committed)}. Edit the source, then run `{make}`")


@pytest.mark.parametrize("header, message", [
    ('# %% tag=["parameters"]', "unknown cell option"),  # a typo would silently drop the parameters tag
    ('# %% shared="colab_setup"\nprint("lost")', "leave it empty"),
    ('# %% shared="no_such_cell"', "the shared cells are"),
    ('# %% graded={"part": "x", "points": 1}', "graded cells belong in labs"),
])
def test_a_mistake_in_a_source_stops_the_build(tmp_path, header, message):
    source = tmp_path / "99_broken.py"
    source.write_text(f"# %% [markdown]\n# # Title\n\n{header}\n")
    with pytest.raises(ValueError, match=message):
        build_notebooks.build(source)


def test_the_colab_cell_installs_once_on_colab_and_does_nothing_elsewhere(monkeypatch):
    """Plain Python (the labs' namespace is built by exec-ing their cells), a non-editable install of the
    repository named in pyproject.toml without the dev extra, and harmless to run again."""
    url = build_notebooks.repository_url()
    cell = compile(build_notebooks.shared_cell("colab_setup", repository=url), "colab_setup", "exec")
    pip_calls, installed = [], {"effml_lib": False}
    real_find_spec = importlib.util.find_spec

    def fake_run(command, **kwargs):
        pip_calls.append(command)
        installed["effml_lib"] = True
        return types.SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed["effml_lib"] else None) if name == "effml_lib"
                        else real_find_spec(name, *a))
    exec(cell, {})
    assert pip_calls == [], "off Colab the cell must do nothing"

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(cell, {})
    exec(cell, {})  # run again: already installed
    assert pip_calls == [[sys.executable, "-m", "pip", "install", "--quiet", f"git+{url}"]], pip_calls
