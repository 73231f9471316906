"""Join tokens, node identities and the token lifecycle, with real processes over TLS."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import QUICKSTART, Federation, Proc, scaleout

from scaleout.core import messages as m
from scaleout.core.errors import AuthError, RemoteError
from scaleout.security import jointoken, tls
from scaleout.security.tokens import peek
from scaleout.transport.net import TrustError, connect


def wait_exit(proc: Proc, timeout: float) -> tuple[int, float]:
    """The process's exit code and how long it took to exit."""
    started = time.monotonic()
    code = proc.popen.wait(timeout)
    return code, time.monotonic() - started


def enrol(fed: Federation, name: str, token: str | None = None) -> str:
    """A client identity's credential, enrolled over the API as scaleout join does."""

    async def go() -> str:
        link = await connect(fed.url, token or fed.token("client"), tls.client_context(fed.ca), max_payload=1 << 20)
        reader = asyncio.create_task(link.run())
        try:
            return str((await link.request("node.enrol", {"name": name}))[0]["token"])
        finally:
            await link.ws.close()
            reader.cancel()

    return asyncio.run(go())


class Terminal:
    """A process whose stderr is a terminal (pty), drained in a thread so it never blocks."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "scaleout", *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=env
        )
        os.close(slave)
        self.text = ""
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._drain, args=(master,), daemon=True)
        self.reader.start()

    def _drain(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            with self.changed:
                self.text += data.decode(errors="replace")
                self.changed.notify_all()
        os.close(fd)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while (found := re.search(pattern, self.text)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern!r} in:\n{self.text}")
                self.changed.wait(left)
            return found


def test_three_terminals_two_copied_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`scaleout serve` prints the join commands; `scaleout combine TOKEN` and `scaleout join
    TOKEN` need nothing else, pin the CA by its fingerprint and keep their identities."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    serve = Terminal(["serve", "--port", "0"], tmp_path, env)
    procs: list[Proc] = []
    try:
        combine = serve.wait_for(r"scaleout combine (SCALEOUT-1\.\S+)")[1]
        join = serve.wait_for(r"scaleout join (SCALEOUT-1\.\S+)")[1]
        assert serve.popen.stdout is not None and serve.popen.stdout.readline().startswith(b"listening on wss://")
        data = tmp_path / "scaleout-data"
        assert jointoken.parse(join).ca == tls.fingerprint((data / "ca.pem").read_bytes())
        assert (data / "join-client.token").read_text().strip() == join
        (tmp_path / "admin").mkdir()
        fed = Federation(tmp_path / "admin")
        fed.data = data
        info = json.loads((data / "controller.json").read_text())
        from scaleout.commands.connection import Connection

        fed.conn = Connection(info["url"], (data / "admin.token").read_text().strip(), data / "ca.pem", False)
        fed.seed_from(QUICKSTART)
        fed.activate(QUICKSTART)
        logs = fed.logs
        procs.append(Proc("combiner", ["combine", combine], logs, True, cwd=tmp_path))
        procs.append(Proc("client", ["join", join], logs, False, cwd=tmp_path))
        fed.wait_clients(1)
        assert fed.run_session(rounds=1, min_clients=1)["status"] == "finished"
        state = tmp_path / "state" / "scaleout"
        pinned = list(state.glob("ca-*.pem"))
        assert [p.read_bytes() for p in pinned] == [(data / "ca.pem").read_bytes()]
        identities = sorted((state / "identities").iterdir())
        assert [p.name.split("-")[1] for p in identities] == ["client", "combiner"]
        for p in identities:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE((state / "identities").stat().st_mode) == 0o700
        client_name = json.loads(identities[0].read_text())["name"]
        # Restarted the same way, the client is the same node again (its identity, its name).
        assert procs[1].stop() == 0
        procs.append(Proc("client-again", ["join", join], logs, False, cwd=tmp_path))
        fed.wait_clients(1)
        assert [c["name"] for c in fed.admin("client.ls")[0]["clients"]] == [client_name]
    finally:
        for p in reversed(procs):
            if p.popen.poll() is None:
                p.stop()
        serve.popen.terminate()
        assert serve.popen.wait(15) == 0
    for p in procs:
        assert "Traceback" not in p.text(), p.text()


def test_join_token_pinning_another_ca_is_refused(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    real = jointoken.parse(fed.admin("token.create", {"role": "client", "ttl_s": 600})[0]["join_token"])
    other, _ = tls.create_ca()
    forged = jointoken.encode(jointoken.JoinToken(real.urls, tls.fingerprint(other), real.token))
    r = scaleout("join", forged, "--state-dir", str(tmp_path / "s"), "-p", str(QUICKSTART), timeout=60)
    assert r.returncode == 3, r.stderr
    assert "pins sha256:" in r.stderr and "refusing to connect" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "s").glob("**/*.json"))  # nothing enrolled
    r = scaleout("join", "SCALEOUT-1.abc", "-p", str(QUICKSTART), timeout=60)
    assert r.returncode == 2 and "join token is malformed" in r.stderr


def test_a_name_belongs_to_its_identity(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    combiner = fed.combiner("c1")
    alice = fed.client("alice", package=QUICKSTART)
    fed.wait_clients(1)
    # Another holder of the same client token cannot enrol under the name...
    r = scaleout(
        "join", "--controller", fed.url, "--token", fed.token("client"), "--ca", fed.ca, "--name", "alice",
        "--state-dir", str(tmp_path / "mallory"), "-p", str(QUICKSTART), timeout=60,
    )
    assert r.returncode == 3, r.stderr
    assert "the client name 'alice' belongs to an enrolled node" in r.stderr and "Traceback" not in r.stderr
    # ... nor connect under it with its own identity or with the bare client token.
    bob = enrol(fed, "bob")
    assert combiner.url is not None
    ctx = tls.client_context(fed.ca)

    ticket = _assign_as(fed, bob, "bob")["ticket"]  # bob's own ticket for c1

    async def impersonate() -> tuple[int | None, str]:
        link = await connect(combiner.url, ticket, ctx, max_payload=1 << 20, peer_role="combiner")  # type: ignore[arg-type]
        run = asyncio.create_task(link.run())
        await link.send(m.Hello(name="alice"))
        await asyncio.wait_for(run, 10)
        return link.ws.close_code, link.ws.close_reason

    code, reason = asyncio.run(impersonate())
    assert code == m.CLOSE_REVOKED and "not client alice's" in reason
    with pytest.raises(AuthError, match="with the ticket the controller gave it for this combiner"):  # never its own credential
        asyncio.run(connect(combiner.url, bob, ctx, max_payload=1 << 20, peer_role="combiner"))  # type: ignore[arg-type]
    with pytest.raises(AuthError, match="enrols with the controller first"):
        asyncio.run(connect(combiner.url, fed.token("client"), ctx, max_payload=1 << 20, peer_role="combiner"))  # type: ignore[arg-type]
    with pytest.raises(RemoteError, match="belongs to client 'bob', not client 'alice'"):
        _assign_as(fed, bob, "alice")
    assert alice.popen.poll() is None
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, min_clients=1)
    assert session["status"] == "finished" and session["rounds"][0]["participants"] == ["alice"]


def _assign_as(fed: Federation, token: str, name: str) -> dict:
    async def go() -> dict:
        link = await connect(fed.url, token, tls.client_context(fed.ca), max_payload=1 << 20)
        reader = asyncio.create_task(link.run())
        try:
            return (await link.request("client.assign", {"name": name}))[0]
        finally:
            await link.ws.close()
            reader.cancel()

    return asyncio.run(go())


def test_revoked_token_links_close_within_5s_and_nodes_exit_3(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    combiner = fed.combiner("c1")
    client = fed.client("a", package=QUICKSTART)
    fed.wait_clients(1)
    r = scaleout("token", "ls", "--json", "--data-dir", str(fed.data))
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    # serve's own join tokens (one per node role) and the admin token are listed too
    assert sorted(t["role"] for t in listed) == ["admin", "client", "client", "combiner", "combiner"]
    rows = {role: next(t for t in listed if t["id"] == peek(fed.token(role)).jti) for role in ("client", "combiner")}
    assert rows["client"]["uses"] == 1 and rows["client"]["nodes"] == 1 and rows["client"]["status"] == "valid"
    assert rows["client"]["expires"].endswith("Z") and rows["client"]["last_used"] is not None
    assert "sco1." not in r.stdout and "SCALEOUT-1." not in r.stdout  # never the secret
    human = scaleout("token", "ls", "--data-dir", str(fed.data)).stdout
    assert human.splitlines()[0].split() == ["ID", "ROLE", "NAME", "STATUS", "EXPIRES", "USES", "NODES", "LAST", "USED", "LAST", "ENROLLED"]
    started = time.monotonic()
    r = scaleout("token", "revoke", rows["client"]["id"][:6], "--with-nodes", "--data-dir", str(fed.data))
    assert r.returncode == 0, r.stderr
    assert f"token {rows['client']['id']} revoked" in r.stdout and "removed client a" in r.stdout
    code = client.popen.wait(10)
    assert code == 3 and time.monotonic() - started < 5, client.text()
    assert "its token was revoked by an admin" in client.text()
    wait_unlisted(fed, "a")  # dropped from client ls, as by client rm
    # The revoked token enrols nobody any more, and a revoked node cannot come back.
    r = scaleout("join", "--controller", fed.url, "--token", fed.token("client"), "--ca", fed.ca, "--name", "b", "--state-dir", str(tmp_path / "b"), "-p", str(QUICKSTART))
    assert r.returncode == 3 and "token was revoked" in r.stderr, r.stderr
    again = fed.client("a", package=QUICKSTART)
    assert again.popen.wait(30) == 3
    assert "identity was revoked or removed" in again.text()
    # A combiner's token revoked without its nodes: the combiner, enrolled, keeps running.
    r = scaleout("token", "revoke", rows["combiner"]["id"], "--json", "--data-dir", str(fed.data))
    assert r.returncode == 0 and json.loads(r.stdout)["nodes"] == [], r.stderr
    assert combiner.popen.poll() is None
    r = scaleout("token", "revoke", "t-nothing", "--data-dir", str(fed.data))
    assert r.returncode == 1 and "no token 't-nothing'; list them with: scaleout token ls" in r.stderr


def wait_unlisted(fed: Federation, name: str, timeout: float = 10) -> None:
    """Until ``client ls`` no longer lists ``name`` (a removed node's row goes once its combiner reports it gone)."""
    deadline = time.monotonic() + timeout
    while any(c["name"] == name for c in fed.admin("client.ls")[0]["clients"]):
        assert time.monotonic() < deadline, fed.admin("client.ls")
        fed.admin("client.wait", {"count": 0, "timeout": 0.2})


def test_client_rm_and_combiner_rm(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    combiner = fed.combiner("c1")
    client = fed.client("a", package=QUICKSTART)
    fed.wait_clients(1)
    started = time.monotonic()
    r = scaleout("client", "rm", "a", "--data-dir", str(fed.data))
    assert r.returncode == 0 and "client a removed" in r.stdout, r.stderr
    assert client.popen.wait(10) == 3 and time.monotonic() - started < 5
    assert "client a was removed by an admin" in client.text()
    wait_unlisted(fed, "a")  # dropped once its combiner reported it gone
    assert not fed.admin("client.ls")[0]["clients"]
    # The name is free again: a new node enrols under it.
    r = scaleout("client", "rm", "a", "--data-dir", str(fed.data))
    assert r.returncode == 1 and "no enrolled client has that name" in r.stderr
    fed.procs.append(Proc("a2", ["join", "--controller", fed.url, "--token", fed.token("client"), "--ca", fed.ca, "--name", "a", "--state-dir", str(tmp_path / "a2"), "-p", str(QUICKSTART)], fed.logs, False))
    fed.wait_clients(1)
    r = scaleout("combiner", "rm", "c1", "--json", "--data-dir", str(fed.data))
    assert r.returncode == 0 and json.loads(r.stdout)["closed"] == 1, r.stderr
    assert combiner.popen.wait(10) == 3
    assert "combiner c1 was removed by an admin" in combiner.text()


def test_combiner_certificates_only_for_allowed_names_short_lived_and_renewed(fed: Federation, tmp_path: Path) -> None:
    fed.controller("--combiner-cert-ttl", "6s")
    plain = fed.admin("token.create", {"role": "combiner", "ttl_s": 600})[0]
    # Asking to be reached at an address the token does not allow is refused, saying how to allow it.
    r = scaleout("combine", plain["join_token"], "--advertise", "10.6.6.6", "--state-dir", str(tmp_path / "x"), "--port", "0")
    assert r.returncode == 3, r.stderr
    assert "--san 10.6.6.6" in r.stderr and "Traceback" not in r.stderr
    # Names beyond the allowed ones are left out of the certificate; it lives as long as asked.
    allowed = fed.admin("token.create", {"role": "combiner", "ttl_s": 600, "sans": ["ctl-b.example.org"]})[0]
    csr, _ = tls.make_csr(["127.0.0.1", "evil.example.com", "10.6.6.6", "ctl-b.example.org"], "cb")

    async def register() -> dict:
        link = await connect(fed.url, allowed["token"], tls.client_context(fed.ca), max_payload=1 << 20)
        reader = asyncio.create_task(link.run())
        try:
            own = (await link.request("node.enrol", {"name": "cb"}))[0]["token"]
        finally:
            await link.ws.close()
            reader.cancel()
        link = await connect(fed.url, own, tls.client_context(fed.ca), max_payload=1 << 20)
        reader = asyncio.create_task(link.run())
        try:
            return (await link.request("combiner.register", {"name": "cb", "csr": csr.decode(), "advertise": "ctl-b.example.org"}))[0]
        finally:
            await link.ws.close()
            reader.cancel()

    result = asyncio.run(register())
    cert = tls.x509.load_pem_x509_certificate(result["cert"].encode())
    assert sorted(tls._canonical(str(n.value)) for n in tls._names(cert)) == ["127.0.0.1", "ctl-b.example.org"]
    life = cert.not_valid_after_utc - tls.dt.datetime.now(tls.dt.timezone.utc)
    assert life.total_seconds() <= 6
    # A combiner asking for names its token does not allow is told which were left out.
    asking = Proc("asking", ["combine", plain["join_token"], "--san", "evil.example.org", "--state-dir", str(tmp_path / "y"), "--port", "0"], fed.logs, True)
    fed.procs.append(asking)
    assert "left evil.example.org out of this combiner's certificate" in asking.text(), asking.text()
    asking.stop()
    # A running combiner renews its certificate before it runs out, and clients keep connecting.
    fed.seed_from(QUICKSTART)
    combiner = fed.combiner("c1")
    deadline = time.monotonic() + 20
    while "renewed this combiner's certificate" not in combiner.text():
        assert time.monotonic() < deadline, combiner.text()
        assert combiner.popen.poll() is None, combiner.text()
        time.sleep(0.2)  # polling a log file for a condition, not synchronising on time
    fed.client("a", package=QUICKSTART)
    fed.wait_clients(1)
    assert fed.run_session(rounds=1, min_clients=1)["status"] == "finished"


def test_tls_peer_must_match_the_pinned_ca(fed: Federation, tmp_path: Path) -> None:
    """The CA file written by pinning is the one the controller uses: a second controller's
    join token does not verify against the first's CA, even at the same address."""
    fed.controller()
    other_ca, _ = tls.create_ca()
    (tmp_path / "other.pem").write_bytes(other_ca)
    with pytest.raises(TrustError):
        asyncio.run(connect(fed.url, fed.token("client"), tls.client_context(tmp_path / "other.pem"), max_payload=1 << 20))


def test_token_uses_and_revoking_the_data_dirs_admin_token(fed: Federation) -> None:
    fed.controller()
    once = fed.admin("token.create", {"role": "client", "ttl_s": 600, "uses": 1, "name": "one-device"})[0]
    enrol(fed, "u1", once["token"])
    with pytest.raises(RemoteError, match=r"used up \(1 of 1 uses\)"):
        enrol(fed, "u2", once["token"])
    rows = {t["id"]: t for t in fed.admin("token.ls")[0]["tokens"]}
    assert rows[once["id"]]["status"] == "used up" and rows[once["id"]]["name"] == "one-device"
    # Revoking the admin token in the data dir writes a new one there: the local admin is not locked out.
    old = (fed.data / "admin.token").read_text().strip()
    admin_id = next(t["id"] for t in rows.values() if t["role"] == "admin")
    r = scaleout("token", "revoke", admin_id, "--data-dir", str(fed.data))
    assert r.returncode == 0, r.stderr
    new = (fed.data / "admin.token").read_text().strip()
    assert new != old
    r = scaleout("token", "ls", "--data-dir", str(fed.data))
    assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
    r = scaleout("status", "--controller", fed.url, "--token", old, "--ca", fed.ca)
    assert r.returncode == 3 and "token was revoked" in r.stderr


def test_readme_three_terminals_runs_as_written(tmp_path: Path) -> None:
    """The README's three-terminal path, literally: serve, then the combine and join
    commands serve printed (the README shows their form), then the training commands."""
    import shlex
    import shutil

    from conftest import ROOT

    text = (ROOT / "README.md").read_text()
    found = re.search(r"^## Three terminals\n(.*?)(?=^## )", text, re.M | re.S)
    assert found, "README has no section 'Three terminals'"
    blocks = re.findall(r"^```\n(.*?)^```", found[1], re.M | re.S)
    lines = [ln.split("  #", 1)[0].strip() for block in blocks for ln in block.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(". ")]
    assert lines[0] == "scaleout serve --data-dir /tmp/scaleout-3t", lines
    assert re.fullmatch(r"scaleout combine SCALEOUT-1\.\S+", lines[1]) and re.fullmatch(r"scaleout join SCALEOUT-1\.\S+", lines[2]), lines
    repo = tmp_path / "repo"
    shutil.copytree(QUICKSTART, repo / "sample_projects" / "quickstart" / "client", ignore=shutil.ignore_patterns("*.npz", "data", "__pycache__"))
    data = str(tmp_path / "scaleout-3t")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    serve = Terminal([*shlex.split(lines[0].replace("/tmp/scaleout-3t", data))[1:], "--port", "0"], repo, env)
    procs: list[Proc] = []
    try:
        printed = {role: serve.wait_for(rf"(scaleout {role} SCALEOUT-1\.\S+)")[1] for role in ("combine", "join")}
        logs = tmp_path / "logs"
        logs.mkdir()
        procs.append(Proc("combiner", shlex.split(printed["combine"])[1:], logs, True, cwd=repo))
        procs.append(Proc("client", shlex.split(printed["join"])[1:], logs, False, cwd=repo))
        for line in lines[3:]:
            r = scaleout(*shlex.split(line.replace("/tmp/scaleout-3t", data))[1:], cwd=repo, timeout=180)
            assert r.returncode == 0, (line, r.stdout, r.stderr)
        assert re.search(r"^session \S+ finished", r.stdout, re.M) and len(re.findall(r"^round \d+\s+succeeded", r.stdout, re.M)) == 3, r.stdout
    finally:
        for p in reversed(procs):
            if p.popen.poll() is None:
                p.stop()
        serve.popen.terminate()
        assert serve.popen.wait(15) == 0
    for p in procs:
        assert "Traceback" not in p.text(), p.text()


def test_a_node_credential_past_half_its_life_is_renewed(tmp_path: Path) -> None:
    """The controller hands a node a fresh credential for the same identity once the one
    it connects with is past half its life; earlier, nothing."""
    from types import SimpleNamespace

    from scaleout.roles import enrolment
    from scaleout.roles.controller import Controller, ControllerSettings

    ctl = Controller(ControllerSettings(data_dir=tmp_path / "ctl", insecure=True))
    ctl.prepare()
    try:
        now = time.time()
        young = ctl.signer.issue("client", enrolment.IDENTITY_TTL_S, now - 10, jti="i-young", sub="a", nid="n-a")
        old = ctl.signer.issue("client", enrolment.IDENTITY_TTL_S, now - enrolment.IDENTITY_TTL_S * 0.6, jti="i-old", sub="a", nid="n-a")
        join = ctl.signer.issue("client", 3600, now - 3000, jti="t-join")
        assert ctl.desk.renewed(SimpleNamespace(claims=peek(young))) is None
        assert ctl.desk.renewed(SimpleNamespace(claims=peek(join))) is None  # a join token is never turned into a node's
        fresh = ctl.desk.renewed(SimpleNamespace(claims=peek(old)))
        assert fresh is not None
        claims = ctl.verifier.verify(fresh, time.time())
        assert (claims.role, claims.sub, claims.nid) == ("client", "a", "n-a") and claims.exp >= now + enrolment.IDENTITY_TTL_S - 5
    finally:
        ctl.state.close()
