"""Active and standby controllers on one PostgreSQL store (issue 18): the holder of the store's
lock is active, a standby answers status and health naming it and refuses the rest, and takes
over (resuming the running session) when the active one is SIGKILLed."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FIXTURES, Federation, Proc, scaleout, wait_line, wait_stdout

from scaleout.commands.connection import Connection

RECOVER = FIXTURES / "recover_client"
POLL = "0.2"  # SCALEOUT_LEASE_POLL_S: how often a standby tries the lock


@pytest.fixture(autouse=True)
def fast_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEOUT_LEASE_POLL_S", POLL)


def keygen(path: Path) -> Path:
    r = scaleout("store", "keygen", "--out", str(path))
    assert r.returncode == 0, r.stderr
    return path


def serve(fed: Federation, name: str, pg_url: str, key: Path) -> Proc:
    p = Proc(name, ["serve", "--data-dir", str(fed.tmp / name), "--port", "0", "--store", pg_url, "--key-file", str(key)], fed.logs, True)
    fed.procs.append(p)
    return p


def url_of(fed: Federation, name: str) -> str:
    return str(json.loads((fed.tmp / name / "controller.json").read_text())["url"])


def health(fed: Federation, name: str) -> tuple[int, dict[str, Any]]:
    ctx = ssl.create_default_context(cafile=str(fed.tmp / name / "ca.pem"))
    url = url_of(fed, name).replace("wss://", "https://") + "/api/v1/health"
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_active(fed: Federation, name: str, timeout: float = 30) -> None:
    """Ask the controller's health probe until it says active (a readiness probe's poll)."""
    deadline = time.monotonic() + timeout
    while health(fed, name)[0] != 200:
        assert time.monotonic() < deadline, f"{name} did not become active within {timeout}s:\n{fed.procs[-1].text()}"
        time.sleep(0.05)  # polling a process that is taking over: nothing to wait on


def cli(fed: Federation, token: str, ca: Path, controller: str, *args: str) -> subprocess.CompletedProcess[str]:
    return scaleout(*args, "--controller", controller, "--token", token, "--ca", str(ca))


def test_a_standby_names_the_active_one_and_takes_over_when_it_stops(fed: Federation, pg_url: str) -> None:
    key = keygen(fed.tmp / "store.key")
    a = serve(fed, "ctl-a", pg_url, key)
    serve(fed, "ctl-b", pg_url, key)
    a_url, b_url = url_of(fed, "ctl-a"), url_of(fed, "ctl-b")
    # One CA, sealed in the store by the first and unsealed by the second: any controller verifies every node.
    assert (fed.tmp / "ctl-a" / "ca.pem").read_bytes() == (fed.tmp / "ctl-b" / "ca.pem").read_bytes()
    ca = fed.tmp / "ctl-a" / "ca.pem"
    token = (fed.tmp / "ctl-a" / "admin.token").read_text().strip()
    assert not (fed.tmp / "ctl-b" / "admin.token").exists()  # a standby writes nothing of its own yet

    assert health(fed, "ctl-a") == (200, {"role": "active", "active": a_url})
    assert health(fed, "ctl-b") == (503, {"role": "standby", "active": a_url})

    r = cli(fed, token, ca, b_url, "status")
    assert r.returncode == 0 and r.stdout.strip() == f"standby, active is {a_url}", r.stdout + r.stderr
    r = cli(fed, token, ca, b_url, "status", "--json")
    assert r.returncode == 0, r.stderr
    assert {k: json.loads(r.stdout)[k] for k in ("role", "active")} == {"role": "standby", "active": a_url}
    r = cli(fed, token, ca, a_url, "status", "--json")
    assert {k: json.loads(r.stdout)[k] for k in ("role", "active")} == {"role": "active", "active": a_url}
    r = cli(fed, token, ca, f"{b_url},{a_url}", "status", "--json")  # of several, the active one answers
    assert {k: json.loads(r.stdout)[k] for k in ("role", "active")} == {"role": "active", "active": a_url}, r.stdout + r.stderr
    # Of several with none active (the other address refuses connections), the standby's answer,
    # kept from the one pass over them.
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        dead = f"wss://127.0.0.1:{closed.getsockname()[1]}"
        r = cli(fed, token, ca, f"{b_url},{dead}", "status", "--json")
    assert r.returncode == 0, r.stderr
    assert {k: json.loads(r.stdout)[k] for k in ("role", "active")} == {"role": "standby", "active": a_url}, r.stdout + r.stderr

    # A write at the standby alone is refused, naming the active address; given both, it goes there.
    r = cli(fed, token, ca, b_url, "token", "create", "--role", "client")
    assert r.returncode != 0 and "standby" in r.stderr and a_url in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli(fed, token, ca, f"{b_url},{a_url}", "token", "create", "--role", "client", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["role"] == "client"
    # An upload too: the standby refuses the request as standby before its payload, not as a payload over its limit.
    seed = fed.tmp / "seed.safetensors"
    save_file({"w": np.arange(4, dtype=np.float32)}, str(seed))
    r = cli(fed, token, ca, b_url, "model", "set-seed", str(seed))
    assert r.returncode != 0 and f"standby, active is {a_url}" in r.stderr and "exceeds" not in r.stderr, r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    r = cli(fed, token, ca, f"{b_url},{a_url}", "model", "set-seed", str(seed), "--json")
    assert r.returncode == 0, r.stderr
    r = cli(fed, token, ca, f"{b_url},{a_url}", "package", "set-active", str(RECOVER))
    assert r.returncode == 0, r.stderr

    # The Python API and the TUI's feed follow the standby to the active one as well.
    from scaleout import api
    from scaleout.core.errors import ScaleoutError
    from scaleout.tui.feed import Feed

    with api.Scaleout(f"{b_url},{a_url}", token=token, verify=str(ca)) as client:
        assert client.get_sessions()["count"] == 0
        assert client.set_active_model(seed)["tensors"] == 1
    with api.Scaleout(b_url, token=token, verify=str(ca)) as client:
        with pytest.raises(ScaleoutError, match=f"standby, active is {a_url}$") as info:
            client.get_sessions()
        assert info.value.code == "standby"

    async def feed_peer() -> str:
        feed = Feed(Connection(f"{b_url},{a_url}", token, ca, False))
        await feed.open()
        try:
            return str(feed.link.peer)
        finally:
            await feed.close()

    assert asyncio.run(feed_peer()) == a_url

    # The active one stops (its lock goes with its database session): the standby takes over.
    assert a.stop() == 0
    wait_active(fed, "ctl-b")
    r = cli(fed, token, ca, f"{a_url},{b_url}", "status", "--json")
    assert r.returncode == 0, r.stderr
    assert {k: json.loads(r.stdout)[k] for k in ("role", "active")} == {"role": "active", "active": b_url}
    assert "took over" in fed.procs[1].text()
    # A join token names every controller on the store, so a node
    # joining with it finds whichever is active.
    from scaleout.security.jointoken import parse

    r = cli(fed, token, ca, b_url, "token", "create", "--role", "client", "--json")
    assert r.returncode == 0, r.stderr
    urls = parse(json.loads(r.stdout)["join_token"]).urls
    assert a_url in urls and b_url in urls, urls


def test_a_wrong_or_open_key_file_is_refused(fed: Federation, pg_url: str) -> None:
    key = keygen(fed.tmp / "store.key")
    serve(fed, "ctl-a", pg_url, key)
    other = keygen(fed.tmp / "other.key")
    r = scaleout("serve", "--data-dir", str(fed.tmp / "ctl-x"), "--port", "0", "--store", pg_url, "--key-file", str(other), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "does not open the secrets in the store" in r.stderr and "Traceback" not in r.stderr, r.stderr
    other.chmod(0o644)
    r = scaleout("serve", "--data-dir", str(fed.tmp / "ctl-x"), "--port", "0", "--store", pg_url, "--key-file", str(other), timeout=60)
    assert r.returncode == 2 and f"chmod 600 {other}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = scaleout("serve", "--data-dir", str(fed.tmp / "ctl-x"), "--port", "0", "--store", pg_url, timeout=60)
    assert r.returncode == 2 and "needs --key-file" in r.stderr, r.stderr


def test_sigkill_of_the_active_in_round_3_the_standby_finishes_the_session(fed: Federation, pg_url: str) -> None:
    key = keygen(fed.tmp / "store.key")
    a = serve(fed, "ctl-a", pg_url, key)
    serve(fed, "ctl-b", pg_url, key)
    both = f"{url_of(fed, 'ctl-a')},{url_of(fed, 'ctl-b')}"
    fed.data = fed.tmp / "ctl-a"  # its CA (the same as ctl-b's) and admin token
    fed.conn = Connection(both, (fed.data / "admin.token").read_text().strip(), fed.data / "ca.pem", False)
    seed = fed.seed_from(RECOVER)
    fed.combiner("c1")  # given both addresses (fed.url)
    names = ["r1", "r2"]
    clients = [fed.client(name, package=RECOVER) for name in names]
    fed.wait_clients(2)
    gate = fed.tmp / "gate"
    config = {"rounds": 6, "round_timeout": 20, "min_clients": 2, "validate": False, "settings": {"gate": str(gate), "gate_from": 3}}
    session = fed.admin("session.start", config)[0]["session"]
    wait_stdout(clients[0], "recover_client: held")  # round 3's task is out

    a.popen.send_signal(signal.SIGKILL)
    killed = time.time()
    assert a.popen.wait(10) == -signal.SIGKILL
    gate.touch()  # the resumed round trains at once
    # The first train call after the kill is the resumed round's task reaching the client.
    assert clients[0].popen.stdout is not None
    while True:
        line = wait_line(clients[0].popen.stdout, "train ", 60, "client r1")
        at = float(line.rsplit("train ", 1)[1].strip(" )\n"))
        if at > killed:
            break
    failover = at - killed
    print(f"\nfailover: SIGKILL of the active controller -> the standby's first task of the resumed round: {failover:.2f} s")

    done = fed.admin("session.wait", {"id": session["id"]}, timeout=120)[0]["session"]
    assert done["status"] == "finished", done
    rounds = done["rounds"]
    assert [r["idx"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert all(r["status"] == "succeeded" for r in rounds), rounds
    parents = [r["parent"] for r in rounds]
    assert parents == [seed] + [r["model_id"] for r in rounds[:-1]]  # the trail is linked
    assert "took over" in fed.procs[1].text()
    # One signed audit head, in the store: the takeover rewrote nothing, and the log verifies
    # with either controller's data dir (the killed one's too), or with the key file alone.
    entries = fed.admin("audit.ls", {"limit": 0})[0]["entries"]
    assert "audit.head_rewritten" not in [e["action"] for e in entries] and "rewrote it" not in fed.procs[1].text()
    assert [e["detail"]["round"] for e in entries if e["action"] == "model.commit"] == [1, 2, 3, 4, 5, 6]
    for how in (["--data-dir", str(fed.tmp / "ctl-a")], ["--data-dir", str(fed.tmp / "ctl-b")], ["--key-file", str(key)]):
        r = scaleout("audit", "verify", "--store", pg_url, *how, "--json")
        assert r.returncode == 0, (how, r.stdout + r.stderr)
        assert json.loads(r.stdout)["entries"] == len(entries) and json.loads(r.stdout)["anchored"] == ["in the store (meta audit_anchor)"]
    result = fed.admin("audit.verify", {})[0]  # the active one (ctl-b) answers the same
    assert result["ok"] and result["entries"] == len(entries), result


def test_an_active_that_loses_its_lock_to_another_stops_at_once(fed: Federation, pg_url: str) -> None:
    """Its database session ended (an operator's pg_terminate_backend) and another session took
    the lock before it could take it again: it exits rather than be a second active; the
    standby takes over once that other session lets go."""
    import psycopg

    from scaleout.store.lease import LOCK_KEY

    key = keygen(fed.tmp / "store.key")
    a = serve(fed, "ctl-a", pg_url, key)
    serve(fed, "ctl-b", pg_url, key)
    with psycopg.connect(pg_url, autocommit=True) as other:
        (n,) = other.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s", (f"scaleout-lease-{a.popen.pid}",),
        ).fetchone()
        assert n == 1
        other.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))  # waits for the ended session's lock, and holds it
        assert a.popen.wait(30) == 75
    assert "another controller holds the store's lock now" in a.text()
    wait_active(fed, "ctl-b")


def test_an_active_whose_lock_session_ends_takes_it_again_when_nobody_else_has(fed: Federation, pg_url: str) -> None:
    import psycopg

    key = keygen(fed.tmp / "store.key")
    a = serve(fed, "ctl-a", pg_url, key)
    a_url = url_of(fed, "ctl-a")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (f"scaleout-lease-{a.popen.pid}",))
    wait_stdout_log(a, "took the store's lock again")
    assert health(fed, "ctl-a") == (200, {"role": "active", "active": a_url})
    assert a.popen.poll() is None


def wait_stdout_log(proc: Proc, text: str, timeout: float = 30) -> None:
    """Wait for ``text`` in a process's log (a line it writes once: read as it grows)."""
    deadline = time.monotonic() + timeout
    while text not in proc.text():
        assert time.monotonic() < deadline and proc.popen.poll() is None, f"{proc.name} did not log {text!r}:\n{proc.text()}"
        time.sleep(0.05)  # the log file grows as the process writes: nothing to wait on


def test_a_frozen_active_is_replaced_and_stops_when_it_wakes(fed: Federation, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGSTOP (a hung process on a machine whose kernel still answers TCP): the lock's session
    idles out on the server (SCALEOUT_LEASE_IDLE_S), the standby takes over, and the frozen one,
    resumed, finds the lock taken and exits 75 rather than act as a second active."""
    monkeypatch.setenv("SCALEOUT_LEASE_IDLE_S", "2")
    key = keygen(fed.tmp / "store.key")
    a = serve(fed, "ctl-a", pg_url, key)
    serve(fed, "ctl-b", pg_url, key)
    assert health(fed, "ctl-b")[0] == 503
    a.popen.send_signal(signal.SIGSTOP)
    try:
        wait_active(fed, "ctl-b", timeout=60)
    finally:
        a.popen.send_signal(signal.SIGCONT)
    assert a.popen.wait(60) == 75, a.text()
    assert "another controller holds the store's lock now" in a.text()


def test_status_given_several_addresses_dials_each_once(tmp_path: Path) -> None:
    """status of several addresses makes one pass over them (it made a second, to ask any, when
    none was active): seen at the listeners, which count the connections they accept (each
    closed at once: nobody answers, so status fails naming each address)."""
    import socket
    import threading

    from scaleout.security.tls import create_ca

    ca = tmp_path / "ca.pem"
    ca.write_bytes(create_ca()[0])
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    accepted = [0, 0]
    done = threading.Event()

    def serve(i: int) -> None:
        listeners[i].settimeout(0.1)  # to see ``done``, not a synchronisation
        while not done.is_set():
            try:
                conn, _ = listeners[i].accept()
            except TimeoutError:
                continue
            accepted[i] += 1
            conn.close()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        urls = ",".join(f"wss://127.0.0.1:{s.getsockname()[1]}" for s in listeners)
        r = scaleout("status", "--json", "--controller", urls, "--token", "t", "--ca", str(ca))
    finally:
        done.set()
        for t in threads:
            t.join()
        for s in listeners:
            s.close()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert accepted == [1, 1], (accepted, r.stderr)
