"""Shared pieces of lab 05's hidden tests. Every assertion carries a message: with --assert=plain
(how grading/trusted.py runs these files) the message is all a student sees. The fixtures
student, gen, close, value_error, timing and form come from grading/trusted.py, shared by every lab."""

import pytest
import torch

from trusted import StudentGone, describe

QTENSOR_FIELDS = ("codes", "scale", "zero", "bits", "group_size", "shape", "dtype")




class Fields:
    """The fields of a student's QTensor, read once (the library's, rebuilt here, or an object of theirs)."""

    def __init__(self, qt, what):
        for name in QTENSOR_FIELDS:
            try:
                value = getattr(qt, name)
            except StudentGone:
                raise
            except Exception:  # noqa: BLE001 - a field it does not have
                raise AssertionError(f"{what}: quantize must return a QTensor, with the fields "
                                     f"{', '.join(QTENSOR_FIELDS)}; it has no {name}") from None
            setattr(self, name, value)


@pytest.fixture
def qtensor_fields():
    """``qtensor_fields(qt, what)``: the student's QTensor's fields as plain values."""
    return Fields


def _per_element(t, group):
    """A per-group tensor (..., n_groups) repeated over each group's elements: (..., n_groups * group)."""
    return t.repeat_interleave(group, dim=-1)


@pytest.fixture
def per_element():
    return _per_element


def _check_tensor(value, dtype, shape, what, name):
    assert type(value) is torch.Tensor and value.dtype == dtype and tuple(value.shape) == tuple(shape), (
        f"{what}: {name} must be {dtype} of shape {tuple(shape)}, got {describe(value)}")


@pytest.fixture
def check_tensor():
    """``check_tensor(value, dtype, shape, what, name)``: a plain tensor of that dtype and shape, or a failure saying so."""
    return _check_tensor


# --- part 4 and 5: the student's QuantLinear, read through its buffers ----------------------------------

def _buffers(layer, what):
    """The student's layer's codes, scale, zero and bias (read from the sandbox)."""
    out = {}
    for name in ("codes", "scale", "zero", "bias"):
        try:
            out[name] = getattr(layer, name)
        except StudentGone:
            raise
        except Exception:  # noqa: BLE001 - an attribute it does not have
            raise AssertionError(f"{what}: the layer has no {name} (keep the given constructor's buffers)") from None
    return out


def _library_copy(buffers, in_features, out_features, bits, group_size):
    """The library's QuantLinear holding these buffers (shapes already checked): what the library's kernels
    and checkpoints would read from the student's layer."""
    from effml_lib.quant import QuantLinear

    layer = QuantLinear(in_features, out_features, bits, group_size, bias=buffers["bias"] is not None, impl="torch")
    state = {k: v for k, v in buffers.items() if v is not None}
    layer.load_state_dict(state)
    return layer


@pytest.fixture
def layer_buffers():
    """``layer_buffers(layer, what)``: a dict codes, scale, zero, bias of the student's layer."""
    return _buffers


@pytest.fixture
def library_copy():
    """``library_copy(buffers, in_features, out_features, bits, group_size)``: the library's layer on those buffers."""
    return _library_copy
