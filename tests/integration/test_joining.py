"""What a node says and does when it joins: the expiry warning, the unnamed node's identity,
retrying a controller that is down. Real processes over TLS on loopback."""

from __future__ import annotations

from pathlib import Path

from conftest import QUICKSTART, Federation, Proc

EXPIRY = "token expires at"


def test_the_expiry_warning_is_only_for_a_node_that_has_not_enrolled(fed: Federation) -> None:
    fed.controller()
    combiner = fed.combiner("c1")
    client = fed.client("cl1", package=QUICKSTART)
    fed.wait_clients(1)
    # The join tokens expire within the hour: a node that has yet to enrol is warned.
    assert EXPIRY in combiner.text() and EXPIRY in client.text(), client.text()
    assert client.stop() == 0 and combiner.stop() == 0
    # Enrolled, they reconnect with their own identities: the join token's expiry is no concern.
    combiner = fed.combiner("c1")
    client = fed.client("cl1", package=QUICKSTART)
    fed.wait_clients(1)
    assert EXPIRY not in combiner.text(), combiner.text()
    assert EXPIRY not in client.text(), client.text()


def joiner(fed: Federation, proc_name: str, *name: str) -> Proc:
    """`scaleout join` with the default state dir (the test's XDG_STATE_HOME), as a user types it."""
    args = ["join", "--controller", fed.url, "--token", fed.token("client"), "--ca", fed.ca, "-p", str(QUICKSTART), *name]
    p = Proc(proc_name, args, fed.logs, False)
    fed.procs.append(p)
    return p


def connected_as(fed: Federation, client: Proc) -> str:
    fed.wait_clients(1)
    listed = fed.admin("client.ls")[0]["clients"]
    online = [c["name"] for c in listed if c.get("status") == "online" or c.get("online")]
    assert len(online) == 1, listed
    assert f"as {online[0]}" in client.text(), client.text()
    return str(online[0])


def test_the_same_command_without_name_is_the_same_node_again(fed: Federation) -> None:
    fed.controller()
    fed.combiner("c1")
    first = joiner(fed, "unnamed")
    name = connected_as(fed, first)
    assert first.stop() == 0
    for other in ("client-2", "client-3"):
        p = joiner(fed, other, "--name", other)
        assert connected_as(fed, p) == other
        assert p.stop() == 0
    again = joiner(fed, "unnamed-again")
    assert connected_as(fed, again) == name  # was: "holds several client identities ...: pass --name"
    assert sorted(c["name"] for c in fed.admin("client.ls")[0]["clients"]) == sorted([name, "client-2", "client-3"])


def test_a_session_whose_clients_never_come_ends_after_round_1_and_says_how_many_are_connected(fed: Federation) -> None:
    from conftest import scaleout

    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("only", package=QUICKSTART)
    fed.wait_clients(1)
    r = scaleout("session", "start", "--rounds", "3", "--min-clients", "3", "--round-timeout", "2", "--wait", "--data-dir", str(fed.data))
    assert "1 of 3 clients connected: waiting up to 2s for the rest before round 1" in r.stdout, r.stdout
    assert r.returncode == 1, (r.stdout, r.stderr)
    session = fed.admin("session.show", {})[0]["session"]
    # Round 1 waited its timeout for them; was: then rounds 2 and 3 each waited and failed too.
    assert [(r["idx"], r["status"]) for r in session["rounds"]] == [(1, "failed")], session["rounds"]
    assert session["reason"] == "round 1: only 1 clients connected; at least 3 needed", session


def test_a_first_join_retries_a_controller_that_is_down_and_says_so(fed: Federation) -> None:
    import os
    import subprocess
    import sys
    import threading

    from conftest import wait_line

    ctl = fed.controller()
    port = int(fed.url.rsplit(":", 1)[1])
    token = (fed.data / "join-client.token").read_text().strip()
    assert ctl.stop() == 0
    client = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "join", token, "-p", str(QUICKSTART), "--name", "late"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert client.stderr is not None
        # Was: exit 3 at once ("cannot reach the controller").
        line = wait_line(client.stderr, "controller not reachable at", 30, "join")
        assert f"controller not reachable at wss://127.0.0.1:{port}: retrying in " in line, line
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(client.stderr.readline, b"")), daemon=True).start()  # type: ignore[union-attr]
        fed.controller(name="controller-again", port=port)  # the same data dir: the CA the token pins
        fed.combiner("c1")
        fed.wait_clients(1)
        assert [c["name"] for c in fed.admin("client.ls")[0]["clients"]] == ["late"]
    finally:
        client.terminate()
        code = client.wait(15)
    assert code == 0


def retry_delays(client: Proc, after: str, count: int, timeout: float = 30) -> list[float]:
    """The first ``count`` "retrying in Ns" delays the client logged after the line holding
    ``after`` (its log is read as it grows)."""
    import re
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = client.text()
        if after in text:
            delays = [float(d) for d in re.findall(r"retrying in ([\d.]+)s", text.split(after, 1)[1])]
            if len(delays) >= count:
                return delays[:count]
        time.sleep(0.2)  # a log that grows: nothing to wait on but the file
    raise AssertionError(f"fewer than {count} retries after {after!r}:\n{client.text()}")


def test_a_client_asks_again_soon_while_its_combiner_restarts(fed: Federation) -> None:
    fed.controller()
    combiner = fed.combiner("c1")
    client = fed.client("cl1", package=QUICKSTART)
    fed.wait_clients(1)
    assert combiner.stop() == 0
    fed.procs.remove(combiner)
    # The controller answers each time ("no combiner online"): the waits stay short instead of
    # growing to 15 s (was 0.2, 0.4, 0.8, 1.6, 3.2, 6.4 ... so a restarted combiner waited for them).
    delays = retry_delays(client, "lost the combiner", 7)
    assert max(delays) <= 3.0, delays
    fed.combiner("c1")
    fed.wait_clients(1)


def test_status_wait_gives_up_with_a_message(tmp_path: Path) -> None:
    from conftest import scaleout

    r = scaleout("status", "--wait", "1", "--data-dir", str(tmp_path / "never-started"))
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "the controller was not ready within 1s" in r.stderr and "Traceback" not in r.stderr, r.stderr
