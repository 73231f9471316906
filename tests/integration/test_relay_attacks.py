"""Attacks on the combiner's streaming relay (issue 17 #1): what happens to the model's one
download and one mapping when clients come and go while it still arrives. Real controller
and combiner on 127.0.0.1 port 0 with TLS, the combiner behind the TCP relay of
test_streaming_relay (the test holds the model's last bytes); the client is a raw websocket."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import test_streaming_relay
from conftest import Federation, Proc, tmpfs
from test_client_limits import TIMEOUT, admin, frame, next_text
from test_failover import wait_stdout_log
from test_streaming_relay import CLIENTS, DROPPED, MIB, PACKAGE, Relay, seed, start, wait
from websockets.asyncio.client import connect

from scaleout.security.tls import client_context


relay = test_streaming_relay.relay  # the fixture: the combiner's way to the controller, through a TCP relay the test holds or cuts


def combiner_behind(fed: Federation, relay: Relay) -> Proc:
    args = ["combine", "--controller", f"wss://127.0.0.1:{relay.port}", "--token", fed.token("combiner"), "--ca", fed.ca, "--name", "c1", "--port", "0", "--state-dir", str(fed.tmp / "c1")]
    c1 = Proc("c1", args, fed.logs, True)
    fed.procs.append(c1)
    return c1


def clients_mid_relay(fed: Federation, relay: Relay, **config: Any) -> tuple[str, Proc, list[Proc], str]:
    """A session started with the combiner behind ``relay`` holding the model's last 6 of 16
    MiB: returns the model's id, the combiner, its clients (each holding part of the model)
    and the session's id."""
    model_id = seed(fed)
    c1 = combiner_behind(fed, relay)
    clients = [fed.client(name, package=PACKAGE) for name in CLIENTS]
    fed.wait_clients(len(CLIENTS))
    relay.arm(10 * MIB)
    session = start(fed, **config)
    assert relay.held.wait(30), c1.text()
    for client in clients:
        wait_stdout_log(client, f"of {16.0:.1f} MiB", timeout=20)  # part of the model is with each client
    return model_id, c1, clients, session


def test_a_client_back_mid_relay_gets_its_task_from_the_one_download(fed: Federation, relay: Relay) -> None:
    # A client whose link blips while the model is relayed to it: its send ends with the old
    # link, and the task ids were recorded only once the model was whole, so _resume found no
    # task to send again: the client, connected, was never given its task (the round waited
    # for it to time out). Sent again (_resend), the model must come from the download on its
    # way, not from a second one (in memory: the controller link keeps its payloads there).
    model_id = seed(fed)
    c1 = combiner_behind(fed, relay)
    url = c1.url
    assert url is not None
    headers = {"Authorization": f"Bearer {fed.assigned_ticket('r1')}"}
    ctx = client_context(fed.ca)

    async def go() -> dict[str, Any]:
        ws = await connect(url, ssl=ctx, additional_headers=headers, proxy=None, max_size=None)
        await ws.send(frame("hello", "h1", name="r1"))
        await admin(fed, "client.wait", {"count": 1, "timeout": TIMEOUT})
        relay.arm(10 * MIB)  # 10 of the model's 16 MiB reach the combiner; the rest waits
        config = {"rounds": 1, "min_clients": 1, "round_timeout": 30, "validate": False}
        session = (await admin(fed, "session.start", config))["session"]
        start = await next_text(ws, "blob")  # the model, relayed as it arrives
        assert start["sha256"] == model_id, start
        assert await asyncio.to_thread(relay.held.wait, 30)
        ws.transport.abort()  # gone mid-relay (a blip, no goodbye: the round waits for it) ...
        ws = await connect(url, ssl=ctx, additional_headers=headers, proxy=None, max_size=None)
        await ws.send(frame("hello", "h2", name="r1"))  # ... and back, its task not begun: sent again
        await asyncio.to_thread(wait_count, c1, "client r1 connected", 2)  # back
        relay.release()
        await asyncio.wait_for(next_text(ws, "task"), 20)  # the relayed send to its old link ended with it: this one is sent again, whole
        await ws.close()
        return (await admin(fed, "session.wait", {"id": session["id"]}))["session"]

    asyncio.run(go())
    # A download logs its progress at each quarter it passes, three lines: more, a second download.
    fetched = [line for line in c1.text().splitlines() if "receiving payload from" in line and "of 16.0 MiB" in line]
    assert len(fetched) == 3, "the model was downloaded from the controller more than once:\n" + "\n".join(fetched)
    assert c1.popen.poll() is None


def wait_count(proc: Proc, text: str, count: int, timeout: float = 30) -> None:
    """Wait until ``text`` is in ``count`` lines of a process's log (read as it grows, as wait_stdout_log)."""
    deadline = time.monotonic() + timeout
    while proc.text().count(text) < count:
        assert time.monotonic() < deadline and proc.popen.poll() is None, f"{proc.name} did not log {text!r} {count} times:\n{proc.text()}"
        time.sleep(0.05)  # the log file grows as the process writes: nothing to wait on


def test_a_full_temporary_disk_mid_relay_fails_the_round_cleanly_and_the_next_one_runs(fed: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The relayed model is written to a temporary file as it arrives; the disk under it fills
    # up halfway through (a real tmpfs: 8 MiB free for a 16 MiB model). The combiner must not
    # die, its clients must drop what they got and say why, and with room again the next
    # session runs on the same roles.
    disk = tmp_path / "tmpdisk"
    disk.mkdir()
    with tmpfs(disk, "64m"):  # once freed: room for the model and the two clients' updates
        filler = disk / "filler"
        filler.write_bytes(bytes(55 << 20))  # 9 MiB left, some of it for the combiner's own files
        fed.controller()
        seed(fed)
        monkeypatch.setenv("TMPDIR", str(disk))
        c1 = fed.combiner("c1")
        monkeypatch.delenv("TMPDIR")
        clients = [fed.client(name, package=PACKAGE) for name in CLIENTS]
        fed.wait_clients(len(CLIENTS))
        done = wait(fed, start(fed, round_timeout=20))
        assert done["status"] == "failed", done
        for client in clients:
            wait_stdout_log(client, DROPPED, timeout=20)
            line = next(x for x in client.text().splitlines() if DROPPED in x)
            assert "of 16.0 MiB arrived" in line and "payload could not be stored: No space left on device" in line, line  # not just "OSError"
            assert "training on model" not in client.text()
        assert "No space left on device" in c1.text(), c1.text()[-3000:]
        filler.unlink()
        done = wait(fed, start(fed))
        assert done["status"] == "finished" and sorted(done["rounds"][0]["participants"]) == CLIENTS, done
        for proc in [c1, *clients]:
            assert proc.popen.poll() is None


def test_a_client_that_stops_reading_holds_up_neither_the_relay_nor_the_others(fed: Federation) -> None:
    # Two raw clients take the model's first bytes and then never read again; the real client
    # beside them gets the whole model and trains on it while they still stall (one frame of
    # the send budget each, not the relay), the round goes on without them, and the combiner's
    # peak memory stays below two copies of the model (one mapping for every reader).
    fed.controller()
    model_id = seed(fed)
    c1 = fed.combiner("c1")
    assert c1.url is not None
    ctx = client_context(fed.ca)
    stalls = ["r1", "r2"]
    tickets = {name: fed.assigned_ticket(name) for name in stalls}

    async def go() -> dict[str, Any]:
        socks = []
        for name in stalls:
            ws = await connect(c1.url, ssl=ctx, additional_headers={"Authorization": f"Bearer {tickets[name]}"}, proxy=None, max_size=None, max_queue=1)
            await ws.send(frame("hello", f"h-{name}", name=name))
            socks.append(ws)
        s1 = fed.client("s1", package=PACKAGE)
        await admin(fed, "client.wait", {"count": 3, "timeout": TIMEOUT})
        config = {"rounds": 1, "min_clients": 1, "round_timeout": 20, "validate": False}
        session = (await admin(fed, "session.start", config))["session"]
        for ws in socks:
            await next_text(ws, "blob")  # the model started coming; from here on, nothing is read
        await asyncio.to_thread(wait_stdout_log, s1, f"training on model {model_id[:12]}", 30)
        assert "disconnected" not in c1.text(), c1.text()[-2000:]  # the stalled ones are still there, still owed bytes
        done = (await admin(fed, "session.wait", {"id": session["id"]}))["session"]
        for ws in socks:
            ws.transport.abort()
        return done

    done = asyncio.run(go())
    (rnd,) = done["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["s1"], rnd
    status = Path(f"/proc/{c1.popen.pid}/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert peak_kb < 250 * 1024, f"combiner peak RSS {peak_kb} kB"  # Python and its libraries ~120 MB, plus the model once (16 MiB) and frames
    assert c1.popen.poll() is None


def test_a_combiner_killed_mid_relay_leaves_clients_that_never_train_on_the_part_they_got(fed: Federation, relay: Relay) -> None:
    # kill -9 of the combiner while its clients hold 10 of the model's 16 MiB: they must not
    # train on it, must not die, and run the next session with the combiner back.
    model_id, c1, clients, first = clients_mid_relay(fed, relay, round_timeout=10)
    c1.popen.send_signal(signal.SIGKILL)
    assert c1.popen.wait(10) == -signal.SIGKILL
    relay.release()
    wait(fed, first)  # failed: its combiner is gone
    for client in clients:
        assert "training on model" not in client.text()
    back = combiner_behind(fed, relay)  # the same name and state dir
    assert back.url is not None
    fed.wait_clients(len(CLIENTS))
    done = wait(fed, start(fed))
    assert done["status"] == "finished" and sorted(done["rounds"][0]["participants"]) == CLIENTS, done
    for client in clients:
        assert client.text().count(f"training on model {model_id[:12]}") == 1  # the checked model, once
        assert client.popen.poll() is None


def test_a_session_stopped_mid_relay_leaves_clients_that_dropped_the_model_and_the_next_session_runs(fed: Federation, relay: Relay) -> None:
    model_id, c1, clients, first = clients_mid_relay(fed, relay)
    fed.admin("session.stop", {"id": first})
    wait(fed, first)
    relay.release()  # (the controller gives up its send of the model to a stopped round: the link drops)
    for client in clients:
        wait_stdout_log(client, DROPPED, timeout=20)  # told to drop it: no task will name it
        assert "training on model" not in client.text()
    done = wait(fed, start(fed))
    assert done["status"] == "finished" and sorted(done["rounds"][0]["participants"]) == CLIENTS, done
    for client in clients:
        assert client.text().count(f"training on model {model_id[:12]}") == 1
    for proc in [c1, *clients]:
        assert proc.popen.poll() is None
