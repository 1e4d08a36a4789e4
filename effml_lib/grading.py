"""Where the labs are graded: not here.

A lab's hidden tests never run in the student's notebook. The course's grader
(``grading/autograde.py`` in the course repository; ``grading/README.md`` says how) runs each
submitted notebook in a sandbox, with a copy of this library that lacks the functions the lab asks
for, and calls the student's functions from a separate, trusted process that holds the hidden tests
and makes every comparison. Nothing in ``effml_lib`` takes part in a grade, so there is nothing here
for a submission to call, patch or inspect.
"""


def run_hidden_tests(*args, **kwargs):
    """What graded cells of earlier releases called. Raises: grading happens outside the notebook."""
    raise RuntimeError("graded cells no longer run hidden tests inside the notebook: the course's grader "
                       "(grading/autograde.py) runs them from outside when your lab is graded. Running this "
                       "cell yourself does nothing; fetch the lab's current release.")
