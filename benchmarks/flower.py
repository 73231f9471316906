"""Round time and memory of Flower's deployment engine beside ours, same workload, same run.

Workloads (issue 6, item 7): (a) 10 clients x 25M float32 params, (b) 10 clients x 1M;
FedAvg, no validation, train adds a little noise and reports one example.

Ours: benchmarks/round.py's `measure` (a controller, one combiner and the clients as
`scaleout` processes over TLS on 127.0.0.1; round time from the controller's session rows).
Flower: one `flower-superlink --insecure` and ten `flower-supernode --insecure` on 127.0.0.1
(ports picked free at run time), and `flwr run` of a Flower App generated here: a ServerApp
running `flwr.serverapp.strategy.FedAvg` (every node trains, fraction_evaluate 0) on one float32
vector, and a NumPy ClientApp returning the arrays it got plus the same noise. A Flower round
is timed inside the ServerApp, from `configure_train` to the end of `aggregate_train`: startup
and the wait for the ten nodes are left out, as they are on our side (whose round also commits
the model to disk; Flower's keeps it in memory). In Flower's default subprocess isolation each
SuperNode's SuperExec starts a fresh `flwr-clientapp` process for every message, so that start
is inside each Flower round: this is how its deployment engine runs an app, not a setup choice here.

Caveats, so the ratio is read right: Flower runs without TLS (`--insecure`, as its local
deployment guides do) while ours uses TLS; both log at warning level. RSS is in MiB, two ways:
`*_peak_rss_mb` sums each process's peak (VmHWM), each at its own moment, so it bounds the
simultaneous total from above; a Flower node's ClientApp processes, one after the other, count
as one (the largest). `*_sampled_total_rss_mb` is the largest sum of current RSS seen at one
instant, sampling /proc every 0.2 s, so it can miss a short spike. Counted: ours the controller,
the combiner and the clients; Flower's the SuperLink, the SuperNodes, the SuperExecs they start
and the ServerApp and ClientApp processes (not the `flwr` CLI, as our admin calls are not). RSS
counts each process's copy of Python and NumPy, so the number of processes weighs in. Both
sides share the machine with whatever else runs on it: the 1-minute load as each side started
is in the output; compare runs with a low one.

Needs Flower: pip install -e '.[bench]' (make bench-flower). Progress goes to stderr; the last
line on stdout is one JSON object.

    .venv/bin/python benchmarks/flower.py [--workload a|b|all] [--clients 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Self

WORKLOADS = {"a": 25_000_000, "b": 1_000_000}
NOISE = 1e-3  # as benchmarks/round.py
START_TIMEOUT_S = 120.0
SAMPLE_EVERY_S = 0.2
STOP_GRACE_S = 5.0
INSTALL_HINT = "pip install -e '.[bench]' (or make bench-flower)"
FLOWER_EXES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
# The command a Flower process runs -> the role it is reported under.
ROLES = {
    "flower-superlink": "superlink",
    "flower-supernode": "supernode",
    "flower-superexec": "superexec",
    "flwr-serverapp": "serverapp",
    "flwr-clientapp": "clientapp",
    "flwr": "cli",
}
SCALEOUT_ROLES = {"serve": "controller", "combine": "combiner", "join": "client", "run": "build"}
UNCOUNTED = {"cli", "build"}  # admin commands and the seed build, on both sides

# -- the Flower App, written into a temp dir ------------------------------------------------

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "scaleout-bench"
version = "1.0.0"
description = "Scaleout's round benchmark workload as a Flower App"
license = "Apache-2.0"
dependencies = ["flwr", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "scaleout"

[tool.flwr.app.components]
serverapp = "scaleout_bench_app.server_app:app"
clientapp = "scaleout_bench_app.client_app:app"

[tool.flwr.app.config]
num-server-rounds = {rounds}
num-params = {params}
num-clients = {clients}
timings-file = "{timings}"
"""

SERVER_APP = '''\
"""FedAvg over one float32 vector; each round timed and written to timings-file as JSON lines."""

import json
import time
import traceback
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def vm_hwm_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's training starts and its aggregate is ready."""

    def __init__(self, out, **kwargs):
        super().__init__(**kwargs)
        self.out = out
        self.t0 = 0.0

    def configure_train(self, server_round, arrays, config, grid):
        self.t0 = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        elapsed = time.perf_counter() - self.t0
        ok = sum(1 for r in replies if not r.has_error())
        errors = [r.error.reason for r in replies if r.has_error()]
        write(self.out, {{"round": server_round, "s": elapsed, "replies": ok, "errors": errors[:3]}})
        return arrays, metrics


def write(out, record):
    with open(out, "a") as fh:
        fh.write(json.dumps(record) + "\\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out = Path(str(cfg["timings-file"]))
    n_clients, n_params = int(cfg["num-clients"]), int(cfg["num-params"])
    try:
        deadline = time.monotonic() + {start_timeout}
        # Polls the condition the rounds need; FedAvg's own wait sleeps 1 s at a time inside round 1.
        while len(list(grid.get_node_ids())) < n_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {{len(list(grid.get_node_ids()))}} of {{n_clients}} nodes connected")
            time.sleep(0.05)
        seed = np.random.default_rng(0).standard_normal(n_params, dtype=np.float32)
        strategy = TimedFedAvg(
            out, fraction_train=1.0, fraction_evaluate=0.0,
            min_train_nodes=n_clients, min_available_nodes=n_clients,
        )
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord([seed]), num_rounds=int(cfg["num-server-rounds"]))
        final = result.arrays.to_numpy_ndarrays()
        good = len(final) == 1 and final[0].shape == seed.shape and bool(np.isfinite(final[0]).all())
        write(out, {{"done": True, "model_ok": good, "vm_hwm_kib": vm_hwm_kib()}})
    except BaseException as exc:
        write(out, {{"error": f"{{type(exc).__name__}}: {{exc}}", "traceback": traceback.format_exc()[-4000:]}})
        raise
'''

CLIENT_APP = '''\
"""Train returns the arrays it received plus a little noise, weighted by one example."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
rng = np.random.default_rng()


@app.train()
def train(msg: Message, context: Context):
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    noisy = [a + rng.standard_normal(a.shape, dtype=np.float32) * np.float32({noise}) for a in arrays]
    content = RecordDict({{"arrays": ArrayRecord(noisy), "metrics": MetricRecord({{"num-examples": 1}})}})
    return Message(content=content, reply_to=msg)
'''


def write_app(root: Path, n_clients: int, n_params: int, n_rounds: int, timings: Path) -> Path:
    pkg = root / "scaleout_bench_app"
    pkg.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        APP_PYPROJECT.format(rounds=n_rounds, params=n_params, clients=n_clients, timings=timings.as_posix())
    )
    (pkg / "__init__.py").write_text("")
    (pkg / "server_app.py").write_text(SERVER_APP.format(start_timeout=START_TIMEOUT_S))
    (pkg / "client_app.py").write_text(CLIENT_APP.format(noise=NOISE))
    return root


# -- processes: started, sampled, and always ended ------------------------------------------


class BenchError(Exception):
    """The Flower side did not run; the message says why."""


def free_ports(n: int) -> list[int]:
    """n distinct ports the kernel has just handed out on 127.0.0.1 (bound to 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def become_subreaper() -> None:
    """Orphaned descendants (Flower detaches its SuperExec) get re-parented to us, so we find and end them."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(rest[1]), rest[0])
    return table


def descendants(root: int) -> list[int]:
    """Live (non-zombie) descendants of root, parents before children."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        if table[pid][1] != "Z":
            out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def role_of(pid: int) -> str | None:
    """What a process is, from its command line; None when it is gone."""
    try:
        argv = [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    for arg in argv[:3]:
        if os.path.basename(arg) in ROLES:
            return ROLES[os.path.basename(arg)]
    if argv[1:3] == ["-m", "scaleout"]:
        return SCALEOUT_ROLES.get(argv[3] if len(argv) > 3 else "", "scaleout_other")
    return "other"  # e.g. `uname -p`, which Flower runs at start


def memory_mib(pid: int) -> tuple[float, float] | None:
    """(VmHWM, VmRSS) of a live process in MiB."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                found[line[:5]] = int(line.split()[1]) / 1024
    except OSError:
        return None
    return (found["VmHWM"], found["VmRSS"]) if len(found) == 2 else None


class Sampler:
    """Reads /proc every SAMPLE_EVERY_S for every descendant of this process: each one's peak
    (VmHWM) and the largest sum of their current RSS seen at one instant."""

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, int, float]] = {}  # pid -> (role, slot, peak MiB)
        self.total_peak_mib = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.sample()

    def sample(self) -> None:
        table = _proc_table()
        total = 0.0
        for pid in descendants(os.getpid()):
            mem, role = memory_mib(pid), role_of(pid)
            if mem is None or role is None:
                continue
            parent = table.get(pid, (0, ""))[0]
            if role == "superexec":  # the SuperLink's launches the ServerApp, a SuperNode's its ClientApps
                role = "superexec_link" if role_of(parent) == "superlink" else "superexec_node"
            # A ClientApp process lives for one message; those one node's SuperExec starts one after
            # the other share a slot, like one long-lived client process.
            slot = parent if role == "clientapp" else pid
            if role not in UNCOUNTED:
                total += mem[1]
            with self._lock:
                # Between fork and exec a child still shows its parent's command and shares its
                # pages; once it runs its own command, what was seen before is not its own.
                old_role, _, old = self.peaks.get(pid, (role, slot, 0.0))
                self.peaks[pid] = (role, slot, max(old, mem[0]) if old_role == role else mem[0])
        with self._lock:
            self.total_peak_mib = max(self.total_peak_mib, total)

    def note_peak(self, role: str, mib: float) -> None:
        """A process's own report of its peak, for one that may exit between two samples."""
        with self._lock:
            for pid, (r, slot, old) in self.peaks.items():
                if r == role:
                    self.peaks[pid] = (r, slot, max(old, mib))
                    return
            self.peaks[-len(self.peaks) - 1] = (role, -1, mib)

    def by_role(self) -> dict[str, dict[str, float]]:
        """Per role: processes seen, slots, and the sum over slots of each slot's largest peak."""
        with self._lock:
            peaks = list(self.peaks.values())
        slots: dict[tuple[str, int], float] = {}
        count: dict[str, int] = {}
        for role, slot, mib in peaks:
            if role in UNCOUNTED:
                continue
            count[role] = count.get(role, 0) + 1
            slots[(role, slot)] = max(slots.get((role, slot), 0.0), mib)
        out: dict[str, dict[str, float]] = {}
        for (role, _), mib in slots.items():
            entry = out.setdefault(role, {"processes": count[role], "slots": 0, "sum_mib": 0.0, "max_mib": 0.0})
            entry["slots"] += 1
            entry["sum_mib"] += mib
            entry["max_mib"] = max(entry["max_mib"], mib)
        return {r: {k: round(v, 1) for k, v in e.items()} for r, e in sorted(out.items())}


class Fleet:
    """Every process this benchmark starts for Flower, with its log, and an end for all of them
    and their descendants (SIGTERM, then SIGKILL after a grace), whatever happened."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,  # a terminal's Ctrl-C reaches us only; we end them
            )
        self.procs.append((name, proc))
        return proc

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {name} ---\n" + "\n".join(text[-lines:])

    def stop(self) -> None:
        """End every process started here and every descendant, by pid; reap what is ours."""
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
            pids = descendants(os.getpid())
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self._reap()
                if not set(pids) & set(descendants(os.getpid())):
                    break
                time.sleep(0.05)  # waiting for exits we have just asked for
        self._reap()

    def _reap(self) -> None:
        for _, proc in self.procs:
            proc.poll()
        # Orphans re-parented to us (we are their subreaper) would stay zombies otherwise.
        for pid, (ppid, state) in _proc_table().items():
            if ppid == os.getpid() and state == "Z" and all(p.pid != pid for _, p in self.procs):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass


def flower_env(bin_dir: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # the SuperLink and SuperNodes start flower-superexec by name
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOG_LEVEL": "WARNING",  # ours logs at warning too
        "PYTHONUNBUFFERED": "1",
    })
    return env


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"the SuperLink exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"the SuperLink was not ready within {timeout:.0f}s")
        time.sleep(0.1)  # polling the health endpoint: nothing announces readiness


def read_timings(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line still being written
    return out


def run_flower(bin_dir: Path, root: Path, n_clients: int, n_params: int, n_rounds: int, round_timeout: float) -> dict[str, Any]:
    """One SuperLink, n SuperNodes, one run of the generated App; returns round times and RSS."""
    logs = root / "logs"
    logs.mkdir(parents=True)
    home = root / "flwr-home"
    home.mkdir()
    timings = root / "timings.jsonl"
    app = write_app(root / "app", n_clients, n_params, n_rounds, timings)
    link_port, *node_ports = free_ports(1 + n_clients)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    fleet = Fleet(logs, flower_env(bin_dir, home))
    names = ["superlink"]
    sampler = Sampler().start()
    try:
        link = fleet.start("superlink", [
            str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
            "--disable-runtime-dependency-installation",
        ])
        wait_healthy(f"http://127.0.0.1:{link_port}/health", link, START_TIMEOUT_S)
        for i, port in enumerate(node_ports):
            names.append(f"supernode-{i}")
            fleet.start(names[-1], [
                str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--host", "127.0.0.1", "--port", str(port),
                "--node-config", f"partition-id={i} num-partitions={n_clients}",
            ])
        names.append("flwr-run")
        cli = fleet.start("flwr-run", [str(bin_dir / "flwr"), "run", str(app), "bench"])
        try:
            if cli.wait(timeout=START_TIMEOUT_S) != 0:
                raise BenchError(f"flwr run exited with code {cli.returncode}")
        except subprocess.TimeoutExpired:
            raise BenchError(f"flwr run did not return within {START_TIMEOUT_S:.0f}s") from None

        deadline = time.monotonic() + START_TIMEOUT_S + n_rounds * round_timeout
        while True:
            records = read_timings(timings)
            if any("done" in r or "error" in r for r in records):
                break
            dead = [name for name, p in fleet.procs if name != "flwr-run" and p.poll() is not None]
            if dead:
                raise BenchError(f"{', '.join(dead)} exited during the run")
            if time.monotonic() > deadline:
                raise BenchError(f"the run did not finish in time; rounds so far: {[r for r in records if 'round' in r]}")
            time.sleep(0.2)  # the ServerApp appends to the timings file; we read it
        sampler.sample()
        end = next(r for r in records if "done" in r or "error" in r)
        if "error" in end:
            raise BenchError(f"the ServerApp failed: {end['error']}\n{end.get('traceback', '')}")
        rounds = [r for r in records if "round" in r]
        short = [r for r in rounds if r["replies"] != n_clients]
        if len(rounds) != n_rounds or short or not end.get("model_ok"):
            raise BenchError(f"the run was not complete: rounds {rounds}, final model ok: {end.get('model_ok')}")
        if end.get("vm_hwm_kib"):
            sampler.note_peak("serverapp", end["vm_hwm_kib"] / 1024)
    except BenchError as exc:
        sampler.stop()
        fleet.stop()
        tails = "\n".join(fleet.tail(n) for n in names[:2] + names[-1:])
        raise BenchError(f"{exc}\nlogs are kept in {logs}\n{tails}") from None
    finally:
        sampler.stop()
        fleet.stop()
    return {"round_s": [r["s"] for r in rounds], "rss": sampler.by_role(), "total_peak_mib": sampler.total_peak_mib}


# -- ours: benchmarks/round.py ---------------------------------------------------------------


def load_round_bench() -> ModuleType:
    path = Path(__file__).with_name("round.py")
    spec = importlib.util.spec_from_file_location("scaleout_round_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("scaleout", "flwr", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def flower_bin_dir() -> Path | None:
    """Where Flower's commands are: beside this interpreter (a venv), else on PATH."""
    here = Path(sys.executable).parent
    if all((here / exe).exists() for exe in FLOWER_EXES):
        return here
    found = shutil.which("flower-superlink")
    if found and all((Path(found).parent / exe).exists() for exe in FLOWER_EXES):
        return Path(found).parent
    return None


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally, so each process is ended


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["a", "b", "all"], default="all", help="a: 25M params, b: 1M params")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-timeout", type=float, default=300.0, help="seconds before a round gives up (either side)")
    a = ap.parse_args()
    if a.clients < 1 or a.rounds < 1 or a.round_timeout <= 0:
        ap.error("--clients and --rounds must be at least 1, --round-timeout > 0")

    bin_dir = flower_bin_dir()
    if importlib.util.find_spec("flwr") is None or bin_dir is None:
        print(f"flwr is not installed for {sys.executable}: {INSTALL_HINT}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, _terminate)
    become_subreaper()
    round_bench = load_round_bench()

    out: dict[str, Any] = {
        "benchmark": "round_vs_flower_deployment_engine",
        "clients": a.clients, "rounds": a.rounds, "rss_unit": "MiB",
        "tls": {"scaleout": True, "flower": False},
        "versions": versions(), "cpus": os.cpu_count(),
        "workloads": {},
    }
    names = ["b", "a"] if a.workload == "all" else [a.workload]
    try:
        for name in names:
            params = WORKLOADS[name]
            print(f"[{name}] {a.clients} clients x {params:,} params: scaleout ...", file=sys.stderr, flush=True)
            load = {"scaleout": round(os.getloadavg()[0], 2)}
            with Sampler() as sampler:
                ours = round_bench.measure(a.clients, params, a.rounds, a.round_timeout, clients_rss=True)
            ours["total_peak_mib"] = sampler.total_peak_mib
            print(f"[{name}] scaleout rounds {ours['round_s']} s; flower ...", file=sys.stderr, flush=True)
            load["flower"] = round(os.getloadavg()[0], 2)
            tmp = Path(tempfile.mkdtemp(prefix="scaleout-flower-bench-"))
            try:
                theirs = run_flower(bin_dir, tmp, a.clients, params, a.rounds, a.round_timeout)
            except BenchError:
                raise  # its logs stay in tmp, named in the message
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"[{name}] flower rounds {[round(s, 3) for s in theirs['round_s']]} s", file=sys.stderr, flush=True)
            # The machine's 1-minute load as each side started: other work on it skews both.
            out["workloads"][name] = {**compare(params, ours, theirs), "load_avg_1m_at_start": load}
    except BenchError as exc:
        print(f"flower side failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    print(json.dumps(out))


def compare(params: int, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Side by side; RSS as the sum of each process's peak (each Flower node's ClientApps as one),
    and as the largest simultaneous total the sampler saw."""
    ours_server = {k: v or 0.0 for k, v in ours["peak_rss_mib"].items()}
    ours_clients = [v or 0.0 for v in ours["clients_peak_rss_mib"].values()]
    ours_sum = sum(ours_server.values()) + sum(ours_clients)
    rss = theirs["rss"]
    theirs_sum = sum(e["sum_mib"] for e in rss.values())
    # Server side: the SuperLink, the SuperExec it starts and the ServerApp; the rest is the nodes.
    theirs_server = sum(rss[r]["sum_mib"] for r in ("superlink", "superexec_link", "serverapp") if r in rss)
    t_ours, t_theirs = statistics.median(ours["round_s"]), statistics.median(theirs["round_s"])
    return {
        "params": params, "update_mib": round(params * 4 / 2**20, 1),
        "scaleout_round_s": round(t_ours, 3), "flower_round_s": round(t_theirs, 3),
        "ratio": round(t_theirs / t_ours, 2),
        "scaleout_peak_rss_mb": round(ours_sum, 1), "flower_peak_rss_mb": round(theirs_sum, 1),
        "rss_ratio": round(theirs_sum / ours_sum, 2),
        "scaleout_server_peak_rss_mb": round(sum(ours_server.values()), 1),
        "flower_server_peak_rss_mb": round(theirs_server, 1),
        "scaleout_sampled_total_rss_mb": round(ours["total_peak_mib"], 1),
        "flower_sampled_total_rss_mb": round(theirs["total_peak_mib"], 1),
        "scaleout_rounds_s": ours["round_s"], "flower_rounds_s": [round(s, 3) for s in theirs["round_s"]],
        "scaleout_rss": {**ours_server, "clients_sum_mib": round(sum(ours_clients), 1), "clients_max_mib": max(ours_clients, default=0.0)},
        "flower_rss": rss,
        "scaleout_in_process_fedavg_s": ours["baseline_s"],
    }


if __name__ == "__main__":
    main()
