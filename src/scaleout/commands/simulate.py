"""`scaleout simulate`: a real controller and combiners, and thousands of lightweight clients.

The controller and each combiner are real `scaleout` processes over TLS on 127.0.0.1; the
N clients are asyncio tasks spread over a few `scaleout simulate-clients` processes, each
client with its own websocket and name, returning a synthetic update after --train-time
seconds. The report has the `scaleout dev` schema plus, per round, where the time went
(distribute / train / collect / reduce / commit) and each role's peak RSS as it ended;
``connect``: how long all clients took to connect, how they spread over the combiners and
each role's RSS with the fleet connected and idle and the CPU seconds each used so far
(``cpu_s``; per round, ``cpu_s`` is what each used since the round before); ``peak_rss_mb``: each role's peak over
the run (controller, each combiner, each client process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from scaleout.commands.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError
from scaleout.commands.admin import _round_line, call_async
from scaleout.commands.connection import Connection
from scaleout.commands.dev import Child, DevError, Interrupts, report_of, start_child, stop_children, wait_for_clients

CLIENTS_PER_HOST = 500  # simulated clients per process
MAX_HOSTS = 8
START_TIMEOUT_S = 60.0


def hosts_for(clients: int) -> list[tuple[int, int]]:
    """(first index, count) of each client process: about CLIENTS_PER_HOST each."""
    n = max(1, min(MAX_HOSTS, math.ceil(clients / CLIENTS_PER_HOST)))
    base, extra = divmod(clients, n)
    out, start = [], 1
    for i in range(n):
        count = base + (1 if i < extra else 0)
        out.append((start, count))
        start += count
    return out


def seed_model(params: int) -> bytes:
    """A float32 model of ``params`` parameters in two tensors (a weight and a bias)."""
    from scaleout.core import payload

    bias = min(params - 1, 16) if params > 1 else 0
    rng = np.random.default_rng(0)
    arrays = {"weight": rng.standard_normal(params - bias).astype(np.float32)}
    if bias:
        arrays["bias"] = np.zeros(bias, np.float32)
    return payload.encode(arrays)


def peak_rss_mb(pid: int | None, field: str = "VmHWM") -> float | None:
    """The peak resident set size of a live process (VmHWM; VmRSS for the current one), in MB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) a live process has used so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_role(controller: Child, combiners: list[Child], hosts: list[Child], since: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU seconds of the controller, each combiner and each client process (``since``: minus those)."""

    def used(child: Child, before: float | None) -> float | None:
        now = cpu_s(child.proc.pid)
        return None if now is None else round(now - (before or 0.0), 2)

    was = since or {"controller": None, "combiners": {}, "client_processes": {}}
    return {
        "controller": used(controller, was["controller"]),
        "combiners": {c.name: used(c, was["combiners"].get(c.name)) for c in combiners},
        "client_processes": {c.name: used(c, was["client_processes"].get(c.name)) for c in hosts},
    }


def rss_by_role(controller: Child, combiners: list[Child], hosts: list[Child], field: str = "VmHWM") -> dict[str, Any]:
    """``field`` (peak or current RSS, MB) of the controller, each combiner and each client process."""
    return {
        "controller": peak_rss_mb(controller.proc.pid, field),
        "combiners": {c.name: peak_rss_mb(c.proc.pid, field) for c in combiners},
        "client_processes": {c.name: peak_rss_mb(c.proc.pid, field) for c in hosts},
    }


def main(args: argparse.Namespace) -> int:
    for flag in ("clients", "combiners", "rounds", "model_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.train_time < 0:
        raise UsageError("--train-time must be >= 0")
    with contextlib.ExitStack() as stack:
        if args.data_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scaleout-sim-")))
        else:
            root = args.data_dir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        try:
            report = asyncio.run(_simulate(args, root))
        except asyncio.CancelledError:
            return EXIT_INTERRUPTED
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.report}")
    ok = report["session"]["status"] == "finished" and all(r["status"] == "succeeded" for r in report["rounds"])
    return EXIT_OK if ok else EXIT_FAILED


async def _simulate(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    level = args.log_level or "warning"
    say = lambda text: print(text, flush=True)  # noqa: E731
    children: list[Child] = []
    main_task = asyncio.current_task()
    assert main_task is not None
    interrupts = Interrupts(main_task, children)
    combiners: list[Child] = []
    hosts: list[Child] = []
    try:
        ctl_dir = root / "controller"
        controller, _ = await start_child("controller", ["serve", "--data-dir", str(ctl_dir), "--host", "127.0.0.1", "--port", "0", "--max-enrol-rate", "0"], logs, True, level)
        children.append(controller)
        info = json.loads((ctl_dir / "controller.json").read_text())
        conn = Connection(info["url"], (ctl_dir / "admin.token").read_text().strip(), Path(info["ca"]), False)
        seed, _ = await call_async(conn, "model.set_seed", {}, seed_model(args.model_size))
        say(f"controller at {conn.url}; seed model {seed['id'][:12]} of {args.model_size:,} float32 parameters")
        combiner_token = (await call_async(conn, "token.create", {"role": "combiner", "ttl_s": 86400, "name": "simulate"}))[0]["token"]
        client_token = (await call_async(conn, "token.create", {"role": "client", "ttl_s": 86400, "name": "simulate"}))[0]["token"]
        common = ["--controller", conn.url, "--ca", str(conn.ca)]
        for i in range(1, args.combiners + 1):
            name = f"combiner-{i}"
            # Every simulated client dials from this one address: no per-address connection limit.
            argv = ["combine", *common, "--name", name, "--port", "0", "--max-connect-rate", "0", "--state-dir", str(root / "combiners" / name)]
            child, _ = await start_child(name, argv, logs, True, level, env={"SCALEOUT_TOKEN": combiner_token})
            children.append(child)
            combiners.append(child)
        started = time.monotonic()
        for i, (first, count) in enumerate(hosts_for(args.clients)):
            argv = ["simulate-clients", *common, "--first", str(first), "--count", str(count), "--train-time", str(args.train_time)]
            child, _ = await start_child(f"clients-{i + 1}", argv, logs, False, level, env={"SCALEOUT_TOKEN": client_token})
            children.append(child)
            hosts.append(child)
        await wait_for_clients(conn, children, args.clients, args.connect_timeout)
        connect_s = time.monotonic() - started
        say(f"{args.clients} clients connected to {args.combiners} combiner(s) in {connect_s:.1f}s")
        # What the connected, idle fleet costs each role, before any round.
        spread = {c["name"]: c["clients"] for c in (await call_async(conn, "combiner.ls"))[0]["combiners"]}
        cpu_at = cpu_by_role(controller, combiners, hosts)
        connected = {
            "connect_s": round(connect_s, 2), "clients_per_combiner": dict(sorted(spread.items())),
            "rss_mb": rss_by_role(controller, combiners, hosts, "VmRSS"), "peak_rss_mb": rss_by_role(controller, combiners, hosts),
            "cpu_s": cpu_at,
        }
        round_rss: dict[int, dict[str, Any]] = {}
        round_cpu: dict[int, dict[str, Any]] = {}
        cfg = {
            "rounds": args.rounds, "round_timeout": args.round_timeout, "min_clients": args.clients,
            "validate": args.validate, "name": "simulate",
        }
        session = (await call_async(conn, "session.start", cfg))[0]["session"]
        say(f"session {session['id']}: {args.rounds} rounds")

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "round":
                timing = data.get("timing") or {}
                split = " ".join(f"{k.removesuffix('_s')}={v:.2f}s" for k, v in timing.items())
                # Each role's peak RSS so far, read as the round ends (peaks are not reset per round).
                rss = round_rss[data["idx"]] = rss_by_role(controller, combiners, hosts)
                # The CPU each role spent since the last round ended (or the fleet connected).
                nonlocal cpu_at
                now = cpu_by_role(controller, combiners, hosts)
                round_cpu[data["idx"]] = cpu_by_role(controller, combiners, hosts, since=cpu_at)
                cpu_at = now
                most = max((v for v in rss["combiners"].values() if v is not None), default=None)
                cpu = round_cpu[data["idx"]]
                spent = " ".join(f"{k}={sum(v for v in vs.values() if v is not None):.1f}s" for k, vs in (("combiners", cpu["combiners"]), ("clients", cpu["client_processes"])))
                say(f"  {_round_line(data)}" + (f"  [{split}]" if split else "") + f"  peak RSS controller={rss['controller']}MB combiner={most}MB"
                    + f"  CPU controller={cpu['controller']}s {spent}")

        session = (await call_async(conn, "session.wait", {"id": session["id"]}, on_event=on_event))[0]["session"]
        report = report_of(session)
        for r, row in zip(report["rounds"], session["rounds"], strict=True):
            r["timing"] = row.get("timing") or {}
            r["peak_rss_mb"] = round_rss.get(r["index"], {})
            r["cpu_s"] = round_cpu.get(r["index"], {})
        report["simulation"] = {
            "clients": args.clients, "combiners": args.combiners, "model_size": args.model_size,
            "train_time_s": args.train_time, "client_processes": len(hosts_for(args.clients)), "connect_s": round(connect_s, 2),
        }
        report["connect"] = connected
        report["peak_rss_mb"] = rss_by_role(controller, combiners, hosts)
        say(f"session {session['id']} {session['status']}" + (f" ({session['reason']})" if session.get("reason") else ""))
        return report
    except DevError as exc:
        say(f"simulation failed: {exc}")
        say(f"logs are in {logs}" + ("" if args.data_dir else " (pass --data-dir to keep them)"))
        return {"session": {"id": None, "status": "failed", "reason": str(exc).splitlines()[0]}, "rounds": []}
    finally:
        interrupts.stopping = True
        await stop_children(children)


def clients_main(args: argparse.Namespace) -> int:
    """`scaleout simulate-clients`: one process of simulated clients (started by simulate)."""
    from scaleout.commands.connection import resolve
    from scaleout.commands.launch import _run
    from scaleout.roles.simclient import SimHost, SimSettings

    conn = resolve(args, {})
    settings = SimSettings(
        controller=conn.url, token=conn.token, ca=conn.ca, insecure=conn.insecure,
        prefix=args.prefix, start=args.first, count=args.count, train_time=args.train_time,
    )
    os.environ.pop("SCALEOUT_TOKEN", None)
    return _run(SimHost(settings).run)
