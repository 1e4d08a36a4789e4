import datetime
import json
import time

import pytest
import torch

from effml_lib import measure as M

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MiB = 2**20


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- benchmark

def test_sleep_is_timed():
    t = M.benchmark(time.sleep, 0.01, warmup=1, reps=5, device="cpu")
    # sleep never returns early; a busy 2-core CI machine can overshoot, but not by 20 ms
    assert 0.0099 <= t.median_s < 0.03
    assert t.min_s <= t.q25_s <= t.median_s <= t.q75_s <= t.max_s
    assert t.reps == len(t.samples_s) == 5
    assert t.median_ms == pytest.approx(t.median_s * 1e3)
    assert t.median_us == pytest.approx(t.median_s * 1e6)
    assert t.iqr_s == pytest.approx(t.q75_s - t.q25_s)
    assert t.device == "cpu"


def test_warmup_calls_are_made_and_excluded():
    calls = []

    def slow_then_fast():
        calls.append(1)
        time.sleep(0.05 if len(calls) <= 3 else 0.001)  # the first 3 calls are "cold"

    t = M.benchmark(slow_then_fast, warmup=3, reps=7, device="cpu")
    assert len(calls) == 10
    assert t.reps == 7
    assert t.max_s < 0.04  # no cold call was timed


def test_args_and_kwargs_are_passed():
    seen = {}

    def f(a, b, *, c):
        seen.update(a=a, b=b, c=c)

    M.benchmark(f, 1, 2, c=3, warmup=0, reps=1, device="cpu")
    assert seen == {"a": 1, "b": 2, "c": 3}


def test_device_inferred_from_tensor_args():
    x = torch.randn(64, 64)
    t = M.benchmark(torch.matmul, x, x, warmup=1, reps=3)
    assert t.device == "cpu"
    assert M._find_device(([x],), {}) == torch.device("cpu")
    assert M._find_device((), {"w": torch.nn.Linear(2, 2)}) == torch.device("cpu")


def test_min_time_s_extends_reps():
    t = M.benchmark(time.sleep, 0.002, warmup=0, reps=2, min_time_s=0.05, device="cpu")
    assert t.reps > 2
    assert sum(t.samples_s) >= 0.05


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"warmup": -1}, ValueError),
        ({"reps": 0}, ValueError),
        ({"warmup": 1.5}, TypeError),
        ({"reps": "20"}, TypeError),
        ({"reps": True}, TypeError),
        ({"min_time_s": -1.0}, ValueError),
        ({"min_time_s": "1s"}, TypeError),
    ],
)
def test_bad_arguments_raise(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        M.benchmark(lambda: None, device="cpu", **kwargs)


def test_fn_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        M.benchmark(42)


def test_timing_str_and_dict():
    t = M.Timing(median_s=1.23e-3, q25_s=1.20e-3, q75_s=1.25e-3, min_s=1.1e-3, max_s=2e-3,
                 reps=50, samples_s=[1.23e-3] * 50, device="cpu")
    assert str(t) == "1.23 ms ± 0.05 (IQR), n=50"
    d = t.to_dict()
    assert "samples_s" not in d and d["median_ms"] == pytest.approx(1.23)
    assert d["q25_ms"] == pytest.approx(1.20) and d["q75_ms"] == pytest.approx(1.25)
    assert len(t.to_dict(samples=True)["samples_s"]) == 50
    fast = M.Timing(4.5e-6, 4e-6, 5e-6, 4e-6, 6e-6, 3, [4.5e-6] * 3, "cpu")
    assert str(fast) == "4.5 us ± 1 (IQR), n=3"
    assert str(M.Timing(0.99999, 0.9, 1.1, 0.9, 1.1, 3, [1.0] * 3, "cpu")).startswith("1 s ")


# ----------------------------------------------------------------------------- peak_memory

def _one_temporary():
    t = torch.empty(16 * MiB, dtype=torch.float32)  # 64 MiB
    t.fill_(1.0)
    del t


def _two_temporaries():
    a = torch.empty(16 * MiB, dtype=torch.float32)
    a.fill_(1.0)
    b = torch.empty(16 * MiB, dtype=torch.float32)
    b.fill_(2.0)
    return float(a[0] + b[0])


def _two_in_sequence():
    _one_temporary()
    _one_temporary()


def test_peak_memory_cpu_one_temporary():
    result, peak = M.peak_memory(_one_temporary, device="cpu")
    assert result is None
    assert peak == pytest.approx(64 * MiB, rel=0.03)


def test_peak_memory_cpu_two_at_once_is_double():
    pm = M.peak_memory(_two_temporaries, device="cpu")
    assert pm.result == 3.0
    assert pm.peak_bytes == pytest.approx(128 * MiB, rel=0.03)
    assert pm.peak_mib == pytest.approx(128, rel=0.03)


def test_peak_memory_cpu_is_a_peak_not_a_sum():
    _, peak = M.peak_memory(_two_in_sequence, device="cpu")
    assert peak == pytest.approx(64 * MiB, rel=0.03)


def test_peak_memory_counts_the_result_and_ignores_existing_tensors():
    x = torch.randn(1024, 1024)  # 4 MiB that exists before the call: not counted
    out, peak = M.peak_memory(lambda a: a * 2, x)  # device inferred from x: cpu
    assert out.shape == x.shape
    assert peak == pytest.approx(4 * MiB, rel=0.03)


def test_peak_memory_sees_temporaries_inside_an_expression():
    x = torch.randn(512, 1024)  # 2 MiB
    # (x + 1), (x * 2) and their product are alive together before the sum: 3 x 2 MiB.
    _, peak = M.peak_memory(lambda a: ((a + 1) * (a * 2)).sum(), x)
    assert peak == pytest.approx(6 * MiB, rel=0.03)


def test_peak_memory_validates():
    with pytest.raises(TypeError, match="callable"):
        M.peak_memory("not a function")
    with pytest.raises(NotImplementedError, match="cpu and cuda"):
        M.peak_memory(lambda: None, device="meta")


# ----------------------------------------------------------------------------- bandwidth, env

def test_copy_bandwidth_cpu():
    bw = M.copy_bandwidth("cpu", nbytes=8 * MiB, warmup=1, reps=5)
    assert isinstance(bw, float)
    assert 1e8 < bw < 1e13  # any machine copies faster than 100 MB/s; none at 10 TB/s from RAM
    with pytest.raises(ValueError, match="nbytes"):
        M.copy_bandwidth("cpu", nbytes=0)


REQUIRED_KEYS = {
    "python", "platform", "torch", "triton", "cuda", "numpy", "effml_lib", "device",
    "device_name", "device_memory_bytes", "cpu", "cpu_count", "timestamp_utc",
}


def test_env_info_is_json_with_required_keys():
    info = M.env_info("cpu")
    assert REQUIRED_KEYS <= set(info)
    assert json.loads(json.dumps(info)) == info
    assert info["device"] == "cpu" and info["torch"] == torch.__version__
    assert isinstance(info["cpu_count"], int) and info["cpu_count"] >= 1
    stamp = datetime.datetime.fromisoformat(info["timestamp_utc"])
    assert stamp.utcoffset() == datetime.timedelta(0)


def test_save_result_writes_env_and_results(tmp_path):
    timing = M.benchmark(lambda: None, warmup=0, reps=3, device="cpu")
    rows = [{"size": 1024, "timing": timing, "ratio": torch.tensor(1.5)}]
    path = M.save_result(tmp_path / "cpu" / "deep" / "r.json", rows, device="cpu")
    data = json.loads(path.read_text())
    assert set(data) == {"env", "results"}
    assert REQUIRED_KEYS <= set(data["env"])
    row = data["results"][0]
    assert row["size"] == 1024 and row["ratio"] == 1.5
    assert row["timing"]["median_s"] == timing.median_s and len(row["timing"]["samples_s"]) == 3


def test_save_result_refuses_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="object"):
        M.save_result(tmp_path / "r.json", {"x": object()})


# ----------------------------------------------------------------------------- GPU

@gpu
@needs_cuda
def test_gpu_benchmark_uses_cuda_events():
    x = torch.randn(2048, 2048, device="cuda")
    t = M.benchmark(torch.matmul, x, x, warmup=3, reps=10)
    assert t.device.startswith("cuda")
    assert 0 < t.median_s < 0.1
    # a 10 ms sleep with no GPU work is still ~10 ms measured by events
    s = M.benchmark(time.sleep, 0.01, warmup=1, reps=3, device="cuda")
    assert 0.009 <= s.median_s < 0.03


@gpu
@needs_cuda
def test_gpu_peak_memory():
    def f():
        a = torch.empty(16 * MiB, device="cuda")
        b = torch.empty(16 * MiB, device="cuda")
        del a, b

    keep = torch.empty(8 * MiB, device="cuda")  # allocated before: not counted
    _, peak = M.peak_memory(f, device="cuda")
    assert peak == pytest.approx(128 * MiB, rel=0.03)
    del keep


@gpu
@needs_cuda
def test_gpu_copy_bandwidth_and_env():
    bw = M.copy_bandwidth("cuda")
    assert bw > 3e11  # any datacentre GPU copies faster than 300 GB/s
    info = M.env_info("cuda")
    assert info["device_memory_bytes"] > 0 and info["cuda"]
    json.dumps(info)
