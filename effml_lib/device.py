"""Which device to run on, and which implementation (PyTorch or Triton) a technique uses.

Every technique with a kernel takes ``impl="auto" | "torch" | "triton"`` and calls
:func:`resolve_impl` once, so the rule lives in one place:

- ``"torch"``: the plain PyTorch reference, always available.
- ``"triton"``: the Triton kernel; needs Triton and either CUDA tensors or CPU tensors with
  ``TRITON_INTERPRET=1`` (Triton's interpreter, slow but exact, used by CI without a GPU).
- ``"auto"``: Triton on CUDA when Triton is importable, else the reference.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess

import torch

IMPLS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------- devices

def _mps_works() -> bool:
    # is_available() can be True on a Mac where allocating still fails (old macOS, VMs),
    # so we prove it with a one-element tensor.
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return False
    try:
        torch.ones(1, device="mps")
        return True
    except Exception:
        return False


def available_devices() -> list[str]:
    """Names of the devices this process can use, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_works():
        names.append("mps")
    return names


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """The device to run on.

    ``prefer`` None or ``"auto"``: CUDA if available, else a working MPS, else CPU.
    Otherwise ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``; asking for a
    device this machine does not have raises ``ValueError`` listing what it does have.
    """
    if prefer is None or (isinstance(prefer, str) and prefer.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_works():
            return torch.device("mps")
        return torch.device("cpu")

    if not isinstance(prefer, (str, torch.device)):
        raise TypeError(
            f"get_device(prefer=...) takes None, 'auto', a device string or a torch.device; "
            f"got {type(prefer).__name__}: {prefer!r}"
        )
    try:
        dev = torch.device(prefer.strip().lower() if isinstance(prefer, str) else prefer)
    except RuntimeError as e:
        raise ValueError(
            f"get_device(prefer={prefer!r}): not a device name ({e}); "
            f"use 'auto' or one of {available_devices()}"
        ) from None

    if dev.type == "cpu":
        ok = True
    elif dev.type == "cuda":
        ok = torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    elif dev.type == "mps":
        ok = _mps_works()
    else:
        ok = False  # xpu, meta, ...: not something the course runs on
    if not ok:
        raise ValueError(
            f"get_device(prefer={prefer!r}): that device is not available here; "
            f"available: {available_devices()} (or pass 'auto')"
        )
    return dev


def _as_device(device) -> torch.device:
    """Accept a torch.device, a device string, or a tensor (its device)."""
    if isinstance(device, torch.Tensor):
        return device.device
    if isinstance(device, (str, torch.device)):
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device={device!r} is not a device name ({e})") from None
    raise TypeError(f"device must be a torch.device, a device string or a tensor; got {type(device).__name__}")


# ----------------------------------------------------------------------------- triton

@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    # Cached: importing Triton takes a while, and a broken install (e.g. on Windows) can raise
    # something other than ImportError, which counts as "not available" too.
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly).

    Triton reads the variable when kernels are defined, so set it before importing them.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (so kernels can run at speed)."""
    return _triton_importable() and torch.cuda.is_available()


def resolve_impl(impl: str, device) -> str:
    """Turn a technique's ``impl`` argument into ``"torch"`` or ``"triton"`` for ``device``.

    ``device`` is a torch.device, a device string, or a tensor. ``"triton"`` when it cannot run
    raises ``RuntimeError`` saying why; an unknown ``impl`` raises ``ValueError``.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    dev = _as_device(device)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        # The interpreter is for proving kernels correct, not for speed: auto never picks it.
        return "triton" if dev.type == "cuda" and triton_available() else "torch"

    # impl == "triton": the caller insisted, so fail loudly rather than silently fall back.
    if not _triton_importable():
        raise RuntimeError(
            "impl='triton' but Triton cannot be imported here (it ships with CUDA builds of "
            "torch on Linux; otherwise `pip install 'effml-lib[triton]'`); use impl='torch' or 'auto'"
        )
    if dev.type == "cuda":
        return "triton"
    if dev.type == "cpu" and triton_interpreter_enabled():
        return "triton"
    if dev.type == "cpu":
        raise RuntimeError(
            "impl='triton' with tensors on cpu: Triton kernels run on CUDA tensors, or on CPU only "
            "under Triton's interpreter (set TRITON_INTERPRET=1 before importing the kernels); "
            "use impl='torch' or 'auto'"
        )
    raise RuntimeError(
        f"impl='triton' with tensors on {dev}: Triton kernels run on CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1); use impl='torch' or 'auto'"
    )


# ----------------------------------------------------------------------------- names

@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU model string, e.g. ``"AMD EPYC 7B13"``; ``platform.processor()`` is often empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_count() -> int:
    """Logical cores this process may use (respects CPU affinity, as in containers and Colab)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe(device=None) -> str:
    """A short human name: ``"NVIDIA H100 80GB HBM3"``, or ``"AMD EPYC 7B13 (2 cores)"`` on CPU."""
    dev = get_device() if device is None else _as_device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    if dev.type == "mps":
        return f"{cpu_name()} (MPS)"
    return f"{cpu_name()} ({cpu_count()} cores)"
