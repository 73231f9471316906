"""Fold throughput of the streaming FedAvg reducer against numpy baselines, in one run.

For P float32 parameters and N clients, ours folds N updates into the running sums;
throughput is GB/s of update bytes read. Two figures: `ours` is `FedAvg.add` of a raw update
(the check pass, NaN/inf/range and the bound on the sums, then the fold pass), and `fold` is
`add` of an update already checked (`FedAvg.check`), which is what a combiner serialises:
it checks several arriving updates at once, in threads, and only folds one at a time. Baselines, on the same
arrays in the same run: numpy `x.sum()` (the read bandwidth of this machine) and a naive
`acc += w * x` (float64 accumulator). The updates are two arrays used in turn, so memory
holds only two updates whatever N is; peak memory is what the fold allocates on top
(tracemalloc), for N = 10 and 50, and must not grow with N.

Prints one JSON object as its last line: medians, ratios to each baseline, peak memory.

    .venv/bin/python benchmarks/aggregate.py [--params 10000000 100000000] [--clients 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from scaleout.core.aggregators import get_aggregator
from scaleout.core.payload import TensorSpec


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fold(updates: list[np.ndarray], n: int) -> None:
    """A whole round's reduction: a fresh reducer, N raw updates added, the mean read out."""
    agg = get_aggregator("fedavg", {"w": TensorSpec("float32", updates[0].shape)})
    for i in range(n):
        agg.add({"w": updates[i % len(updates)]}, float(i + 1), f"c{i}")
    agg.result()


def fold_raw(updates: list[np.ndarray], n: int) -> float:
    """Seconds spent in `add` of raw updates (check pass + fold pass)."""
    agg = get_aggregator("fedavg", {"w": TensorSpec("float32", updates[0].shape)})
    spent = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        agg.add({"w": updates[i % len(updates)]}, float(i + 1), f"c{i}")
        spent += time.perf_counter() - t0
    return spent


def fold_checked(updates: list[np.ndarray], n: int) -> float:
    """Seconds spent in `add` of pre-checked updates (the checks are not timed)."""
    agg = get_aggregator("fedavg", {"w": TensorSpec("float32", updates[0].shape)})
    checked = [agg.check({"w": u}) for u in updates]
    spent = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        agg.add(checked[i % len(checked)], float(i + 1), f"c{i}")
        spent += time.perf_counter() - t0
    return spent


def naive(updates: list[np.ndarray], n: int) -> None:
    acc = np.zeros(updates[0].shape, dtype=np.float64)
    for i in range(n):
        acc += (i + 1) * updates[i % len(updates)]


def read_all(updates: list[np.ndarray], n: int) -> None:
    for i in range(n):
        updates[i % len(updates)].sum()


def peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, nargs="+", default=[10_000_000, 100_000_000])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--memory-clients", type=int, nargs=2, default=[10, 50], metavar=("N1", "N2"))
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for p in a.params:
        rng = np.random.default_rng(0)
        updates = [rng.standard_normal(p, dtype=np.float32) for _ in range(2)]
        gb = a.clients * updates[0].nbytes / 1e9
        t_ours = statistics.median(fold_raw(updates, a.clients) for _ in range(a.repeat))
        t_fold = statistics.median(fold_checked(updates, a.clients) for _ in range(a.repeat))
        t_sum = median_time(lambda: read_all(updates, a.clients), a.repeat)
        t_naive = median_time(lambda: naive(updates, a.clients), a.repeat)
        n1, n2 = a.memory_clients
        m1 = peak_bytes(lambda: fold(updates, n1))
        m2 = peak_bytes(lambda: fold(updates, n2))
        rows.append({
            "params": p, "clients": a.clients, "update_mb": round(updates[0].nbytes / 1e6, 1),
            "ours_gb_s": round(gb / t_ours, 2), "numpy_sum_gb_s": round(gb / t_sum, 2), "naive_gb_s": round(gb / t_naive, 2),
            "fold_gb_s": round(gb / t_fold, 2),
            "ratio_to_sum": round(t_sum / t_ours, 3), "fold_ratio_to_sum": round(t_sum / t_fold, 3),
            "ratio_to_naive": round(t_naive / t_ours, 3),
            f"peak_mib_n{n1}": round(m1 / 2**20, 1), f"peak_mib_n{n2}": round(m2 / 2**20, 1),
            "memory_growth": round(m2 / m1, 3),
        })
        updates.clear()  # free both before the next size
    print(json.dumps({
        "benchmark": "aggregate", "baseline": "numpy x.sum() read bandwidth and naive acc += w * x, same run",
        "target_ratio_to_sum": 0.7, "worst_ratio_to_sum": min(r["ratio_to_sum"] for r in rows),
        "worst_fold_ratio_to_sum": min(r["fold_ratio_to_sum"] for r in rows), "results": rows,
    }))


if __name__ == "__main__":
    main()
