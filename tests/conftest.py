"""Shared test helpers: seeded inputs and per-dtype tolerances."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter (on CPU tensors). Triton reads this
# when a kernel is defined, so it is set before any test imports effml_lib.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (atol, rtol) by dtype, for comparing a fast path with a float32/float64 reference
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close(actual, expected, dtype=None, what="output"):
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol,
        msg=lambda m: f"{what} differs from the reference ({actual.dtype}, atol={atol}, rtol={rtol}):\n{m}",
    )


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
