"""Sending a model over a Link against a plain asyncio TLS stream, measured in the same run.

Ours: `send_blob` (1 MiB chunks, sha256) then a request naming the blob, over a TLS websocket
made by `transport.net.serve`/`connect` with token auth; the receiver checks the sha256 and
replies. Baseline: the same bytes through `asyncio.start_server` with the same server TLS
context (write + drain, readexactly), the same sha256 check and a one-line ack. Each side has
its own receiver process on 127.0.0.1 port 0, so its peak RSS growth can be reported.
Timing covers send to acknowledgement; connections are open before the clock starts.
Prints JSON: median seconds, MiB/s, the sender's CPU seconds (all its threads: steadier than
wall time on a busy machine), peak receiver RSS growth and the ratios ours/baseline.

    .venv/bin/python benchmarks/transfer.py [--mib 64] [--repeat 5] [--fanout 10]

``--fanout N`` sends the payload over N connections of each kind at once (a combiner
sending a model to N clients); times are for all N, both ways, in the same run.

With ``--roles``, the model instead goes controller -> combiner -> client and the update back
client -> combiner -> controller through real roles (`scaleout simulate`, one combiner, one
client, ``--repeat`` rounds), against a bare `websockets` TLS link sending the same bytes in
1 MiB messages (one hop, timed in the same run; two hops are twice that). Prints the median
out and back times, MB/s over the two hops, the ratio to the bare link, peak RSS per role and
the CPU seconds each role used for the whole run (``cpu_s``: steadier than wall time when
other work shares the machine).

    .venv/bin/python benchmarks/transfer.py --roles [--mib 100] [--repeat 3] [--clients 2]

``--clients N`` relays the model to N simulated clients (one process) and their updates
back. Each role's peak RSS (VmHWM) is printed in MiB (``peak_rss_mb``, as simulate names it) and as a ratio to the model's size
(``peak_rss_ratio``; issue 17's target: controller and combiner within 1.25 GB for a
1 GB model, i.e. about 1.25x); the clients' process holds each client's copy of the model
and the synthetic update, so its figure grows with N.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import inspect
import json
import os
import resource
import secrets
import selectors
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from scaleout.core import messages as m
from scaleout.core.errors import AuthError, ProtocolError
from scaleout.core.payload import encode
from scaleout.security.tls import client_context, create_ca, issue_cert, server_context, write_private
from scaleout.transport.link import CHUNK_BYTES, DEFAULT_MAX_PAYLOAD, Link
from scaleout.transport.net import connect, serve

TOKEN_ENV = "SCALEOUT_BENCH_TOKEN"
START_TIMEOUT_S = 30.0
HEADER_BYTES = 8 + 32  # baseline framing: payload size (u64, big-endian) and its sha256


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process.

    On Linux this reads /proc: getrusage's ru_maxrss there survives fork and exec, so a
    receiver would start with the peak of the parent that holds the payload.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
        return peak, peak
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


# -- receiver (a child process) -------------------------------------------------------------


Check = Callable[[bytes, str], dict[str, Any]]


async def link_receiver(ctx: ssl.SSLContext, token: str, check: Check) -> tuple[str, Callable[[], None]]:
    """Ours: a Link server; a `put` request names the payload sent just before it."""

    def authenticate(presented: str | None) -> dict[str, str]:
        if presented is None or not hmac.compare_digest(presented, token):
            raise AuthError("wrong token")
        return {"role": "bench"}

    async def on_request(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        if req.op != "put" or blob is None:
            raise ProtocolError(f"expected a put with a payload, got {req.op}")
        return check(blob, str(req.args["sha256"])), None

    async def on_link(link: Link) -> None:
        await link.run(on_request=on_request)

    server, port = await serve(on_link, authenticate, "127.0.0.1", 0, ctx, max_payload=DEFAULT_MAX_PAYLOAD)
    return f"wss://127.0.0.1:{port}", server.close


async def tls_receiver(ctx: ssl.SSLContext, check: Check) -> tuple[str, Callable[[], None]]:
    """Baseline: size and sha256 in a fixed header, then the bytes; a JSON line back."""

    async def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while header := await reader.readexactly(HEADER_BYTES):
                data = await reader.readexactly(int.from_bytes(header[:8], "big"))
                writer.write(json.dumps(check(data, header[8:].hex())).encode() + b"\n")
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the sender is done
        finally:
            writer.close()

    server = await asyncio.start_server(on_stream, "127.0.0.1", 0, ssl=ctx)
    return f"tls://127.0.0.1:{server.sockets[0].getsockname()[1]}", server.close


async def receive(kind: str, tls_dir: Path) -> None:
    """Serve one kind of receiver until stdin closes; print the ready line first."""
    ctx = server_context(tls_dir / "server.pem", tls_dir / "server.key")
    rss_at_ready = 0

    def check(data: bytes, sha256: str) -> dict[str, Any]:
        ok = hashlib.sha256(data).hexdigest() == sha256
        # cpu_s: this process's CPU seconds so far (all threads); the sender takes differences.
        return {"ok": ok, "size": len(data), "rss_growth": rss_bytes()[1] - rss_at_ready, "cpu_s": time.process_time()}

    if kind == "link":
        url, close = await link_receiver(ctx, os.environ[TOKEN_ENV], check)
    else:
        url, close = await tls_receiver(ctx, check)
    rss_at_ready = rss_bytes()[0]
    print(f"listening on {url}", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # the parent closes our stdin when it is done
    close()


class Receiver:
    """A receiver child process; `url` is what it announced on its ready line."""

    def __init__(self, kind: str, tls_dir: Path, token: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, __file__, "--receive", kind, "--tls-dir", str(tls_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, TOKEN_ENV: token},
        )
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        assert self.popen.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            if sel.select(START_TIMEOUT_S):
                line = self.popen.stdout.readline().decode()
                if line.startswith("listening on "):
                    return line.removeprefix("listening on ").strip()
        self.stop()
        raise SystemExit(f"receiver did not start within {START_TIMEOUT_S:.0f}s (exit code {self.popen.returncode})")

    def stop(self) -> None:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.close()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.popen.stdout.close()


# -- sender (this process) ------------------------------------------------------------------


Send = Callable[[bytes, str], Awaitable[dict[str, Any]]]


async def link_sender(url: str, token: str, ctx: ssl.SSLContext) -> tuple[Send, Callable[[], Awaitable[None]]]:
    link = await connect(url, token, ctx, max_payload=DEFAULT_MAX_PAYLOAD)
    reader = asyncio.create_task(link.run())
    # The digest is known (a role sending a model knows its id): the link need not hash again.
    # (An older Link.request takes no digest: this script then measures it as it was.)
    known = "sha256" in inspect.signature(link.request).parameters

    async def send(data: bytes, sha256: str) -> dict[str, Any]:
        # request() = send_blob(data) then a request whose `blob` names that transfer.
        result, _ = await link.request("put", {"sha256": sha256}, blob=data, **({"sha256": sha256} if known else {}))
        return result

    async def close() -> None:
        await link.ws.close()
        await reader

    return send, close


async def tls_sender(url: str, ctx: ssl.SSLContext) -> tuple[Send, Callable[[], Awaitable[None]]]:
    host, port = url.removeprefix("tls://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)

    async def send(data: bytes, sha256: str) -> dict[str, Any]:
        writer.write(len(data).to_bytes(8, "big") + bytes.fromhex(sha256))
        # The same 1 MiB pieces as send_blob: one 64 MiB write makes asyncio's TLS
        # transport encrypt it all into one buffer first, which is ~2.5x slower.
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK_BYTES):
            writer.write(view[offset : offset + CHUNK_BYTES])
            await writer.drain()
        result: dict[str, Any] = json.loads(await reader.readline())
        return result

    async def close() -> None:
        writer.close()
        await writer.wait_closed()

    return send, close


async def compare(data: bytes, urls: dict[str, str], token: str, ca: Path, repeat: int, fanout: int = 1) -> dict[str, dict[str, list[float]]]:
    """Send ``data`` ``repeat`` times each way; with ``fanout`` > 1, over that many connections
    of each kind at once (the same bytes to each, as a combiner sends a model to its clients)."""
    ctx = client_context(ca)
    sha256 = hashlib.sha256(data).hexdigest()
    senders = {
        "ours": [await link_sender(urls["ours"], token, ctx) for _ in range(fanout)],
        "baseline": [await tls_sender(urls["baseline"], ctx) for _ in range(fanout)],
    }
    figures: dict[str, dict[str, list[float]]] = {k: {"times": [], "rss": [], "cpu": [], "rcpu": []} for k in senders}
    last_rcpu: dict[str, float] = {}
    try:
        for _ in range(repeat):
            for kind, group in senders.items():  # interleaved, so drift hits both alike
                t0, c0 = time.perf_counter(), time.process_time()
                results = await asyncio.gather(*(send(data, sha256) for send, _ in group))
                figures[kind]["times"].append(time.perf_counter() - t0)
                figures[kind]["cpu"].append(time.process_time() - c0)  # the sender's CPU (all its threads): less noisy than wall time
                for result in results:
                    if not result["ok"] or result["size"] != len(data):
                        raise SystemExit(f"{kind}: the receiver got different bytes: {result}")
                figures[kind]["rss"].append(max(r["rss_growth"] for r in results))
                rcpu = results[0]["cpu_s"]  # one receiver process per kind: its CPU for this send
                if kind in last_rcpu:  # the first send's figure would include the receiver's start
                    figures[kind]["rcpu"].append(rcpu - last_rcpu[kind])
                last_rcpu[kind] = rcpu
    finally:
        for group in senders.values():
            for _, close in group:
                await close()
    return figures


def payload_of(mib: float) -> bytes:
    n = int(mib * 2**20) // 4
    return encode({"w": np.random.default_rng(0).standard_normal(n, dtype=np.float32)})


def write_tls(tls_dir: Path) -> None:
    ca_pem, ca_key = create_ca("Scaleout bench CA", days=1)
    cert_pem, key_pem = issue_cert(ca_pem, ca_key, ["127.0.0.1"], "Scaleout bench receiver", days=1)
    (tls_dir / "ca.pem").write_bytes(ca_pem)
    (tls_dir / "server.pem").write_bytes(cert_pem)
    write_private(tls_dir / "server.key", key_pem)


def _bare_receiver(port_box: Any, tls_dir: Path, size: int) -> None:
    """A bare websockets TLS server (child process): replies once ``size`` bytes arrived."""
    from websockets.asyncio.server import serve as ws_serve

    async def main() -> None:
        async def handler(ws: Any) -> None:
            got = 0
            async for message in ws:
                got += len(message)
                if got >= size:
                    await ws.send("done")
                    got = 0

        ctx = server_context(tls_dir / "server.pem", tls_dir / "server.key")
        async with ws_serve(handler, "127.0.0.1", 0, ssl=ctx, max_size=2 << 20, compression=None) as server:
            port_box.put(server.sockets[0].getsockname()[1])
            await asyncio.Future()

    asyncio.run(main())


def bare_websocket_seconds(mib: float, repeat: int, tls_dir: Path) -> list[float]:
    """Seconds to send ``mib`` MiB in 1 MiB messages over a bare websockets TLS link."""
    import multiprocessing

    from websockets.asyncio.client import connect as ws_connect

    size = int(mib * 2**20)
    box: Any = multiprocessing.Queue()
    proc = multiprocessing.Process(target=_bare_receiver, args=(box, tls_dir, size), daemon=True)
    proc.start()
    try:
        port = box.get(timeout=30)

        async def send() -> list[float]:
            chunk = secrets.token_bytes(1 << 20)
            times = []
            async with ws_connect(f"wss://127.0.0.1:{port}", ssl=client_context(tls_dir / "ca.pem"), compression=None, max_size=2 << 20, proxy=None) as ws:
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    for offset in range(0, size, 1 << 20):
                        await ws.send(chunk[: min(1 << 20, size - offset)])
                    await ws.recv()
                    times.append(time.perf_counter() - t0)
            return times

        return asyncio.run(send())
    finally:
        proc.terminate()
        proc.join()


ROLE_COMMANDS = {b"simulate-clients": "clients_process", b"combine": "combiner", b"serve": "controller"}


def _children(parent: int) -> list[Path]:
    """The /proc entries of ``parent``'s child processes: read from its tasks' ``children``
    lists, so a poll costs a few reads, not a walk of every process on the machine (that
    walk, 5 times a second, took CPU from the roles being measured on a busy box)."""
    pids: set[str] = set()
    try:
        for task in Path(f"/proc/{parent}/task").iterdir():
            pids.update((task / "children").read_text().split())
    except OSError:  # no such file (an old kernel) or the process is gone: look at every process
        return [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    return [Path("/proc") / pid for pid in sorted(pids)]


def _poll_roles(parent: int, peaks: dict[int, float], cpu: dict[str, float]) -> None:
    """Note the peak RSS of each `scaleout simulate-clients` process under ``parent`` (simulate
    reports only the controller's and the combiners') and the CPU seconds each role has used
    so far (polled: the last reading before it exits; steadier than wall time on a busy box)."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in _children(parent):
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        role = next((name for word, name in ROLE_COMMANDS.items() if word in cmdline[3:4]), None)
        if role is None or int(fields.get("PPid", "0")) != parent:
            continue
        cpu[role] = round((int(stat[11]) + int(stat[12])) / tick, 2)  # utime + stime
        if role == "clients_process" and "VmHWM" in fields:
            peaks[int(entry.name)] = round(int(fields["VmHWM"].split()[0]) / 1024, 1)  # MiB, as simulate reports


def roles(mib: float, repeat: int, clients: int = 1) -> dict[str, Any]:
    """The model out and the update back through real roles, against the bare link."""
    params = max(1, int(mib * 2**20) // 4)
    with tempfile.TemporaryDirectory(prefix="scaleout-bench-") as tmp:
        tls_dir = Path(tmp)
        write_tls(tls_dir)
        bare = statistics.median(bare_websocket_seconds(params * 4 / 2**20, repeat, tls_dir))
        report = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "scaleout", "simulate", "--clients", str(clients), "--combiners", "1", "--rounds", str(repeat),
               "--model-size", str(params), "--round-timeout", str(max(300, round(mib * 3))), "--report", str(report)]
        sim = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client_peaks: dict[int, float] = {}
        cpu: dict[str, float] = {}
        while sim.poll() is None:
            _poll_roles(sim.pid, client_peaks, cpu)
            time.sleep(0.2)  # a sampling period, not a synchronisation
        out_text, err_text = sim.communicate()
        if sim.returncode != 0:
            raise SystemExit(f"simulate failed:\n{out_text}\n{err_text}")
        data = json.loads(report.read_text())
    size_mb = params * 4 / 1e6
    peaks = {"controller": data["peak_rss_mb"]["controller"], "combiner": max(data["peak_rss_mb"]["combiners"].values())}
    if client_peaks:
        peaks["clients_process"] = max(client_peaks.values())
    out = statistics.median(r["timing"]["distribute_s"] for r in data["rounds"])
    back = statistics.median(r["timing"]["collect_s"] + r["timing"]["reduce_s"] for r in data["rounds"])
    return {
        "benchmark": "transfer_through_roles", "model_mb": round(size_mb, 1), "rounds": repeat,
        "baseline": "bare websockets TLS link, 1 MiB messages, one hop, same run (two hops = 2x)",
        "bare_one_hop_s": round(bare, 3), "bare_mb_per_s": round(size_mb / bare, 1),
        "out_s": round(out, 3), "back_s": round(back, 3),
        "out_mb_per_s_per_hop": round(2 * size_mb / out, 1), "back_mb_per_s_per_hop": round(2 * size_mb / back, 1),
        "out_ratio": round(2 * bare / out, 3), "back_ratio": round(2 * bare / back, 3), "target_ratio": 0.8,
        "clients": clients, "cpu_s": cpu, "peak_rss_mb": peaks,
        "peak_rss_ratio": {role: round(mb * 2**20 / (params * 4), 3) for role, mb in peaks.items() if mb},  # peak (MiB) over the model
        "target_peak_rss_ratio": 1.25 if size_mb >= 1000 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roles", action="store_true", help="through real roles (controller, combiner, client) instead of one link")
    ap.add_argument("--mib", type=float, default=64.0, help="payload size in MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--fanout", type=int, default=1, help="send the payload over this many connections at once (each way)")
    ap.add_argument("--clients", type=int, default=1, help="with --roles: simulated clients the model is relayed to (default 1)")
    ap.add_argument("--receive", choices=("link", "tls"), help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.receive:
        asyncio.run(receive(a.receive, a.tls_dir))
        return
    if a.mib <= 0 or a.repeat < 1 or a.clients < 1 or a.fanout < 1:
        ap.error("--mib must be > 0, --repeat, --clients and --fanout >= 1")
    if a.roles:
        print(json.dumps(roles(a.mib, a.repeat, a.clients)))
        return

    data = payload_of(a.mib)
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="scaleout-bench-") as tmp:
        tls_dir = Path(tmp)
        write_tls(tls_dir)
        receivers: dict[str, Receiver] = {}
        try:
            receivers["ours"] = Receiver("link", tls_dir, token)
            receivers["baseline"] = Receiver("tls", tls_dir, token)
            figures = asyncio.run(compare(data, {k: r.url for k, r in receivers.items()}, token, tls_dir / "ca.pem", a.repeat, a.fanout))
        finally:
            for r in receivers.values():
                r.stop()

    mib = len(data) / 2**20
    t_ours, t_base = (statistics.median(figures[k]["times"]) for k in ("ours", "baseline"))
    m_ours, m_base = (max(figures[k]["rss"]) for k in ("ours", "baseline"))
    c_ours, c_base = (statistics.median(figures[k]["cpu"]) for k in ("ours", "baseline"))
    r_ours, r_base = (statistics.median(figures[k]["rcpu"]) if figures[k]["rcpu"] else float("nan") for k in ("ours", "baseline"))
    print(json.dumps({
        "benchmark": "link_blob_vs_plain_tls_stream",
        "payload_mib": round(mib, 2), "repeat": a.repeat, "connections": a.fanout,
        "ours_s": round(t_ours, 4), "baseline_s": round(t_base, 4), "time_ratio": round(t_ours / t_base, 3),
        "ours_sender_cpu_s": round(c_ours, 4), "baseline_sender_cpu_s": round(c_base, 4), "sender_cpu_ratio": round(c_ours / c_base, 3),
        "ours_receiver_cpu_s": round(r_ours, 4), "baseline_receiver_cpu_s": round(r_base, 4), "receiver_cpu_ratio": round(r_ours / r_base, 3),
        "ours_mib_per_s": round(mib / t_ours, 1), "baseline_mib_per_s": round(mib / t_base, 1),
        "ours_receiver_peak_rss_growth_mib": round(m_ours / 2**20, 1),
        "baseline_receiver_peak_rss_growth_mib": round(m_base / 2**20, 1),
        "memory_ratio": round(m_ours / m_base, 3) if m_base else None,
    }, indent=2))


if __name__ == "__main__":
    main()
