"""Cells of a course notebook, shared by the build scripts in this folder."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1]


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

    def write(self):
        nb = new_notebook(cells=self.cells)
        nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.write(nb, self.out)
        print(f"wrote {self.out} ({len(self.cells)} cells)")
