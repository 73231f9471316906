"""Streaming FedAvg against a plain numpy baseline, measured in the same run.

The baseline holds every client's update and calls np.average over the stack; ours folds
updates one at a time. Prints JSON: median seconds, peak traced memory and their ratios,
for several client counts. Memory of ours should stay flat as clients grow.

    .venv/bin/python benchmarks/aggregation.py [--params 2000000] [--clients 4 16 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc

import numpy as np

from scaleout.core.aggregators import get_aggregator
from scaleout.core.payload import TensorSpec


def updates(n_clients: int, n_params: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n_clients):
        yield f"c{i}", {"w": rng.standard_normal(n_params, dtype=np.float32), "b": rng.standard_normal(16).astype(np.float32)}, float(i + 1)


def ours(n_clients: int, n_params: int) -> dict[str, np.ndarray]:
    agg = get_aggregator("fedavg", {"w": TensorSpec("float32", (n_params,)), "b": TensorSpec("float32", (16,))})
    for name, update, weight in updates(n_clients, n_params):
        agg.add(update, weight, name)
    return agg.result()


def baseline(n_clients: int, n_params: int) -> dict[str, np.ndarray]:
    held = list(updates(n_clients, n_params))
    weights = [w for _, _, w in held]
    return {k: np.average(np.stack([u[k] for _, u, _ in held]), axis=0, weights=weights).astype(np.float32) for k in ("w", "b")}


def measure(fn, *args, repeat: int) -> tuple[float, int, dict[str, np.ndarray]]:
    times, peaks, out = [], [], {}
    for _ in range(repeat):
        tracemalloc.start()
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return statistics.median(times), max(peaks), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=2_000_000)
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for n in a.clients:
        t_ours, m_ours, r_ours = measure(ours, n, a.params, repeat=a.repeat)
        t_base, m_base, r_base = measure(baseline, n, a.params, repeat=a.repeat)
        np.testing.assert_allclose(r_ours["w"], r_base["w"], rtol=1e-5, atol=1e-6)
        rows.append({
            "clients": n, "params": a.params,
            "ours_s": round(t_ours, 4), "baseline_s": round(t_base, 4), "time_ratio": round(t_ours / t_base, 3),
            "ours_peak_mib": round(m_ours / 2**20, 1), "baseline_peak_mib": round(m_base / 2**20, 1),
            "memory_ratio": round(m_ours / m_base, 3),
        })
    print(json.dumps({"benchmark": "fedavg_streaming_vs_numpy_stack", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
