"""What a lab part may not use, taken out of the sandbox's PyTorch before any student code runs.

Parts that grade attention (lab 01, lab 04) ask for softmax(qkᵀ/√d)v written out, so PyTorch's
scaled-dot-product attention is made to fail: every one of its operators gets a kernel that raises,
registered in PyTorch's dispatcher for each dispatch key it has a kernel for, so the public function,
``torch.ops.aten.*``, autograd, inference mode and callers in C++ all reach it. (What is left is
attention written with ordinary ops, which is what the part asks for, whoever wrote it: that
includes ``nn.MultiheadAttention(need_weights=True)``'s Python path.)

The registration's handle is then dropped where Python cannot find it (its reference count raised by
hand and every Python reference deleted): a registration lives as long as its handle, and with no
handle to destroy, student code has nothing to undo it with.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

SDPA_OPS = (
    "scaled_dot_product_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
    "_native_multi_head_attention",
)
KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CPU", "CUDA", "Meta")
MESSAGE = ("F.scaled_dot_product_attention is unavailable while this lab is graded: write the "
           "softmax(qkᵀ/√d)v yourself")


def _refuse(*args, **kwargs):
    raise RuntimeError(MESSAGE)


def ban_sdpa() -> int:
    """Make every PyTorch attention operator raise; returns how many kernels were replaced."""
    import warnings

    library = torch.library.Library("aten", "IMPL")
    replaced = 0
    warnings.filterwarnings("ignore", message=".*previously registered kernel.*")
    warnings.filterwarnings("ignore", message=".*other operators may also be overridden.*")
    for name in SDPA_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            qualified = name if overload == "default" else f"{name}.{overload}"
            for key in KEYS:
                if op.has_kernel_for_dispatch_key(getattr(torch._C.DispatchKey, key)):
                    library.impl(qualified, _refuse, key)
                    replaced += 1
    # Keep the registrations alive forever, out of reach. They live as long as the Library's C++
    # handle; its finalizer (which would reset it) is detached, one reference to the handle is taken
    # by hand and never given back, and every Python reference to it is dropped.
    for finalizer, info in list(weakref.finalize._registry.items()):
        if getattr(info.func, "__name__", "") == "_del_library" and any(a is library.m for a in info.args):
            finalizer.detach()
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(library.m))
    library.m = None
    library._registration_handles.clear()
    del library
    return replaced
