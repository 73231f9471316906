"""The CLI across a failover (issue 18): a follower of a session (`session start --wait`,
`session watch`) given every controller's address dials again and goes on with the active
one when the one it followed is SIGKILLed, and `status --wait` waits for an active one."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import Federation, wait_stdout
from test_failover import RECOVER, fast_lease, keygen, serve, url_of, wait_active  # noqa: F401 (fast_lease: autouse)

from scaleout.commands.connection import Connection


def start(fed: Federation, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A scaleout command running in the background, its stdout and stderr in files (read as they grow)."""
    out, err = fed.logs / f"{name}.out", fed.logs / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "scaleout", *args], stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    return proc, out, err


def wait_file(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> re.Match[str]:
    """Wait until the file a process writes holds ``pattern`` (a regular expression)."""
    deadline = time.monotonic() + timeout
    while (found := re.search(pattern, path.read_text(errors="replace"), re.MULTILINE)) is None:
        assert time.monotonic() < deadline and proc.poll() is None, f"no {pattern!r} in {path.name}:\n{path.read_text(errors='replace')}"
        time.sleep(0.05)  # the file grows as the process writes: nothing to wait on
    return found


def test_followers_given_both_addresses_go_on_with_the_standby_after_a_sigkill(fed: Federation, pg_url: str) -> None:
    key = keygen(fed.tmp / "store.key")
    a = serve(fed, "ctl-a", pg_url, key)
    serve(fed, "ctl-b", pg_url, key)
    both = f"{url_of(fed, 'ctl-a')},{url_of(fed, 'ctl-b')}"
    fed.data = fed.tmp / "ctl-a"
    token = (fed.data / "admin.token").read_text().strip()
    fed.conn = Connection(both, token, fed.data / "ca.pem", False)
    fed.seed_from(RECOVER)
    fed.combiner("c1")
    clients = [fed.client(name, package=RECOVER) for name in ("r1", "r2")]
    fed.wait_clients(2)
    gate = fed.tmp / "gate"
    conn = ["--controller", both, "--token", token, "--ca", str(fed.data / "ca.pem")]
    settings = f'{{"gate": "{gate}", "gate_from": 3}}'
    starter, start_out, start_err = start(
        fed, "start", "session", "start", "--rounds", "6", "--round-timeout", "20", "--min-clients", "2", "--no-validate",
        "--settings", settings, "--wait", *conn,
    )
    session_id = wait_file(start_out, r"^session (s-\S+) started", starter).group(1)
    watcher, watch_out, watch_err = start(fed, "watch", "session", "watch", session_id, *conn)
    # The Python API's wait_for_session, on a thread of this test, follows it across the failover too.
    from scaleout import api

    told: list[int] = []
    ended: dict[str, object] = {}

    def api_follow() -> None:
        with api.Scaleout(both, token=token, verify=str(fed.data / "ca.pem")) as client:
            try:
                ended["session"] = client.wait_for_session(session_id, timeout=120, callback=lambda r: told.append(r["idx"]))
            except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
                ended["error"] = exc

    api_thread = threading.Thread(target=api_follow)
    api_thread.start()
    wait_stdout(clients[0], "recover_client: held")  # round 3's task is out
    for proc, out in ((starter, start_out), (watcher, watch_out)):
        wait_file(out, r"^round 2 +succeeded", proc)  # both follow the session now

    a.popen.send_signal(signal.SIGKILL)
    assert a.popen.wait(10) == -signal.SIGKILL
    gate.touch()
    for proc, out, err in ((starter, start_out, start_err), (watcher, watch_out, watch_err)):
        code = proc.wait(120)
        stdout, stderr = out.read_text(), err.read_text()
        assert code == 0, (stdout, stderr)
        assert "Traceback" not in stderr, stderr
        assert "lost the controller" in stderr and "reconnecting to" in stderr, stderr
        # Every round once, in order, none missed, none repeated, and the session's end.
        rounds = re.findall(r"^round (\d+) +succeeded", stdout, re.MULTILINE)
        assert rounds == ["1", "2", "3", "4", "5", "6"], stdout
        assert stdout.rstrip().endswith(f"session {session_id} finished"), stdout
    api_thread.join(120)
    assert "error" not in ended, ended
    assert told == [1, 2, 3, 4, 5, 6] and ended["session"]["status"] == "finished", (told, ended)  # type: ignore[index]
    assert "took over" in fed.procs[1].text()


def test_status_wait_waits_for_an_active_controller_not_a_standby(fed: Federation, pg_url: str) -> None:
    key = keygen(fed.tmp / "store.key")
    a = serve(fed, "ctl-a", pg_url, key)
    serve(fed, "ctl-b", pg_url, key)
    a_url, b_url = url_of(fed, "ctl-a"), url_of(fed, "ctl-b")
    token = (fed.tmp / "ctl-a" / "admin.token").read_text().strip()
    conn = ["--token", token, "--ca", str(fed.tmp / "ctl-a" / "ca.pem")]

    def status(controller: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scaleout", "status", *args, "--controller", controller, *conn], capture_output=True, text=True, timeout=60, check=False,
        )

    # Without --wait, a standby's answer is the answer.
    r = status(b_url)
    assert r.returncode == 0 and r.stdout.strip() == f"standby, active is {a_url}", r.stdout + r.stderr
    # With --wait, the standby alone is not ready: it times out with its usual exit code, naming the active one.
    r = status(b_url, "--wait", "1")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "not ready within 1s" in r.stderr and f"standby, active is {a_url}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # Given both, the standby's pointer leads to the active one.
    r = status(f"{b_url},{a_url}", "--wait", "10")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"controller      {a_url}" in r.stdout, r.stdout

    # The standby alone, waited on while the active one dies: ready once it has taken over.
    waiting, out, err = start(fed, "status", "status", "--wait", "60", "--controller", b_url, *conn)
    wait_file(err, r"^waiting up to 60s for the controller", waiting)
    a.popen.send_signal(signal.SIGKILL)
    assert waiting.wait(60) == 0, out.read_text() + err.read_text()
    assert f"controller      {b_url}" in out.read_text(), out.read_text()
    wait_active(fed, "ctl-b")
