"""nbgrader configuration of the course (used by `make labs` and by nbgrader's tools in a hub).

Layout: nbgrader's "source" is solutions/, its "release" is labs/.

Grading is grading/autograde.py's: it runs each notebook in a sandbox and the hidden tests outside it.
`nbgrader autograde` run directly would execute students' code with your rights and no hidden tests
(graded cells hold none), so here it refuses, saying what to run instead.
"""

import sys
from pathlib import Path

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "grading"))
from hide_test_code import RefuseAutograde, ShortenTestTracebacks  # noqa: E402
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import ClearHiddenTests, GetGrades  # noqa: E402

c.CourseDirectory.root = str(ROOT)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "labs"
c.CourseDirectory.course_id = "effml"
# The course's gradebook, for nbgrader's own tools in a hub (collect, formgrader, export).
# `make labs` overrides it with a temporary one: generating the release leaves no database behind.
c.CourseDirectory.db_url = f"sqlite:///{ROOT}/gradebook.db"

c.Autograde.sanitize_preprocessors = [RefuseAutograde]
c.Autograde.autograde_preprocessors = [RefuseAutograde]
c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, ClearHiddenTests, ShortenTestTracebacks]
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
