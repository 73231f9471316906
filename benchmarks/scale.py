"""Idle fleet at scale: N connected simulated clients over M combiners, in one run.

Starts a real controller and M combiners (TLS on 127.0.0.1), measures each one's RSS with
no clients (the baseline, same run), then connects N simulated clients (`scaleout
simulate-clients` processes, each client its own TLS websocket and name) and measures:
time for all to connect, RSS of the controller and each combiner, KB of combiner RSS per
client over the baseline, and the CPU each process spends over one heartbeat interval
(websocket pings both ways) while the fleet is idle.

Prints one JSON object as its last line.

    .venv/bin/python benchmarks/scale.py [--clients 10000] [--combiners 4] [--interval 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.commands.dev import Child, start_child, stop_children
from scaleout.commands.simulate import hosts_for, seed_model
from scaleout.transport.net import PING_INTERVAL

TARGET_KB_PER_CLIENT = 100


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(a: argparse.Namespace, root: Path) -> dict[str, Any]:
    logs = root / "logs"
    logs.mkdir()
    children: list[Child] = []
    try:
        ctl_dir = root / "controller"
        controller, _ = await start_child("controller", ["serve", "--data-dir", str(ctl_dir), "--port", "0"], logs, True, "warning")
        children.append(controller)
        info = json.loads((ctl_dir / "controller.json").read_text())
        conn = Connection(info["url"], (ctl_dir / "admin.token").read_text().strip(), Path(info["ca"]), False)
        await call_async(conn, "model.set_seed", {}, seed_model(10_000))
        ctok = (await call_async(conn, "token.create", {"role": "combiner", "ttl_s": 86400}))[0]["token"]
        ktok = (await call_async(conn, "token.create", {"role": "client", "ttl_s": 86400}))[0]["token"]
        common = ["--controller", conn.url, "--ca", str(conn.ca)]
        combiners = []
        for i in range(1, a.combiners + 1):
            child, _ = await start_child(f"combiner-{i}", ["combine", *common, "--name", f"combiner-{i}", "--port", "0", "--max-connect-rate", "0"], logs, True, "warning", env={"SCALEOUT_TOKEN": ctok})
            children.append(child)
            combiners.append(child)
        baseline = {c.name: rss_mb(c.proc.pid) for c in [controller, *combiners]}
        started = time.monotonic()
        for i, (first, count) in enumerate(hosts_for(a.clients)):
            argv = ["simulate-clients", *common, "--first", str(first), "--count", str(count)]
            child, _ = await start_child(f"clients-{i + 1}", argv, logs, False, "warning", env={"SCALEOUT_TOKEN": ktok})
            children.append(child)
        await call_async(conn, "client.wait", {"count": a.clients, "timeout": a.connect_timeout})
        connect_s = time.monotonic() - started
        per_combiner = {c["name"]: c["clients"] for c in (await call_async(conn, "combiner.ls"))[0]["combiners"]}
        # Idle: one heartbeat interval of pings both ways, and nothing else.
        cpu_before = {c.name: cpu_s(c.proc.pid) for c in [controller, *combiners]}
        await asyncio.sleep(a.interval)  # the measured interval itself, not a synchronisation
        cpu = {c.name: round(cpu_s(c.proc.pid) - cpu_before[c.name], 3) for c in [controller, *combiners]}
        rss = {c.name: rss_mb(c.proc.pid) for c in [controller, *combiners]}
        kb = {c.name: round((rss[c.name] - baseline[c.name]) * 1024 / max(1, per_combiner.get(c.name, 0)), 1) for c in combiners}
        return {
            "benchmark": "scale", "clients": a.clients, "combiners": a.combiners, "client_processes": len(hosts_for(a.clients)),
            "connect_s": round(connect_s, 1), "clients_per_combiner": per_combiner,
            "baseline_rss_mb": {k: round(v, 1) for k, v in baseline.items()},
            "rss_mb": {k: round(v, 1) for k, v in rss.items()},
            "combiner_kb_per_client": kb, "median_kb_per_client": statistics.median(kb.values()),
            "target_kb_per_client": TARGET_KB_PER_CLIENT,
            "idle_interval_s": a.interval, "cpu_s_per_interval": cpu,
            "cpu_percent_of_one_core": {k: round(100 * v / a.interval, 2) for k, v in cpu.items()},
        }
    finally:
        await stop_children(children, timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--combiners", type=int, default=4)
    ap.add_argument("--interval", type=float, default=PING_INTERVAL, help="idle seconds measured (default: one heartbeat interval)")
    ap.add_argument("--connect-timeout", type=float, default=600.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="scaleout-scale-") as tmp:
        result = asyncio.run(run(a, Path(tmp)))
    print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
