# Graded: ${points} points. When your lab is graded, this part's hidden tests call what you defined
# above from outside your notebook, and their results appear here. Running it yourself does nothing.
