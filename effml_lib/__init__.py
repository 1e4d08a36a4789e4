"""effml_lib: the shared implementation every effml notebook imports.

One module per technique (see docs/API.md); each technique that has a GPU kernel takes
``impl="auto" | "torch" | "triton"``.
"""

__version__ = "0.1.0"
