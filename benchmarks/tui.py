"""The TUI with a large fleet: `scaleout simulate` runs, `scaleout tui` watches it headless.

Starts `scaleout simulate --clients N --combiners M --rounds R --train-time T --validate`
with a data dir, attaches the app (App.run_test, a real terminal size) to its controller and
measures, while the rounds run: the time from attaching to a drawn client table of N rows,
events applied per second, the event loop's worst and 99th percentile lag (a 20 ms ticker
in the app: what a keypress would wait), and how long a sort and a filter of the client
table take. The baseline is the same ticker's lag with the app idle before the session.

Prints one JSON object as its last line.

    .venv/bin/python benchmarks/tui.py [--clients 1000] [--combiners 4] [--rounds 5] [--train-time 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


async def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from scaleout.commands.connection import Connection, read_controller_info
    from scaleout.tui.app import ScaleoutApp

    sim = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "simulate", "--clients", str(args.clients), "--combiners", str(args.combiners),
         "--rounds", str(args.rounds), "--train-time", str(args.train_time), "--validate", "--data-dir", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert sim.stdout is not None
    ctl = root / "controller"
    for line in sim.stdout:  # the ready lines of simulate, not a sleep
        if "clients connected" in line:
            break
    else:
        raise SystemExit(f"simulate ended early: exit {sim.wait()}")
    info = read_controller_info(ctl)
    conn = Connection(info["url"], (ctl / "admin.token").read_text().strip(), Path(info["ca"]), False)
    app = ScaleoutApp(conn)
    lags: list[float] = []
    out: dict[str, Any] = {"clients": args.clients, "combiners": args.combiners, "rounds": args.rounds}
    async with app.run_test(size=(200, 60)) as pilot:
        t0 = time.monotonic()
        table = app.query_one("#clients")
        while table.row_count < args.clients:
            await pilot.pause(0.01)
        out["attach_to_table_s"] = round(time.monotonic() - t0, 3)
        last = [time.monotonic()]

        def tick() -> None:
            now = time.monotonic()
            lags.append(max(0.0, now - last[0] - 0.02))
            last[0] = now

        app.set_interval(0.02, tick)
        before = app.events_applied
        t1 = time.monotonic()
        while sim.poll() is None and time.monotonic() - t1 < 600:
            await pilot.pause(0.1)
        while not (app.view.session and app.view.session.status != "running") and time.monotonic() - t1 < 620:
            await pilot.pause(0.1)
        span = time.monotonic() - t1
        out["events"] = app.events_applied - before
        out["events_per_s"] = round(out["events"] / span, 1)
        out["rounds_seen"] = sum(1 for r in app.view.rounds.values() if r.status == "succeeded")
        out["loop_lag_max_ms"] = round(max(lags) * 1000, 1)
        out["loop_lag_p99_ms"] = round(percentile(lags, 0.99) * 1000, 1)
        lags.clear()
        t2 = time.monotonic()
        await pilot.press("o")  # sort by status
        await pilot.pause()
        out["sort_ms"] = round((time.monotonic() - t2) * 1000, 1)
        filt = app.query_one("#client-filter")
        t3 = time.monotonic()
        filt.value = "sim-00099"
        while table.row_count > 1:
            await pilot.pause(0.005)
        out["filter_ms"] = round((time.monotonic() - t3) * 1000, 1)
        filt.value = ""
        while table.row_count < args.clients:
            await pilot.pause(0.005)
        out["unfilter_ms"] = round((time.monotonic() - t3) * 1000 - out["filter_ms"], 1)
        lags.clear()
        t4 = time.monotonic()
        while time.monotonic() - t4 < 2:
            await pilot.pause(0.05)
        out["idle_loop_lag_max_ms"] = round(max(lags or [0]) * 1000, 1)
        await pilot.press("q")
    sim.wait(60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--combiners", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-time", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="scaleout-tui-bench-") as tmp:
        print(json.dumps(asyncio.run(measure(args, Path(tmp)))))


if __name__ == "__main__":
    main()
