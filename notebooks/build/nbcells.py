"""Cells of a course notebook, shared by the build scripts in this folder."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1]

# Every notebook's first code cell: on Colab there is no `make lab`, so the course installs itself.
COLAB_SETUP = """# On Google Colab: fetch the course (code, shipped weights, benchmark results) and install it.
# Elsewhere `make lab` has already done this and the cell does nothing.
import sys
if "google.colab" in sys.modules:
    !git clone -q --depth 1 https://github.com/effml/effml /content/effml
    %pip install -q -e "/content/effml[dev]"
    sys.path.insert(0, "/content/effml")  # the editable install is visible without a restart"""


class CourseNotebook:
    """``md``/``code`` append cells (``tags=["parameters"]`` marks the sizes cell); ``write`` saves
    ``notebooks/<name>.ipynb`` unexecuted."""

    def __init__(self, name: str):
        self.out, self.cells = NOTEBOOKS / f"{name}.ipynb", []

    def md(self, text):
        self.cells.append(new_markdown_cell(text.strip("\n")))

    def code(self, text, tags=None):
        cell = new_code_cell(text.strip("\n"))
        if tags:
            cell.metadata["tags"] = tags
        self.cells.append(cell)

    def colab_setup(self):
        self.code(COLAB_SETUP)

    def write(self):
        nb = new_notebook(cells=self.cells)
        nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.write(nb, self.out)
        print(f"wrote {self.out} ({len(self.cells)} cells)")
