"""Fold throughput of the streaming FedAvg reducer against numpy baselines, in one run.

For P float32 parameters and N clients, each figure reduces N updates into the running sums;
throughput is GB/s of update bytes (N x 4P), and each is given as a ratio to numpy `x.sum()`
over the same N updates in the same run (the read bandwidth of this machine: 1 stream).

- `ours` (`ratio_to_sum`): a round's reduction exactly as the combiner does it (issue 17 #2),
  its N updates arriving together. Each update lands as the combiner's link lands it: its
  1 MiB chunks go through the link's own receive worker (`transport.link._absorb`: written
  to an unnamed temporary file, hashed, and checked by a `LandingCheck` a 256 KiB piece at a
  time while in cache); only the `LandingCheck.feed` calls are timed (the write and the hash
  are the transfer's, done with or without a check). Then, timed: the file mapped read-only,
  `FedAvg.check` with the landed verdict (the header only: no value is read again), and the
  checked updates folded by `FedAvg.add_many` in batches of ``ours_batch``, one pass over the
  sums per batch, letting each mapped stretch go as the combiner's `_reader` does.
  ``ours_batch``: what the combiner's budgets let wait for one fold: a checked update in its
  file gives its upload budget back and waits within `fold_wait` (one folding + FOLD_BATCH
  waiting, at most FOLD_WAIT_MAX bytes), so FOLD_BATCH (8) unless updates are large.
  Not in `ours`: the change-norm bound (``max_update_norm``, on by default), one more read of
  each update and of the model (`norm`, below, and ``ours_with_norm``).
- `norm`: `check_change` of each mapped update against a model of the same size.
- `before`: the combiner's path before checks on landing, on the same landed files: each
  mapped update checked whole by `FedAvg.check` (read again, from the page cache), folds of
  as many as the upload budget then let wait (1 for updates over 8 MiB).
- `batched`: each update checked whole by `FedAvg.check` (one more read of it from memory, as
  the combiner did before checks on landing), then folds of ``--batch`` (8).
- `fold_many`: those batched folds alone (the updates checked beforehand, untimed).
- `landed`: each update checked 1 MiB at a time by `check_values` right after that chunk was
  copied into a buffer (untimed), then the folds of ``--batch`` (an earlier stand-in for `ours`).
- `add_raw`: `FedAvg.add` of each raw update, one at a time (check pass + fold pass: the
  combiner before batched folds); `fold`: `add` of an update already checked, one at a time.
- `naive`: `acc += w * x` with a float64 accumulator.

The figures are interleaved, one of each per repeat, so a change in the machine's load (other
processes on its cores) falls on each alike; medians of the repeats, with the load average.
The updates are ``--batch`` distinct arrays used in turn (a batch never reads one array twice,
which would find it in cache), so memory holds that many updates whatever N is; peak memory is what a round's reduction (`batched`, the mean read out) allocates on top
(tracemalloc), for N = 10 and 50, and must not grow with N.

Prints one JSON object as its last line: medians, ratios to each baseline, peak memory.

    .venv/bin/python benchmarks/aggregate.py [--params 10000000 100000000] [--clients 10] [--repeat 3] [--batch 8]

``--robust`` measures instead the strategies that need each update on their own (issue 15)
on the controller's own path: N updates of P float32 parameters written as spill files
(roles/spill.py), then for each aggregator, in a fresh process, the controller's step
(`_aggregate_step`: memory-mapped updates, `Strategy.aggregate`, the new model encoded).
Per aggregator: seconds, and memory: ``heap_peak_mib`` (what Python and numpy allocate
during the step, tracemalloc), ``rss_peak_mib`` (the process's peak RSS, VmHWM, including
the pages of the memory-mapped spill files it touched), ``rss_growth_mib`` (that peak less
the RSS before the step), ``rss_anon_mib`` (its private memory after the step, RssAnon).
Both checked against 2 x the model + the fold budget (16 MiB). Baseline, same run: the two-stage FedAvg fold of the
same N updates (FedAvg.add of each memory-mapped update, then the mean).

    .venv/bin/python benchmarks/aggregate.py --robust [--params 1000000] [--clients 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from scaleout.core.aggregators import get_aggregator
from scaleout.core.payload import TensorSpec, check_values
from scaleout.roles.combiner import FOLD_WAIT_MAX, UPDATE_SLACK
from scaleout.roles.folding import FOLD_BATCH


CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter  # --clock cpu: this thread's CPU seconds (a loaded box's waits for a core left out; set OPENBLAS_NUM_THREADS=1)


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def fold(updates: list[np.ndarray], n: int, batch: int = FOLD_BATCH) -> None:
    """A whole round's reduction: a fresh reducer, N updates checked and folded ``batch`` at a time, the mean read out."""
    agg = get_aggregator("fedavg", {"w": TensorSpec("float32", updates[0].shape)})
    for first in range(0, n, batch):
        agg.add_many([(agg.check({"w": updates[i % len(updates)]}), float(i + 1), f"c{i}") for i in range(first, min(n, first + batch))])
    agg.result()


def fold_raw(updates: list[np.ndarray], n: int) -> float:
    """Seconds spent in `add` of raw updates (check pass + fold pass)."""
    agg = get_aggregator("fedavg", {"w": TensorSpec("float32", updates[0].shape)})
    spent = 0.0
    for i in range(n):
        t0 = clock()
        agg.add({"w": updates[i % len(updates)]}, float(i + 1), f"c{i}")
        spent += clock() - t0
    return spent


def fold_checked(updates: list[np.ndarray], n: int) -> float:
    """Seconds spent in `add` of pre-checked updates (the checks are not timed)."""
    agg = get_aggregator("fedavg", {"w": TensorSpec("float32", updates[0].shape)})
    checked = [agg.check({"w": u}) for u in updates]
    spent = 0.0
    for i in range(n):
        t0 = clock()
        agg.add(checked[i % len(checked)], float(i + 1), f"c{i}")
        spent += clock() - t0
    return spent


def fold_batched(updates: list[np.ndarray], n: int, batch: int, landed: bool = False, checked_before: bool = False) -> float:
    """Seconds a round's reduction takes as the combiner does it: each update checked, then
    batches of ``batch`` checked updates folded by `add_many`. ``landed``: each update checked
    a chunk at a time right after the chunk's (untimed) copy; ``checked_before``: the checks
    untimed (the folds alone)."""
    from scaleout.core.aggregators.fedavg import Checked

    agg = get_aggregator("fedavg", {"w": TensorSpec("float32", updates[0].shape)})
    spent = 0.0
    waiting: list[tuple[Checked, float, str]] = []
    step = LANDING_CHUNK // 4
    inbox = np.empty(min(step, updates[0].size), np.float32)
    checks = [agg.check({"w": u}) for u in updates] if checked_before else []
    for i in range(n):
        src = updates[i % len(updates)]
        if checked_before:
            checked = checks[i % len(checks)]
        elif landed:
            peak = 0.0
            for start in range(0, src.size, step):
                chunk = inbox[: min(step, src.size - start)]
                np.copyto(chunk, src[start : start + step])
                t0 = clock()
                peak = max(peak, check_values({"w": TensorSpec("float32", chunk.shape)}, {"w": chunk})["w"])
                spent += clock() - t0
            checked = Checked({"w": src}, {"w": peak})
        else:
            t0 = clock()
            checked = agg.check({"w": src})
            spent += clock() - t0
        waiting.append((checked, float(i + 1), f"c{i}"))
        spent += fold_when_full(agg, waiting, batch, last=i == n - 1)
    return spent


def fold_when_full(agg: object, waiting: list, batch: int, last: bool) -> float:
    """Seconds folding what waits, in one `add_many`, once ``batch`` wait (or at the last
    update); ``waiting`` is emptied then."""
    if len(waiting) < batch and not last:
        return 0.0
    t0 = clock()
    assert agg.add_many(waiting) == [None] * len(waiting)  # type: ignore[attr-defined]
    spent = clock() - t0
    waiting.clear()
    return spent


LANDING_CHUNK = 1 << 20  # bytes a chunk brings, as a link hands them on


class _Timed:
    """A `LandingCheck` whose feed calls are timed (what the check adds to the receive worker)."""

    def __init__(self, inner: object) -> None:
        self.inner, self.size, self.spent = inner, inner.size, 0.0  # type: ignore[attr-defined]

    def feed(self, offset: int, piece: memoryview) -> None:
        t0 = clock()
        self.inner.feed(offset, piece)  # type: ignore[attr-defined]
        self.spent += clock() - t0


def fold_ours(updates: list[np.ndarray], n: int, batch: int, norm: bool = False, whole: bool = False) -> float:
    """Seconds of a round's reduction on the combiner's own path (see `ours` above); with
    ``norm``, only the change-norm checks of the same landed updates (`check_change`); with
    ``whole``, the path before checks on landing (`before`: no LandingCheck, each mapped
    update checked whole by `FedAvg.check`)."""
    import hashlib
    import mmap
    import tempfile

    from scaleout.core import payload
    from scaleout.core.aggregators.bounds import check_change, norm_limit
    from scaleout.core.aggregators.landing import LandingCheck
    from scaleout.roles.combiner import _reader
    from scaleout.transport.link import _absorb

    template = {"w": TensorSpec("float32", updates[0].shape)}
    agg = get_aggregator("fedavg", template)
    model = {"w": np.zeros(updates[0].shape, np.float32)}
    limit = norm_limit(model, 1e9)
    spent = 0.0
    waiting: list[tuple[object, float, str]] = []
    for i in range(n):
        data = payload.encode_named({"w": updates[i % len(updates)]}, "dict")  # what the client sends
        with tempfile.TemporaryFile(prefix="scaleout-bench-") as fh:
            landing = _Timed(LandingCheck(template, len(data)))
            if whole:
                landing.inner.feed = lambda offset, piece: None  # type: ignore[method-assign]  # no check on landing
            digest, view = hashlib.sha256(), memoryview(data)
            for at in range(0, len(data), LANDING_CHUNK):  # as chunks arrive: written, hashed, checked
                _absorb(fh.fileno(), digest, at, [view[at : at + LANDING_CHUNK]], landing)
            del view, data
            spent += 0.0 if norm else landing.spent
            t0 = clock()
            blob = mmap.mmap(fh.fileno(), landing.size, access=mmap.ACCESS_READ)
        read = _reader(blob)
        if norm:
            checked = agg.check(payload.views(blob), read, landing.inner.verdict())
            t0 = clock()
            check_change(model, checked.arrays, limit, read)
            spent += clock() - t0
            continue
        verdict = None if whole else landing.inner.verdict()
        assert verdict is not None or whole
        waiting.append((agg.check(payload.views(blob), read, verdict), float(i + 1), f"c{i}"))
        spent += clock() - t0
        spent += fold_when_full(agg, waiting, batch, last=i == n - 1)
    return spent


FIGURES = ("ours_with_norm", "norm", "before", "batched", "fold_many", "landed", "add_raw", "fold")
OURS_MEASURES = (
    "the combiner's path: each update's chunks checked as they land in the link's receive worker (LandingCheck.feed timed; "
    "the file write and hash are the transfer's, untimed), the file mapped and checked by header, folds of ours_batch by add_many; "
    "not the change-norm bound (max_update_norm): see ours_with_norm"
)


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


def robust_kwargs(name: str, n: int) -> dict[str, float]:
    """Each aggregator's settings for ``n`` clients: f = 10% of them (as many as Bulyan allows)."""
    f = max(0, n // 10)
    return {
        "fedavg-fold": {}, "fedmedian": {}, "trimmedmean": {"beta": 0.1}, "krum": {"f": f}, "multikrum": {"f": f, "m": n // 2},
        "bulyan": {"f": min(f, (n - 3) // 4)}, "dpfedavg": {"clip_norm": 1.0, "noise_multiplier": 1.0},
    }[name]


ROBUST = ("fedavg-fold", "fedmedian", "trimmedmean", "krum", "multikrum", "bulyan", "dpfedavg")


def _status(key: str) -> float:
    """A /proc/self/status figure in MiB (VmHWM, RssAnon...)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def robust_one(name: str, folder: str, params: int, clients: int) -> dict[str, object]:
    """One aggregator's controller step over the spill files in ``folder`` (run in its own process)."""
    import gc
    from pathlib import Path

    from scaleout.core import payload
    from scaleout.core.aggregators import make_strategy
    from scaleout.roles.sessions import _aggregate_step
    from scaleout.roles.spill import Spill, Spilled

    model = {"w": np.zeros(params, dtype=np.float32)}
    global_bytes = payload.encode_named(model, "dict")
    del model
    template = payload.describe(global_bytes)
    spill = Spill(Path(folder), template)
    for i in range(clients):
        spill.entries[f"c{i}"] = Spilled("c", f"c{i}", Path(folder) / f"{i:06d}.safetensors", 10 + i, {})
    spill.remove = lambda: None  # type: ignore[method-assign]  # the files serve every aggregator
    gc.collect()
    base_rss = _status("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    if name == "fedavg-fold":
        agg = get_aggregator("fedavg", template)
        with spill.updates() as updates:
            for u in updates:
                agg.add(u.tensors, float(u.num_examples), u.client)
        new = payload.encode_named(agg.result(), "dict")
    else:
        state = {}
        new, _, _, _ = _aggregate_step(make_strategy(name, robust_kwargs(name, clients)), spill, set(spill.entries), global_bytes, "dict", state)
    seconds = time.perf_counter() - t0
    file_mib = _status("RssFile")
    heap = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(new) > params * 4
    return {
        "aggregator": name, "seconds": round(seconds, 3), "heap_peak_mib": round(heap / 2**20, 1),
        "rss_base_mib": round(base_rss, 1), "rss_peak_mib": round(_status("VmHWM"), 1), "rss_anon_mib": round(_status("RssAnon"), 1), "rss_file_mib_after": round(file_mib, 1),
    }


def robust_main(params: int, clients: int) -> None:
    import subprocess
    import sys
    import tempfile

    from scaleout.core import payload

    model_mib = params * 4 / 2**20
    budget_mib = 16.0  # the combiner's upload budget, UPLOAD_BUDGET_MIN: one update in flight on the controller at most
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaleout-bench-spill-") as folder:
        rng = np.random.default_rng(0)
        for i in range(clients):  # written one at a time, as the controller spills them
            data = payload.encode_named({"w": rng.standard_normal(params, dtype=np.float32) * 0.1}, "dict")
            with open(f"{folder}/{i:06d}.safetensors", "wb") as fh:
                fh.write(data)
        for name in ROBUST:
            code = f"import json, sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); import aggregate; print(json.dumps(aggregate.robust_one({name!r}, {folder!r}, {params}, {clients})))"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
            out = done.stdout
            rows.append({**json.loads(out.strip().splitlines()[-1]), "kwargs": robust_kwargs(name, clients)})
    fold = next(r for r in rows if r["aggregator"] == "fedavg-fold")
    for r in rows:
        r["ratio_to_fold"] = round(r["seconds"] / fold["seconds"], 2)  # type: ignore[operator]
        r["heap_within_bound"] = r["heap_peak_mib"] <= 2 * model_mib + budget_mib  # type: ignore[operator]
        r["rss_growth_mib"] = round(r["rss_peak_mib"] - r["rss_base_mib"], 1)  # type: ignore[operator]
        r["rss_within_bound"] = r["rss_growth_mib"] <= 2 * model_mib + budget_mib
    print(json.dumps({
        "benchmark": "aggregate-robust", "params": params, "clients": clients, "model_mib": round(model_mib, 1),
        "bound_mib": round(2 * model_mib + budget_mib, 1), "baseline": "two-stage FedAvg fold of the same memory-mapped updates, same run",
        "load_average": round(os.getloadavg()[0], 1), "results": rows,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--robust", action="store_true", help="the needs_updates aggregators over spilled, memory-mapped updates")
    ap.add_argument("--params", type=int, nargs="+", default=[10_000_000, 100_000_000])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--memory-clients", type=int, nargs=2, default=[10, 50], metavar=("N1", "N2"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=FOLD_BATCH, help="checked updates folded in one pass (the combiner's FOLD_BATCH)")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall", help="wall seconds, or this thread's CPU seconds (for a loaded box)")
    a = ap.parse_args()
    global clock
    clock = CLOCK[a.clock]
    if a.robust:
        robust_main(a.params[0] if a.params != [10_000_000, 100_000_000] else 1_000_000, a.clients if a.clients != 10 else 100)
        return
    rows = []
    for p in a.params:
        rng = np.random.default_rng(0)
        updates = [rng.standard_normal(p, dtype=np.float32) for _ in range(max(2, a.batch))]
        gb = a.clients * updates[0].nbytes / 1e9
        # Interleaved, one of each per repeat, so a change in the machine's load (other
        # processes on its 2 cores) falls on every figure alike, baselines included.
        runs: dict[str, list[float]] = {k: [] for k in ("sum", "ours", "norm", "before", "batched", "fold_many", "landed", "add_raw", "fold", "naive")}
        # As the combiner's _pull: a checked update in its file waits for the fold within fold_wait
        # (one folding + FOLD_BATCH waiting, at most FOLD_WAIT_MAX, never less than one update).
        size = updates[0].nbytes + 1024 + UPDATE_SLACK  # + its header; the combiner's budget unit is the model + UPDATE_SLACK
        fold_wait = max(min((FOLD_BATCH + 1) * size, FOLD_WAIT_MAX), size)
        ours_batch = max(1, min(FOLD_BATCH, fold_wait // size - 1))
        # Before: an update held its upload budget (max(16 MiB, one model)) until folded, so this many could wait.
        before_batch = max(1, min(FOLD_BATCH, max(16 << 20, updates[0].nbytes + 1024 + UPDATE_SLACK) // (updates[0].nbytes + 1024)))
        for _ in range(a.repeat):
            runs["sum"].append(median_time(lambda: read_all(updates, a.clients), 1))
            runs["ours"].append(fold_ours(updates, a.clients, ours_batch))
            runs["norm"].append(fold_ours(updates, a.clients, ours_batch, norm=True))
            runs["before"].append(fold_ours(updates, a.clients, before_batch, whole=True))
            runs["batched"].append(fold_batched(updates, a.clients, a.batch))
            runs["fold_many"].append(fold_batched(updates, a.clients, a.batch, checked_before=True))
            runs["landed"].append(fold_batched(updates, a.clients, a.batch, landed=True))
            runs["add_raw"].append(fold_raw(updates, a.clients))
            runs["fold"].append(fold_checked(updates, a.clients))
            runs["naive"].append(median_time(lambda: naive(updates, a.clients), 1))
        t = {k: statistics.median(v) for k, v in runs.items()}
        t_ours, t_sum, t_naive = t["ours"], t["sum"], t["naive"]
        t["ours_with_norm"] = t_ours + t["norm"]
        n1, n2 = a.memory_clients
        m1 = peak_bytes(lambda: fold(updates, n1, a.batch))
        m2 = peak_bytes(lambda: fold(updates, n2, a.batch))
        rows.append({
            "params": p, "clients": a.clients, "ours_batch": ours_batch, "batch": a.batch, "update_mb": round(updates[0].nbytes / 1e6, 1),
            "ours_gb_s": round(gb / t_ours, 2), "numpy_sum_gb_s": round(gb / t_sum, 2), "naive_gb_s": round(gb / t_naive, 2),
            "ratio_to_sum": round(t_sum / t_ours, 3), "ratio_to_naive": round(t_naive / t_ours, 3),
            **{f"{k}_gb_s": round(gb / t[k], 2) for k in FIGURES},
            **{f"{k}_ratio_to_sum": round(t_sum / t[k], 3) for k in FIGURES},
            f"peak_mib_n{n1}": round(m1 / 2**20, 1), f"peak_mib_n{n2}": round(m2 / 2**20, 1),
            "memory_growth": round(m2 / m1, 3),
        })
        r = rows[-1]
        print(f"params {p:,}, {a.clients} updates of {r['update_mb']} MB; numpy x.sum() {r['numpy_sum_gb_s']} GB/s (the baseline, same run)")
        print(f"  ours: {r['ours_gb_s']} GB/s, {r['ratio_to_sum']}x x.sum() (batches of {ours_batch}): {OURS_MEASURES}")
        for k in FIGURES:
            print(f"  {k}: {r[f'{k}_gb_s']} GB/s, {r[f'{k}_ratio_to_sum']}x x.sum()")
        updates.clear()  # free them before the next size
    print(json.dumps({
        "benchmark": "aggregate", "baseline": "numpy x.sum() read bandwidth and naive acc += w * x, same run",
        "target_ratio_to_sum": 0.7, "worst_ratio_to_sum": min(r["ratio_to_sum"] for r in rows),
        **{f"worst_{k}_ratio_to_sum": min(r[f"{k}_ratio_to_sum"] for r in rows) for k in FIGURES},
        "ours_measures": OURS_MEASURES,
        "clock": a.clock, "load_average": round(os.getloadavg()[0], 1), "results": rows,
    }))

if __name__ == "__main__":
    main()
