"""Shared pieces of lab 01's hidden tests. Every assertion carries a message: with --assert=plain
(how effml_lib.grading runs these files) the message is all a student sees."""

import pytest
import torch


def _close(actual, expected, atol, rtol):
    """True when the shapes match and every element is within atol + rtol * |expected|."""
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    return bool(torch.isclose(actual.double(), expected.double(), atol=atol, rtol=rtol).all())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2026)


@pytest.fixture
def close():
    """``close(actual, expected, atol, rtol)``: a fixture, so test files need no import path."""
    return _close
