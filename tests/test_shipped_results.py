"""The benchmark results notebooks show are shipped inside the package (so a plain `pip install` has
them) as exact copies of what the benchmark scripts committed under bench/results/."""

import json
from pathlib import Path

import pytest

from effml_lib.measure import RESULTS_DIR, load_result

BENCH_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SHIPPED = sorted(RESULTS_DIR.glob("*/*.json"))


def test_some_results_are_shipped():
    assert SHIPPED, f"{RESULTS_DIR} holds no result files"


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_shipped_result_is_the_committed_one(path):
    committed = BENCH_RESULTS / path.parent.name / path.name
    assert committed.is_file(), f"{path} has no counterpart {committed}: ship only committed benchmark results"
    assert path.read_bytes() == committed.read_bytes(), (
        f"{path} differs from {committed}: copy the benchmark's newest result into the package")


def test_load_result_reads_a_shipped_file():
    path = SHIPPED[0]
    assert load_result(path.parent.name, path.stem) == json.loads(path.read_text())


def test_load_result_names_what_is_shipped_when_absent():
    with pytest.raises(FileNotFoundError, match="ships .*" + SHIPPED[0].stem):
        load_result("no-such-device", "nothing")
