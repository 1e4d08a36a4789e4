"""nbgrader configuration of the course (used by `make labs` and the autograde driver).

Layout: nbgrader's "source" is solutions/, its "release" is labs/.
"""

from pathlib import Path

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

ROOT = Path(__file__).resolve().parents[1]
c.CourseDirectory.root = str(ROOT)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "labs"
c.CourseDirectory.course_id = "effml"
# The gradebook of `make labs` is throwaway: generating the release must leave no database behind.
c.CourseDirectory.db_url = "sqlite:////tmp/effml-nbgrader-release.db"

# Grading: generous per-cell time (the hidden tests of a part run in one cell), restore deleted
# graded cells, and never let warnings on stderr matter.
c.Execute.timeout = 300
c.Execute.interrupt_on_timeout = True
c.OverwriteCells.add_missing_cells = True
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
