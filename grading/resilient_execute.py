"""nbgrader's Execute step, made to survive a cell that hangs or kills the kernel.

nbgrader stops grading a notebook when its kernel dies (``os._exit``, a segfault, running out of
memory) and, with ``interrupt_on_timeout``, cannot stop a loop that ignores SIGINT. Here either
event costs only the cell it happened in: that cell gets an error output saying what happened
(so it scores zero if it is graded), the kernel is replaced, and the notebook runs again from the
top without that cell. Every other part is still graded, as if the broken cell had not been there.

The autograde driver (grading/autograde.py) names this class in the nbgrader config it writes.
"""

from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import Execute
from traitlets import Integer

# The error names written into a cell; the driver's feedback looks for them.
TIMEOUT_ENAME = "CellTimeoutError"
CRASH_ENAME = "KernelDied"


def _error_output(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


class ResilientExecute(Execute):
    max_restarts = Integer(
        10, help="How many hung or crashed cells to skip before the rest of the notebook is abandoned."
    ).tag(config=True)

    def preprocess(self, nb, resources=None, km=None):
        self.interrupt_on_timeout = False  # a timeout raises CellTimeoutError, and we restart the kernel
        self._broken: dict[int, NotebookNode] = {}  # cell index -> the error output it gets
        for _ in range(self.max_restarts + 1):
            try:
                nb, resources = super().preprocess(nb, resources, km)
                break
            except CellTimeoutError:
                self._broken[self._current] = _error_output(
                    TIMEOUT_ENAME, f"this cell ran longer than the {self.timeout} s allowed and was stopped; "
                    "the notebook was then run again without it")
            except DeadKernelError:
                self._broken[self._current] = _error_output(
                    CRASH_ENAME, "the Python kernel died while running this cell (os._exit, a crash or out "
                    "of memory); the notebook was then run again without it in a fresh kernel")
            for cell in nb.cells:  # outputs of the abandoned run must not survive into the next
                if cell.cell_type == "code":
                    cell.outputs = []
        else:  # too many broken cells: what did not run gets no output, so its points are zero
            for index, cell in enumerate(nb.cells):
                if cell.cell_type == "code" and index not in self._broken:
                    self._broken[index] = _error_output(
                        CRASH_ENAME, f"not run: more than {self.max_restarts} cells hung or crashed")
        for index, error in self._broken.items():
            nb.cells[index].outputs = [error]
        return nb, resources

    def preprocess_cell(self, cell, resources, index):
        if index in self._broken:
            return cell, resources
        self._current = index
        return super().preprocess_cell(cell, resources, index)
