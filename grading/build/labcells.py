"""Cells of an nbgrader source notebook, shared by the labs' build scripts (grading/build/labNN_*.py)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SOLUTIONS = Path(__file__).resolve().parents[2] / "solutions"


def nbgrader(grade_id, *, solution=False, grade=False, locked=False, points=None):
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return {"nbgrader": meta}


class LabNotebook:
    """``md``/``code`` append cells; ``graded`` appends a part's graded cell; ``write`` saves the source."""

    def __init__(self, lab: str, name: str):
        self.lab, self.name, self.cells = lab, name, []  # lab: "lab01"; name: "lab01_transformer_basics"

    def md(self, text, grade_id):
        self.cells.append(new_markdown_cell(text.strip("\n"), metadata=nbgrader(grade_id, locked=True)))

    def code(self, text, grade_id, **kw):
        self.cells.append(new_code_cell(text.strip("\n"), metadata=nbgrader(grade_id, **kw)))

    def graded(self, lab_part, points, grade_id):
        self.code(f'''
# Graded: {points} points. The hidden tests of this part run here when your lab is graded.
### BEGIN HIDDEN TESTS
from effml_lib.grading import run_hidden_tests
passed = run_hidden_tests("{self.lab}", "{lab_part}", globals())  # assigned: a bare number would read as partial credit
### END HIDDEN TESTS
''', grade_id, grade=True, locked=True, points=points)

    def write(self) -> Path:
        out = SOLUTIONS / self.name / f"{self.name}.ipynb"
        nb = new_notebook(cells=self.cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        print(f"wrote {out}")
        return out
