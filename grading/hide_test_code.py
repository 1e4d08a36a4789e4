"""nbgrader preprocessors of the course: feedback that never quotes test code, and no autograding by nbgrader.

nbgrader's ClearHiddenTests empties the region between the ``### BEGIN/END HIDDEN TESTS`` markers in
the cell's source, but an error's traceback quotes the failing lines of that same source. This
preprocessor cuts each error output of an autograder-test cell down to its last line
(``AssertionError: 2 of 5 hidden tests failed``); the cell's printed output, which names each failed
test and its message, is kept.
"""

from nbgrader.preprocessors import NbGraderPreprocessor


def _is_autograder_test(cell) -> bool:
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and meta.get("grade", False) and not meta.get("solution", False)


class ShortenTestTracebacks(NbGraderPreprocessor):  # nbgrader's base: enabled once listed in the config
    def preprocess_cell(self, cell, resources, index):
        if _is_autograder_test(cell):
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
        return cell, resources


class RefuseAutograde(NbGraderPreprocessor):
    """The course's nbgrader_config.py puts this in place of nbgrader's own autograding, which would run
    a student's notebook unsandboxed in your kernel and, with this course's graded cells, score nothing."""

    def preprocess(self, nb, resources):
        raise RuntimeError("this course is graded by grading/autograde.py (a sandbox for the notebook, the "
                           "hidden tests outside it), not by `nbgrader autograde`: run "
                           "`python grading/autograde.py LAB submitted/ --out graded/LAB` (grading/README.md)")
