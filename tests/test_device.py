import pytest
import torch

from effml_lib import device as D

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(D, "_mps_works", lambda: False)


@pytest.fixture
def one_fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(D, "_mps_works", lambda: False)


# ----------------------------------------------------------------------------- get_device

def test_auto_is_cpu_without_accelerator(no_accelerator):
    assert D.get_device() == torch.device("cpu")
    assert D.get_device("auto") == torch.device("cpu")


def test_auto_prefers_cuda(one_fake_gpu):
    assert D.get_device().type == "cuda"
    assert D.get_device("AUTO").type == "cuda"


def test_explicit_devices(one_fake_gpu):
    assert D.get_device("cpu") == torch.device("cpu")
    assert D.get_device(torch.device("cpu")) == torch.device("cpu")
    assert D.get_device("cuda") == torch.device("cuda")
    assert D.get_device("cuda:0") == torch.device("cuda", 0)


def test_unavailable_device_names_argument_and_options(no_accelerator):
    with pytest.raises(ValueError, match=r"prefer='cuda'.*not available.*available: \['cpu'\]"):
        D.get_device("cuda")
    with pytest.raises(ValueError, match="prefer='mps'"):
        D.get_device("mps")


def test_missing_gpu_index(one_fake_gpu):
    with pytest.raises(ValueError, match=r"cuda:1.*\['cpu', 'cuda:0'\]"):
        D.get_device("cuda:1")


def test_bad_device_arguments(no_accelerator):
    with pytest.raises(ValueError, match="not a device name"):
        D.get_device("gpu")
    with pytest.raises(TypeError, match="prefer"):
        D.get_device(0)


# ----------------------------------------------------------------------------- resolve_impl

@pytest.fixture
def triton_importable(monkeypatch):
    monkeypatch.setattr(D, "_triton_importable", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def triton_missing(monkeypatch):
    monkeypatch.setattr(D, "_triton_importable", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_torch_is_always_torch(triton_missing):
    for dev in ("cpu", torch.device("cpu"), torch.zeros(1)):
        assert D.resolve_impl("torch", dev) == "torch"


def test_auto_on_cuda_picks_triton_when_importable(one_fake_gpu, triton_importable):
    assert D.triton_available()
    assert D.resolve_impl("auto", "cuda") == "triton"
    assert D.resolve_impl("auto", torch.device("cuda", 0)) == "triton"


def test_auto_falls_back_to_torch(one_fake_gpu, triton_missing):
    assert not D.triton_available()
    assert D.resolve_impl("auto", "cuda") == "torch"


def test_auto_on_cpu_is_torch_even_with_interpreter(no_accelerator, triton_importable, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not D.triton_available()  # importable, but no CUDA device
    assert D.resolve_impl("auto", "cpu") == "torch"


def test_triton_without_triton_raises(one_fake_gpu, triton_missing):
    with pytest.raises(RuntimeError, match="Triton cannot be imported"):
        D.resolve_impl("triton", "cuda")


def test_triton_on_cpu_needs_interpreter(no_accelerator, triton_importable, monkeypatch):
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        D.resolve_impl("triton", torch.zeros(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert D.triton_interpreter_enabled()
    assert D.resolve_impl("triton", torch.zeros(2)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not D.triton_interpreter_enabled()


def test_triton_on_cuda(one_fake_gpu, triton_importable):
    assert D.resolve_impl("triton", "cuda:0") == "triton"


@pytest.mark.parametrize("impl", ["Triton", "cuda", "", None, 1])
def test_unknown_impl_names_impl_and_choices(impl, triton_missing):
    with pytest.raises(ValueError, match=r"impl=.*'auto', 'torch', 'triton'"):
        D.resolve_impl(impl, "cpu")


def test_bad_device_for_resolve_impl():
    with pytest.raises(TypeError, match="device"):
        D.resolve_impl("auto", 3)


# ----------------------------------------------------------------------------- names

def test_describe_cpu():
    name = D.describe("cpu")
    assert name.endswith(f"({D.cpu_count()} cores)")
    assert len(name) > len(" (1 cores)")
    assert D.describe(torch.device("cpu")) == name
    assert D.cpu_count() >= 1


def test_available_devices_lists_cpu():
    assert D.available_devices()[0] == "cpu"


@gpu
@needs_cuda
def test_gpu_describe_and_auto():
    assert D.get_device().type == "cuda"
    assert "NVIDIA" in D.describe("cuda") or "AMD" in D.describe("cuda")
    expected = "triton" if D._triton_importable() else "torch"
    assert D.resolve_impl("auto", torch.zeros(1, device="cuda")) == expected
