# Graded: ${points} points. The hidden tests of this part run here when your lab is graded.
### BEGIN HIDDEN TESTS
from effml_lib.grading import run_hidden_tests
passed = run_hidden_tests("${lab}", "${part}", globals())  # assigned: a bare number would read as partial credit
### END HIDDEN TESTS
