"""Shared test helpers: seeded inputs and per-dtype tolerances."""

import pytest
import torch

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
