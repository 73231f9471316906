"""Shutting down on SIGTERM: promptly, with exit code 0 (130 on Ctrl-C), and leaving no process behind.

A client inside a train callback (one that checks for the abort and one that never does),
a client stalled on a controller that never answers, a combiner in the middle of a round,
and `scaleout dev`, whose children must all be gone once it has exited. Readiness is a
line on a process's stdout (or a frame reaching a fake controller), never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FIXTURES, QUICKSTART, START_TIMEOUT, Federation, Proc, wait_line, wait_stdout
from websockets.asyncio.client import connect
from websockets.sync.server import ServerConnection, serve

from scaleout.commands.admin import call_async
from scaleout.core import messages as m
from scaleout.security.tls import client_context

SLOW = FIXTURES / "slow_client"
PROMPT_S = 5.0  # the client's abort grace is 2 s; anything near 5 s is a shutdown that waited

STUBBORN_STARTUP = '''\
"""A train callback that never calls check_task_abort(): it just takes a long time."""

import time


def startup(client):
    def train(model, settings):
        print("stubborn: training", flush=True)
        time.sleep(120)
        return model, {"training_metadata": {"num_examples": 1}}

    client.set_train_callback(train)
'''


def training(fed: Federation, package: Path, marker: str) -> Proc:
    """A federation with one client of ``package``, stuck in round 1's train callback."""
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    client = fed.client("slow", package=package)
    fed.wait_clients(1)
    fed.admin("session.start", {"rounds": 1, "min_clients": 1, "round_timeout": 60, "validate": False, "settings": {"slow_s": 20}})
    wait_stdout(client, marker)
    return client


def stop_promptly(proc: Proc, sig: signal.Signals = signal.SIGTERM) -> int:
    started = time.monotonic()
    code = proc.stop(timeout=15, sig=sig)
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT_S, f"{proc.name} took {elapsed:.1f}s to exit after SIGTERM:\n{proc.text()}"
    return code


# -- join ------------------------------------------------------------------------------------


def test_sigterm_aborts_a_train_callback_that_checks_for_it(fed: Federation) -> None:
    client = training(fed, SLOW, "slow_client: training")
    assert stop_promptly(client) == 0
    log = client.text()
    assert "SIGTERM received" in log, log
    assert "did not return within" not in log, log


def test_sigterm_does_not_wait_for_a_train_callback_that_ignores_the_abort(fed: Federation) -> None:
    package = fed.tmp / "stubborn"
    package.mkdir()
    (package / "scaleout.yaml").write_text((SLOW / "scaleout.yaml").read_text())
    (package / "startup.py").write_text(STUBBORN_STARTUP)
    client = training(fed, package, "stubborn: training")
    assert stop_promptly(client) == 0
    log = client.text()
    assert "did not return within 2s of the abort" in log and "check_task_abort" in log, log


def test_ctrl_c_mid_training_exits_130_and_says_the_client_is_shutting_down(fed: Federation) -> None:
    client = training(fed, SLOW, "slow_client: training")
    assert stop_promptly(client, signal.SIGINT) == 130
    log = client.text()
    assert "SIGINT received" in log and "task aborted: the client is shutting down" in log, log
    assert "the session was stopped" not in log, log
    combiner = next(p for p in fed.procs if p.name == "c1")
    assert stop_promptly(combiner, signal.SIGINT) == 130
    assert "SIGINT received" in combiner.text()


CHATTY = FIXTURES / "chatty_client"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_client_whose_train_callback_logs_metrics_nonstop_still_stops_on_a_signal(fed: Federation, sig: signal.Signals, code: int) -> None:
    # log_metric in a tight loop filled the loop's wakeup socket: the signal was lost
    # ("Exception ignored when trying to write to the signal wakeup fd") and the round went on.
    client = training(fed, CHATTY, "chatty_client: training")
    assert stop_promptly(client, sig) == code
    log = client.text()
    assert f"{sig.name} received" in log, log
    assert "signal wakeup fd" not in log, log
    assert "validating" not in log, log


@pytest.fixture
def silent_controller() -> Iterator[tuple[str, threading.Event]]:
    """A plain-websocket "controller" that takes requests and never answers them.

    Yields its ws:// URL and an event set once a request frame has arrived.
    """
    asked = threading.Event()
    release = threading.Event()

    def handler(ws: ServerConnection) -> None:
        ws.recv()
        asked.set()
        release.wait()

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}", asked
        finally:
            release.set()
            server.shutdown()
            thread.join(10)


def test_sigterm_cancels_a_request_the_controller_never_answers(fed: Federation, silent_controller: tuple[str, threading.Event]) -> None:
    url, asked = silent_controller
    args = ["join", "--controller", url, "--token", "any", "--insecure", "--name", "stalled", "--work-dir", str(fed.tmp / "stalled")]
    client = Proc("stalled", args, fed.logs, False)
    fed.procs.append(client)
    assert asked.wait(START_TIMEOUT), f"the client never asked for the package:\n{client.text()}"
    assert stop_promptly(client) == 0  # package.get waits up to 600 s for its reply


# -- combine ---------------------------------------------------------------------------------


def test_sigterm_stops_a_combiner_in_the_middle_of_a_round(fed: Federation) -> None:
    training(fed, SLOW, "slow_client: training")
    combiner = next(p for p in fed.procs if p.name == "c1")
    assert stop_promptly(combiner) == 0
    assert "SIGTERM received" in combiner.text()


def test_sigterm_does_not_wait_for_a_client_that_never_answers_the_close(fed: Federation) -> None:
    # The combiner closes its links and waits for each client's answer. A link it no longer
    # reads (its receive queue full: a client logging metrics in a tight loop) shows neither
    # the answer nor the client's exit, and websockets waits 10 s for it: `scaleout dev`
    # killed such a combiner. Here the client stops reading, so the answer never comes.
    fed.controller()
    combiner = fed.combiner("c1")
    assert combiner.url is not None
    headers = {"Authorization": f"Bearer {fed.assigned_ticket('mute')}"}

    async def go() -> int:
        async with connect(combiner.url, ssl=client_context(fed.ca), additional_headers=headers, proxy=None) as ws:
            await ws.send(json.dumps({"v": m.PROTOCOL_VERSION, "type": "hello", "id": "h1", "name": "mute"}))
            assert fed.conn is not None
            await call_async(fed.conn, "client.wait", {"count": 1, "timeout": START_TIMEOUT})
            ws.transport.pause_reading()
            code = await asyncio.to_thread(combiner.stop, 15)
            ws.transport.resume_reading()  # this side's close sees the combiner gone at once
            return code

    assert asyncio.run(go()) == 0
    log = combiner.text()
    assert "SIGTERM received" in log, log
    assert "did not close in time" not in log, log


# -- dev -------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid`` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def children_of(parent: int) -> dict[int, int]:
    """The live children of ``parent``: pid -> start time (a reused pid has another)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            state, ppid, start = stat
            if ppid == parent and state != "Z":
                found[int(entry.name)] = start
    return found


def alive(pid: int, start: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[2] == start and stat[0] != "Z"


@pytest.mark.parametrize("package, sig", [(SLOW, signal.SIGTERM), (CHATTY, signal.SIGINT)], ids=["slow-sigterm", "chatty-sigint"])
def test_sigterm_to_dev_stops_every_child_and_keeps_tokens_off_the_command_line(tmp_path: Path, package: Path, sig: signal.Signals) -> None:
    data = tmp_path / "dev"
    args = [
        "dev", "-p", str(package), "--clients", "2", "--rounds", "1", "--round-timeout", "60", "--no-validate",
        "--settings", json.dumps({"slow_s": 20}), "--headless", "--data-dir", str(data),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEOUT_")}
    with open(tmp_path / "dev.log", "wb") as stderr:
        dev = subprocess.Popen(
            [sys.executable, "-m", "scaleout", *args], stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
    children: dict[int, int] = {}
    try:
        assert dev.stdout is not None
        try:
            wait_line(dev.stdout, "session ", 2 * START_TIMEOUT, "scaleout dev")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{(tmp_path / 'dev.log').read_text()}") from None
        children = children_of(dev.pid)
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children}
        roles = sorted(next(a.decode() for a in argv if a in (b"serve", b"combine", b"join")) for argv in commands.values())
        assert roles == ["combine", "join", "join", "serve"], commands
        for pid, argv in commands.items():
            assert b"--token" not in argv, argv
            if b"serve" not in argv:
                assert b"SCALEOUT_TOKEN=" in Path(f"/proc/{pid}/environ").read_bytes(), argv

        dev.send_signal(sig)
        try:
            code = dev.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"scaleout dev ignored {sig.name}:\n{(tmp_path / 'dev.log').read_text()}") from None
        left = [pid for pid, start in children.items() if alive(pid, start)]
        assert not left, f"scaleout dev left {left} running"
        assert code == 130, (code, (tmp_path / "dev.log").read_text())
        log = (tmp_path / "dev.log").read_text()
        # Each child drained by itself within dev's grace; none had to be killed.
        assert "did not stop within" not in log, log + "".join(f"\n== {f.name}\n{f.read_text()}" for f in sorted((data / "logs").glob("*.log")))
        assert f"{sig.name} received: stopping the federation" in log and "Traceback" not in log, log
        for child_log in (data / "logs").glob("*.log"):
            assert "Traceback" not in child_log.read_text(), child_log
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
        if dev.stdout is not None:
            dev.stdout.close()
        for pid, start in children.items():  # orphans of a failed test must not outlive it
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)
