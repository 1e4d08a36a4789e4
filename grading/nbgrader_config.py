"""nbgrader configuration of the course (used by `make labs` and the autograde driver).

Layout: nbgrader's "source" is solutions/, its "release" is labs/.
"""

import sys
from pathlib import Path

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "grading"))
from hide_test_code import ShortenTestTracebacks  # noqa: E402
from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, ClearHiddenTests,  # noqa: E402
                                    GetGrades, IgnorePattern, LimitOutput, SaveAutoGrades)
from resilient_execute import ResilientExecute  # noqa: E402

c.CourseDirectory.root = str(ROOT)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "labs"
c.CourseDirectory.course_id = "effml"
# The course's gradebook, for nbgrader's own tools in a hub (collect, autograde, formgrader).
# `make labs` overrides it with a temporary one: generating the release leaves no database behind.
c.CourseDirectory.db_url = f"sqlite:///{ROOT}/gradebook.db"

# Grading, as grading/autograde.py does it, for nbgrader's own tools (formgrader, `nbgrader autograde`):
# generous per-cell time (the hidden tests of a part run in one cell), a hung or crashing cell costs
# only itself, deleted graded cells are restored, and warnings on stderr never matter (they are not
# errors to nbgrader). Feedback hides the hidden-test code, tracebacks included.
c.Autograde.autograde_preprocessors = [ResilientExecute, IgnorePattern, ClearMetadataPreprocessor,
                                       LimitOutput, SaveAutoGrades, AssignLatePenalties, CheckCellMetadata]
c.ResilientExecute.timeout = 300
c.ResilientExecute.kernel_name = "python3"
c.OverwriteKernelspec.enabled = True
c.OverwriteCells.add_missing_cells = True
c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, ClearHiddenTests, ShortenTestTracebacks]
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
