"""The race harness (benchmarks/race_lbfgs.py): every method is scored by one function on the same problem."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def race():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("race_lbfgs", BENCH / "race_lbfgs.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_method_is_timed_to_one_target_on_one_objective(race, dtype):
    X, bias, counts, truth, start = race.gaussian_problem(8, 2, "near", 3, 2048, 20_000, dtype)
    assert X.dtype == dtype
    runs = race.run_methods(X, bias, counts, start, 2, 200)
    row = race.score(X, bias, counts, runs)
    finals = [row[name]["final"] for name in ("default", "plain", "qn")]
    assert row["best"] >= max(finals)  # the best recorded point of any method
    start_value = race.loglik_per_token(X.double(), bias, counts, torch.log(start["alpha"]), start["beta"])
    for name in ("default", "plain", "qn"):
        r = row[name]
        assert r["reached"] and 0 <= r["time"] <= r["total_time"], name
        assert r["final"] > start_value  # every method climbs from the shared start
    d = row["default"]
    assert d["em_maps"] > 0 and d["em_passes"] > 0 and 0 < d["em_time"] <= d["total_time"]
    assert race.matmul_seconds(X, 2, repeats=2) > 0
    assert math.isfinite(race.pass_vs_matmul({**row, "matmul_s": 1e-3}))
