"""Check dist/scaleout.pyz and dist/scaleout as a device would run them (make dist-check).

Run by build/dist_check.sh under `env -i` with a fresh HOME and no venv on PATH; uses only the
standard library. Every artefact process gets that same clean environment. Checks:

1. `--version` of each names its build kind; `--version` and `join --help` timed warm; the
   one-file executable's first start, several first starts at once, and a damaged, truncated or
   unwritable-cache start.
2. A compute package importing a module nothing carries fails in one line naming it.
3. `scaleout dev` with 2 clients x 2 rounds (headless, and on a pty with the TUI), and `scaleout simulate` with 20 clients over 2
   combiners, from each artefact (their children are the same artefact: in this environment
   `python3 -m scaleout` could not even start).
4. One federation of mixed builds: zipapp controller, frozen combiner, and a source, a zipapp
   and a frozen client, and a frozen client given nothing but the join token, driving a 2-round session with admin commands from both artefacts;
   the controller's Prometheus endpoint (`serve --metrics-port`) counts the rounds. The frozen
   controller serves it too (prometheus_client is imported only for that flag).

Prints one line per check and a JSON summary last; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "sample_projects" / "quickstart" / "client"
READY_TIMEOUT = 90.0


class CheckFailed(Exception):
    pass


def run(cmd: list[str], *, timeout: float = 120, cwd: Path | None = None, expect: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env} if env else None
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL, env=full_env)
    if r.returncode != expect:
        raise CheckFailed(f"{' '.join(cmd)} exited {r.returncode} (expected {expect})\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}")
    if "Traceback" in r.stderr:
        raise CheckFailed(f"{' '.join(cmd)} printed a traceback:\n{r.stderr[-4000:]}")
    return r


def warm_seconds(cmd: list[str], repeat: int = 5) -> float:
    run(cmd)  # the first start unpacks into the per-user cache (both artefacts)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run(cmd)
        best = min(best, time.perf_counter() - t0)
    return round(best, 3)


def start(cmd: list[str], log: Path, ready: bool) -> tuple[subprocess.Popen[bytes], str | None]:
    """Start a role; with ``ready`` wait for its `listening on URL` line and return the URL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "wb"), stdin=subprocess.DEVNULL)
    if not ready:
        return proc, None
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            if line.startswith("listening on "):
                return proc, line.removeprefix("listening on ").strip()
    proc.kill()
    raise CheckFailed(f"{' '.join(cmd)} was not ready within {READY_TIMEOUT:.0f}s:\n{log.read_text(errors='replace')[-4000:]}")


class Connected:
    """Copies a client's stderr to its log and notes when it first logs that it connected:
    the time from start to connected, read off the client's own line, not polled."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.seconds: float | None = None
        self.thread = threading.Thread(target=self._copy, args=(log,), daemon=True)
        self.thread.start()

    def _copy(self, log: Path) -> None:
        assert self.proc.stderr is not None
        with open(log, "wb") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                if self.seconds is None and b"connected to combiner" in line:
                    self.seconds = round(time.perf_counter() - self.started, 2)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (a one-file binary is two processes)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return round(total / 1024, 1)


def stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in reversed(procs):
        try:
            codes.append(p.wait(30))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def check_version(name: str, cmd: list[str], kind: str, figures: dict[str, object]) -> None:
    out = run(cmd + ["--version"]).stdout.strip()
    if not (out.startswith("scaleout ") and f", {kind})" in out and "(protocol " in out):
        raise CheckFailed(f"{name} --version printed {out!r}, expected 'scaleout X (protocol N, {kind})'")
    figures[f"{name}_version_s"] = warm_seconds(cmd + ["--version"])
    figures[f"{name}_join_help_s"] = warm_seconds(cmd + ["join", "--help"])
    print(f"ok  {name}: {out}; warm --version {figures[f'{name}_version_s']}s, join --help {figures[f'{name}_join_help_s']}s", flush=True)


def check_launcher(frozen: list[str], work: Path, figures: dict[str, object]) -> None:
    """dist/scaleout's first start unpacks once (also when several start at once); a damaged or
    truncated file and an unwritable cache each give one line and exit 1."""
    cache = work / "cache-cold"
    t0 = time.perf_counter()
    run(frozen + ["--version"], env={"SCALEOUT_CACHE": str(cache)})
    figures["frozen_first_start_s"] = round(time.perf_counter() - t0, 2)
    together = work / "cache-together"
    procs = [subprocess.Popen(frozen + ["--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "SCALEOUT_CACHE": str(together)}) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    if any(p.returncode != 0 for p in procs) or any("frozen" not in out for out, _ in outs):
        raise CheckFailed(f"4 first starts at once: exit codes {[p.returncode for p in procs]}, stderr {[e[-300:] for _, e in outs]}")
    left = sorted(p.name for p in together.iterdir())
    if len(left) != 1 or not left[0].startswith("frozen-"):
        raise CheckFailed(f"4 first starts at once left {left} in the cache, expected one frozen-* folder")
    data = Path(frozen[0]).read_bytes()
    cases = {"truncated": data[: len(data) // 2], "damaged": data[: len(data) // 2] + bytes(4096) + data[len(data) // 2 + 4096:]}
    for what, content in cases.items():
        bad = work / f"scaleout-{what}"
        bad.write_bytes(content)
        bad.chmod(0o755)
        r = run([str(bad), "--version"], expect=1, env={"SCALEOUT_CACHE": str(work / f"cache-{what}")})
        if "download it again" not in r.stderr or len(r.stderr.strip().splitlines()) != 1:
            raise CheckFailed(f"a {what} dist/scaleout said {r.stderr!r}, not one line saying to download it again")
    blocked = work / "not-a-dir"
    blocked.write_text("")
    r = run(frozen + ["--version"], expect=1, env={"SCALEOUT_CACHE": str(blocked / "cache")})
    if "SCALEOUT_CACHE" not in r.stderr:
        raise CheckFailed(f"an unwritable cache gave {r.stderr!r}, not a line naming SCALEOUT_CACHE")
    print(f"ok  frozen: first start (unpacks once) {figures['frozen_first_start_s']}s; 4 first starts at once share one copy; "
          "truncated, damaged and unwritable-cache cases each one line, exit 1", flush=True)


def check_missing_module(name: str, cmd: list[str], work: Path) -> None:
    pkg = work / f"needs-absent-{name}"
    pkg.mkdir()
    (pkg / "scaleout.yaml").write_text("entry_points:\n  build: build.py\n")
    (pkg / "build.py").write_text("import numpy\nimport scaleout_dist_check_absent.nn\n\ndef build():\n    pass\n")
    r = run(cmd + ["run", "build", "-p", str(pkg)], expect=2)
    line = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    if "scaleout_dist_check_absent" not in line or "pip install" not in line:
        raise CheckFailed(f"{name}: a missing module gave {r.stderr!r}, not one line naming it with what to do")
    print(f"ok  {name}: missing module -> {line[:160]}...", flush=True)


def check_dev(name: str, cmd: list[str], work: Path, figures: dict[str, object]) -> None:
    pkg = work / f"dev-{name}" / "client"
    shutil.copytree(QUICKSTART, pkg, ignore=shutil.ignore_patterns("*.npz", "__pycache__"))
    report = work / f"dev-{name}" / "report.json"
    t0 = time.perf_counter()
    run(cmd + ["dev", "-p", str(pkg), "--clients", "2", "--rounds", "2", "--headless", "--report", str(report)], timeout=600, cwd=pkg.parent)
    took = round(time.perf_counter() - t0, 1)
    rounds = json.loads(report.read_text())["rounds"]
    if [r["status"] for r in rounds] != ["succeeded", "succeeded"] or any(r["participants"] != 2 for r in rounds):
        raise CheckFailed(f"{name}: dev report {rounds}")
    figures[f"{name}_dev_s"] = took
    print(f"ok  {name}: scaleout dev, 2 clients x 2 rounds succeeded in {took}s", flush=True)


def check_dev_tui(name: str, cmd: list[str], work: Path, figures: dict[str, object]) -> None:
    """`scaleout dev` on a terminal (a pty) opens the TUI from the artefact (its stylesheets are
    inside), shows the rounds, and `q` stops the federation with exit 0."""
    import fcntl
    import pty
    import re
    import select
    import struct
    import termios

    pkg = work / f"tui-{name}" / "client"
    shutil.copytree(QUICKSTART, pkg, ignore=shutil.ignore_patterns("*.npz", "__pycache__"))
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:  # the child: scaleout dev on the pty
        os.environ.update(TERM="xterm-256color", COLUMNS="140", LINES="40")
        os.chdir(pkg.parent)
        os.execv(cmd[0], [*cmd, "dev", "-p", str(pkg), "--clients", "2", "--rounds", "2", "--data-dir", str(pkg.parent / "data")])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    ansi = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[>=]")
    seen = b""

    def read_until(text: bytes, timeout: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in ansi.sub(b"", seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"{name}: no {text!r} on the TUI within {timeout}s:\n{ansi.sub(b'', seen)[-2000:].decode(errors='replace')}")
            if select.select([fd], [], [], left)[0]:
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    break

    try:
        read_until(b"2/2 rounds", READY_TIMEOUT)
        figures[f"{name}_tui_s"] = round(time.perf_counter() - t0, 1)
        os.write(fd, b"q")
        deadline = time.monotonic() + 60
        while not (done := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                raise CheckFailed(f"{name}: scaleout dev did not exit after q in the TUI")
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    pass
        code = os.waitstatus_to_exitcode(done[1])
        if code != 0 or b"Traceback" in seen:
            raise CheckFailed(f"{name}: dev with the TUI exited {code}:\n{ansi.sub(b'', seen)[-2000:].decode(errors='replace')}")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    print(f"ok  {name}: scaleout dev on a terminal opened the TUI, 2 rounds shown, q stopped it ({figures[f'{name}_tui_s']}s)", flush=True)


def check_simulate(name: str, cmd: list[str], work: Path, figures: dict[str, object]) -> None:
    report = work / f"simulate-{name}.json"
    t0 = time.perf_counter()
    run(cmd + ["simulate", "--clients", "20", "--combiners", "2", "--rounds", "1", "--report", str(report)], timeout=600, cwd=work)
    took = round(time.perf_counter() - t0, 1)
    rounds = json.loads(report.read_text())["rounds"]
    if [r["status"] for r in rounds] != ["succeeded"] or rounds[0]["participants"] != 20:
        raise CheckFailed(f"{name}: simulate report {rounds}")
    figures[f"{name}_simulate_s"] = took
    print(f"ok  {name}: scaleout simulate, 20 clients over 2 combiners, 1 round succeeded in {took}s", flush=True)


def check_mixed(zipapp: list[str], frozen: list[str], source: list[str], work: Path, figures: dict[str, object]) -> None:
    base = work / "mixed"
    pkg = base / "client"
    shutil.copytree(QUICKSTART, pkg, ignore=shutil.ignore_patterns("*.npz", "__pycache__"))
    data = base / "controller"
    logs = base / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        ctl, url = start(
            zipapp + ["serve", "--data-dir", str(data), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], logs / "controller-zipapp.log", True
        )
        procs.append(ctl)
        admin = ["--data-dir", str(data)]
        run(frozen + ["run", "build", "-p", str(pkg)])
        run(zipapp + ["package", "create", "--path", str(pkg)])
        run(frozen + ["package", "set-active", str(base / "client.tgz"), *admin])
        run(zipapp + ["model", "set-seed", str(pkg / "seed.npz"), *admin])
        (base / "combiner.token").write_text(run(zipapp + ["token", "create", "--role", "combiner", *admin]).stdout.strip())
        (base / "client.token").write_text(run(frozen + ["token", "create", "--role", "client", *admin]).stdout.strip())
        assert url is not None
        link = ["--controller", url, "--ca", str(data / "ca.pem")]
        comb, _ = start(frozen + ["combine", *link, "--token", f"@{base / 'combiner.token'}", "--name", "c-frozen", "--port", "0"], logs / "combiner-frozen.log", True)
        procs.append(comb)
        clients = {"source": source, "zipapp": zipapp, "frozen": frozen}
        joined: dict[str, Connected] = {}
        for kind, cmd in clients.items():
            c = Connected(cmd + ["join", *link, "--token", f"@{base / 'client.token'}", "--name", f"client-{kind}", "--work-dir", str(base / f"work-{kind}")], logs / f"client-{kind}.log")
            joined[kind] = c
            procs.append(c.proc)
        # One download, one command: the join token alone (address and CA fingerprint inside).
        c = Connected(frozen + ["join", f"@{base / 'client.token'}", "--name", "client-token", "--work-dir", str(base / "work-token")], logs / "client-token.log")
        procs.append(c.proc)
        r = run(zipapp + ["session", "start", "--rounds", "2", "--min-clients", "4", "--round-timeout", "120", "--wait", "--json", *admin], timeout=600)
        session = json.loads(r.stdout)
        session = session.get("session", session)
        statuses = [x["status"] for x in session["rounds"]]
        if session["status"] != "finished" or statuses != ["succeeded", "succeeded"]:
            raise CheckFailed(f"mixed session: {session['status']} rounds {statuses}")
        listing = json.loads(run(frozen + ["client", "ls", "--json", *admin]).stdout)
        names = listing["clients"] if isinstance(listing, dict) else listing
        figures["mixed_session_s"] = round(time.perf_counter() - t0, 1)
        scraped = scrape(data)
        for sample in ('scaleout_rounds_total{status="succeeded"} 2.0', "scaleout_clients_connected 3.0"):
            if sample not in scraped.splitlines():
                raise CheckFailed(f"the zipapp controller's metrics lack {sample!r}:\n{scraped[-3000:]}")
        for kind, c in joined.items():  # idle now: the session is over, the clients stay connected
            figures[f"{kind}_client_connect_s"] = c.seconds
            figures[f"{kind}_client_idle_rss_mb"] = rss_mb(c.proc.pid)
        print("ok  clients: start to connected " + ", ".join(f"{k} {c.seconds}s" for k, c in joined.items())
              + "; idle RSS " + ", ".join(f"{k} {figures[f'{k}_client_idle_rss_mb']} MB" for k in joined), flush=True)
        print(f"ok  mixed: zipapp controller, frozen combiner, source+zipapp+frozen clients and a frozen one joined with the join token alone: "
              f"2 rounds succeeded in {figures['mixed_session_s']}s ({len(names)} clients)", flush=True)
    except BaseException:
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        codes = stop(procs)
    bad = [log.name for log in logs.glob("*.log") if "Traceback" in log.read_text(errors="replace")]
    if bad:
        raise CheckFailed(f"tracebacks in {bad}")
    if any(c not in (0, -signal.SIGTERM) for c in codes):
        raise CheckFailed(f"roles exited {codes} on SIGTERM (expected 0)")


def scrape(data: Path) -> str:
    """The text at the metrics_url a controller wrote to DATA/controller.json."""
    import urllib.request

    url = json.loads((data / "controller.json").read_text())["metrics_url"]
    with urllib.request.urlopen(url, timeout=30) as reply:
        return str(reply.read().decode())


def check_metrics_port(name: str, cmd: list[str], work: Path) -> None:
    data = work / f"metrics-{name}"
    ctl, _ = start(cmd + ["serve", "--data-dir", str(data), "--port", "0", "--metrics-port", "0"], work / f"metrics-{name}.log", True)
    try:
        text = scrape(data)
    finally:
        codes = stop([ctl])
    if 'scaleout_rounds_total{status="succeeded"} 0.0' not in text.splitlines() or codes[0] not in (0, -signal.SIGTERM):
        raise CheckFailed(f"{name}: serve --metrics-port exited {codes} and served:\n{text[-2000:]}")
    print(f"ok  {name}: serve --metrics-port serves Prometheus metrics ({len(text.splitlines())} lines)", flush=True)


def check_other_python(python: str, work: Path, figures: dict[str, object]) -> None:
    """The same .pyz under another CPython minor version: its own native modules are inside."""
    version = run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).stdout.strip()
    carried = (ROOT / "build" / "zipapp-out" / "versions.txt").read_text().split()
    if version not in carried:  # the build found no wheels for it (offline, or not released yet)
        print(f"skip zipapp under Python {version}: the build carries {', '.join(carried)} only", flush=True)
        return
    zipapp = [python, str(ROOT / "dist" / "scaleout.pyz")]
    out = run(zipapp + ["--version"]).stdout.strip()
    check_dev(f"zipapp-py{version}", zipapp, work, figures)
    print(f"ok  zipapp under Python {version}: {out}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-python", required=True, help="a Python with scaleout installed from this tree (the source build)")
    ap.add_argument("--zipapp-python", default="python3", help="the bare Python that runs the zipapp (default: python3 on PATH)")
    ap.add_argument("--other-python", action="append", default=[], metavar="PYTHON",
                    help="another bare CPython (another minor version) that must run the zipapp too; repeatable")
    args = ap.parse_args()
    for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        if var in os.environ:
            print(f"dist-check must run in a clean environment, but {var} is set", file=sys.stderr)
            return 2
    zipapp = [shutil.which(args.zipapp_python) or args.zipapp_python, str(ROOT / "dist" / "scaleout.pyz")]
    frozen = [str(ROOT / "dist" / "scaleout")]
    source = [args.source_python, "-m", "scaleout"]
    figures: dict[str, object] = {"zipapp_python": zipapp[0], "home": os.environ.get("HOME")}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scaleout-dist-check-") as tmp:
        work = Path(tmp)
        try:
            probe = "import importlib.util as u; print([m for m in ('scaleout', 'numpy', 'websockets', 'safetensors') if u.find_spec(m)])"
            present = run([zipapp[0], "-c", probe]).stdout.strip()
            if present != "[]":
                raise CheckFailed(f"{zipapp[0]} has {present} installed: the zipapp must be checked with a Python that lacks them")
            check_version("zipapp", zipapp, "zipapp", figures)
            check_version("frozen", frozen, "frozen", figures)
            check_version("source", source, "source", figures)
            check_launcher(frozen, work, figures)
            check_missing_module("zipapp", zipapp, work)
            check_missing_module("frozen", frozen, work)
            check_dev("zipapp", zipapp, work, figures)
            check_dev("frozen", frozen, work, figures)
            check_dev_tui("zipapp", zipapp, work, figures)
            check_dev_tui("frozen", frozen, work, figures)
            check_simulate("zipapp", zipapp, work, figures)
            check_simulate("frozen", frozen, work, figures)
            check_mixed(zipapp, frozen, source, work, figures)
            check_metrics_port("frozen", frozen, work)
            for other in args.other_python:
                check_other_python(other, work, figures)
        except (CheckFailed, subprocess.TimeoutExpired) as exc:
            print(f"FAIL {exc}", flush=True)
            return 1
    figures["sizes_bytes"] = {p.name: p.stat().st_size for p in (ROOT / "dist" / "scaleout.pyz", ROOT / "dist" / "scaleout")}
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
