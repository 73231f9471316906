"""Round latency of a real federation against the bare aggregation compute, in the same run.

Ours: a controller, one combiner and N clients as `scaleout` processes over TLS on 127.0.0.1
(port 0), running a generated compute package whose model is one float32 vector; train adds
a little noise and reports num_examples=1; validation is off. A round's duration comes from
the controller's session rows. Baseline: encode, decode and FedAvg the same N updates in this
process, no network. The ratio is what the protocol and the processes cost on top.
Prints JSON: per-round durations, the medians and their ratio, the median time split
(distribute / train / collect / reduce / commit) and peak RSS of controller and combiner.

    .venv/bin/python benchmarks/round.py [--clients 4] [--params 1000000] [--rounds 3]
    .venv/bin/python benchmarks/round.py --scenario a|b|c|all
    .venv/bin/python benchmarks/round.py --scenario b --store postgresql://USER@HOST:PORT/DB   # the controller on PostgreSQL

Scenarios (issue 6): (a) 10 clients x 25M float32 params, 1 combiner; (b) 10 clients x 1M;
(c) 1,000 simulated clients (`scaleout simulate`) x 10k params over 4 combiners. The last
line is one JSON object with every scenario run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.commands.dev import Child, DevError, start_child, stop_children
from scaleout.core import payload
from scaleout.core.aggregators import get_aggregator
from scaleout.core.errors import ScaleoutError
from scaleout.package.archive import create_archive
from scaleout.package.seed import read_model_file

START_TIMEOUT_S = 60.0
NOISE = 1e-3

SCALEOUT_YAML = """\
entry_points:
  build: build.py
  startup: startup.py
"""

BUILD_PY = '''\
"""Seed: one float32 vector of {params} parameters."""

import os

import numpy as np

from scaleoututil.helpers.helpers import get_helper


def build():
    w = np.random.default_rng(0).standard_normal({params}, dtype=np.float32)
    output_dir = os.environ.get("SCALEOUT_BUILD_OUTPUT_DIR", ".")
    get_helper("numpyhelper").save([w], os.path.join(output_dir, "seed.npz"))
'''

STARTUP_PY = '''\
"""Train adds a little noise; nothing to validate."""

import numpy as np

from scaleout import EdgeClient, ScaleoutModel
from scaleoututil.helpers.helpers import get_helper

helper = get_helper("numpyhelper")
rng = np.random.default_rng()


def startup(client: EdgeClient):
    client.set_train_callback(train)
    client.set_validate_callback(validate)


def train(model: ScaleoutModel, settings):
    params = [p + rng.standard_normal(p.shape, dtype=np.float32) * {noise} for p in model.get_model_params(helper)]
    return ScaleoutModel.from_model_params(params, helper), {{"training_metadata": {{"num_examples": 1}}}}


def validate(model: ScaleoutModel):
    return {{}}
'''


def write_package(root: Path, n_params: int) -> Path:
    root.mkdir(parents=True)
    (root / "scaleout.yaml").write_text(SCALEOUT_YAML)
    (root / "build.py").write_text(BUILD_PY.format(params=n_params))
    (root / "startup.py").write_text(STARTUP_PY.format(noise=NOISE))
    return root


# -- ours: a federation of processes --------------------------------------------------------


async def federation(package: Path, root: Path, n_clients: int, n_rounds: int, round_timeout: float) -> tuple[dict[str, Any], bytes]:
    """Run one session; returns the finished session row and the seed model's bytes."""
    logs = root / "logs"
    logs.mkdir()
    level = "warning"  # debug logging would be part of what is measured
    children: list[Child] = []
    try:
        build, _ = await start_child("build", ["run", "build", "-p", str(package), "-o", str(root / "build")], logs, False, level)
        if await build.proc.wait() != 0:
            raise DevError(f"run build failed:\n{build.tail()}")
        seed = read_model_file(root / "build" / "seed.npz")
        archive = create_archive(package, root / "package.tgz")

        ctl_dir = root / "controller"
        controller, _ = await start_child("controller", ["serve", "--data-dir", str(ctl_dir), "--port", "0"], logs, True, level)
        children.append(controller)
        info = json.loads((ctl_dir / "controller.json").read_text())
        conn = Connection(info["url"], (ctl_dir / "admin.token").read_text().strip(), ctl_dir / "ca.pem", False)
        await call_async(conn, "package.set_active", {"name": archive.name}, archive.read_bytes())
        await call_async(conn, "model.set_seed", {}, seed)
        tokens = {
            role: (await call_async(conn, "token.create", {"role": role, "ttl_s": 3600, "name": "bench"}))[0]["token"]
            for role in ("combiner", "client")
        }
        common = ["--controller", conn.url, "--ca", str(conn.ca)]
        combiner, _ = await start_child("combiner", ["combine", *common, "--token", tokens["combiner"], "--name", "c1", "--port", "0"], logs, True, level)
        children.append(combiner)
        for i in range(n_clients):
            name = f"client-{i}"
            args = ["join", *common, "--token", tokens["client"], "--name", name, "--work-dir", str(root / name)]
            children.append((await start_child(name, args, logs, False, level))[0])
        await call_async(conn, "client.wait", {"count": n_clients, "timeout": START_TIMEOUT_S})

        cfg = {"rounds": n_rounds, "min_clients": n_clients, "round_timeout": round_timeout, "validate": False}
        session = (await call_async(conn, "session.start", cfg))[0]["session"]
        session = (await call_async(conn, "session.wait", {"id": session["id"]}))[0]["session"]
        session["peak_rss_mib"] = {c.name: peak_rss_mib(c.proc.pid) for c in (controller, combiner)}
        session["clients_peak_rss_mib"] = {c.name: peak_rss_mib(c.proc.pid) for c in children if c not in (controller, combiner)}
        return session, seed
    except (DevError, ScaleoutError) as exc:
        tails = "\n".join(c.tail() for c in children)
        raise SystemExit(f"the federation did not run: {exc}\n{tails}") from None
    finally:
        await stop_children(children)
        for child in children:
            if "Traceback" in child.log_path.read_text(errors="replace"):
                print(f"warning: {child.name} logged a traceback:\n{child.tail(40)}", file=sys.stderr)


def peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident memory (Linux VmHWM), to see whether it grows with clients."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# -- baseline: the same math in this process ------------------------------------------------


def baseline(seed: bytes, n_clients: int, repeat: int) -> list[float]:
    """Seconds to encode, decode and FedAvg N noisy copies of the seed, `repeat` times."""
    template = payload.describe(seed)
    rng = np.random.default_rng(1)
    start = payload.decode(seed)
    assert isinstance(start, list)
    times = []
    for _ in range(repeat):
        updates = [[p + rng.standard_normal(p.shape, dtype=np.float32) * np.float32(NOISE) for p in start] for _ in range(n_clients)]
        t0 = time.perf_counter()
        agg = get_aggregator("fedavg", template)
        for i, update in enumerate(updates):
            named, _, _ = payload.read(payload.encode(update))
            agg.add(named, 1.0, f"client-{i}")
        agg.result()
        times.append(time.perf_counter() - t0)
    return times


def measure(n_clients: int, n_params: int, n_rounds: int, round_timeout: float, *, clients_rss: bool = False) -> dict[str, Any]:
    """Run the federation and the baseline once; returns the figures main() prints.

    With clients_rss, also each client's peak RSS (benchmarks/flower.py compares every process).
    """
    with tempfile.TemporaryDirectory(prefix="scaleout-bench-") as tmp:
        root = Path(tmp)
        package = write_package(root / "package", n_params)
        session, seed = asyncio.run(federation(package, root, n_clients, n_rounds, round_timeout))
    rounds = session["rounds"]
    failed = [r for r in rounds if r["status"] != "succeeded"]
    if session["status"] != "finished" or failed or len(rounds) != n_rounds:
        reason = session.get("reason") or (failed[0]["reason"] if failed else "")
        raise SystemExit(f"session {session['status']}: {reason}")

    durations = [float(r["duration_s"]) for r in rounds]
    base = baseline(seed, n_clients, n_rounds)
    t_ours, t_base = statistics.median(durations), statistics.median(base)
    result = {
        "benchmark": "round_latency_vs_in_process_fedavg",
        "clients": n_clients, "params": n_params, "rounds": n_rounds,
        "update_mib": round(len(seed) / 2**20, 2),
        "round_s": [round(d, 3) for d in durations],
        "ours_s": round(t_ours, 4), "baseline_s": round(t_base, 4), "time_ratio": round(t_ours / t_base, 2),
        "overhead_s": round(t_ours - t_base, 4),
        "peak_rss_mib": session["peak_rss_mib"],
        "timing_s": median_timing(rounds),
    }
    if clients_rss:
        result["clients_peak_rss_mib"] = session["clients_peak_rss_mib"]
    return result


def median_timing(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each phase of the rounds' time split."""
    keys = sorted({k for r in rounds for k in (r.get("timing") or {})})
    return {k: round(statistics.median(float((r.get("timing") or {}).get(k, 0.0)) for r in rounds), 4) for k in keys}


def simulated(n_clients: int, n_combiners: int, n_params: int, n_rounds: int) -> dict[str, Any]:
    """Scenario (c): `scaleout simulate`, against the in-process FedAvg of as many updates."""
    with tempfile.TemporaryDirectory(prefix="scaleout-bench-") as tmp:
        report = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "scaleout", "simulate", "--clients", str(n_clients), "--combiners", str(n_combiners),
               "--rounds", str(n_rounds), "--model-size", str(n_params), "--report", str(report)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"simulate failed:\n{done.stdout}\n{done.stderr}")
        data = json.loads(report.read_text())
    durations = [float(r["duration_s"]) for r in data["rounds"]]
    base = baseline(payload.encode([np.zeros(n_params, np.float32)]), n_clients, n_rounds)  # same size as the seed
    t_ours, t_base = statistics.median(durations), statistics.median(base)
    return {
        "benchmark": "round_simulated_clients", "clients": n_clients, "combiners": n_combiners, "params": n_params,
        "rounds": n_rounds, "round_s": [round(d, 3) for d in durations], "ours_s": round(t_ours, 4),
        "baseline_s": round(t_base, 4), "time_ratio": round(t_ours / t_base, 2), "timing_s": median_timing(data["rounds"]),
        "participants": [r["participants"] for r in data["rounds"]], "peak_rss_mb": data["peak_rss_mb"],
        "connect_s": data["simulation"]["connect_s"],
    }


SCENARIOS = {
    "a": lambda rounds: measure(10, 25_000_000, rounds, 300.0),
    "b": lambda rounds: measure(10, 1_000_000, rounds, 120.0),
    "c": lambda rounds: simulated(1000, 4, 10_000, rounds),
}
TARGETS_S = {"a": 5.0, "b": 0.3, "c": 20.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], help="run issue 6's workloads instead of --clients/--params")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--params", type=int, default=1_000_000, help="float32 parameters in the model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-timeout", type=float, default=60.0, help="seconds before a round gives up")
    ap.add_argument("--store", metavar="URL", help="run the controller on this PostgreSQL store (serve --store; an empty database is fairest)")
    a = ap.parse_args()
    if a.store:
        import os

        os.environ["SCALEOUT_STORE"] = a.store  # the controller child reads it (serve's env for --store)
        if not os.environ.get("SCALEOUT_KEY_FILE"):  # a postgresql store needs one (serve --key-file)
            from scaleout.store.vault import keygen

            key_file = Path(tempfile.mkdtemp(prefix="scaleout-bench-")) / "store.key"
            keygen(key_file)
            os.environ["SCALEOUT_KEY_FILE"] = str(key_file)
    if a.clients < 1 or a.params < 1 or a.rounds < 1 or a.round_timeout <= 0:
        ap.error("--clients, --params and --rounds must be at least 1, --round-timeout > 0")
    if a.scenario:
        picked = list(SCENARIOS) if a.scenario == "all" else [a.scenario]
        results = {}
        for name in picked:
            results[name] = SCENARIOS[name](a.rounds)
            results[name]["target_round_s"] = TARGETS_S[name]
            print(f"scenario {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
        print(json.dumps({"benchmark": "round", "scenarios": results}))
        return
    print(json.dumps(measure(a.clients, a.params, a.rounds, a.round_timeout), indent=2))


if __name__ == "__main__":
    main()
