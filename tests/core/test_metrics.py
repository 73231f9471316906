from __future__ import annotations

import math
import statistics

import pytest

from scaleout.core.metrics import mean_metrics, spread


def test_spread_matches_statistics() -> None:
    rows = [{"acc": 0.5, "loss": 2.0}, {"acc": 0.7}, {"acc": 0.9, "loss": 1.0, "note": "x"}]
    s = spread(rows)
    assert list(s) == ["acc", "loss"]
    assert s["acc"].mean == pytest.approx(0.7) and s["acc"].n == 3
    assert s["acc"].std == pytest.approx(statistics.pstdev([0.5, 0.7, 0.9]))
    assert (s["acc"].min, s["acc"].max) == (0.5, 0.9)
    assert s["loss"].to_dict() == {"mean": 1.5, "std": 0.5, "min": 1.0, "max": 2.0, "n": 2}
    assert mean_metrics(rows) == {"acc": pytest.approx(0.7), "loss": 1.5}


def test_non_numbers_and_non_finite_values_are_skipped() -> None:
    rows = [{"a": True, "b": "1", "c": None, "d": math.nan, "e": math.inf, "f": 10**400, "g": [1]}, {"a": 1}]
    assert mean_metrics(rows) == {"a": 1.0}
    assert mean_metrics([]) == {}


def test_huge_values_do_not_overflow() -> None:
    s = spread([{"x": 1.7e308}, {"x": 1.7e308}, {"x": -1.7e308}])
    assert math.isfinite(s["x"].mean) and s["x"].mean == pytest.approx(1.7e308 / 3)
    assert s["x"].std > 0
