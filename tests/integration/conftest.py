"""A real federation for tests: controller, combiners and clients as processes on loopback.

Every role runs as its own `python -m scaleout` process with TLS on 127.0.0.1 and port 0;
tests wait on the ready line (`listening on ...`) or on the controller (client.wait),
never on sleep. At teardown every process gets SIGTERM and no log may hold a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pytest

from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.security.tls import client_context

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
QUICKSTART = ROOT / "sample_projects" / "quickstart" / "client"
START_TIMEOUT = 30.0
# SCALEOUT_TEST_STORE=postgresql (`make test-postgresql`): every controller a Federation starts
# keeps its state in a fresh database of the tests' PostgreSQL server (tests/conftest.py), not
# in state.db; a test that checks SQLite's files skips itself with `sqlite_only`.
TEST_STORE = os.environ.get("SCALEOUT_TEST_STORE", "sqlite")
_postgres: Any = None  # the session's PostgresServer, set by `_test_store` when TEST_STORE is postgresql


def scaleout(*args: str, timeout: float = 60, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one scaleout command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "scaleout", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def wait_line(stream: IO[bytes], text: str, timeout: float, what: str) -> str:
    """Block until ``stream`` gives a line containing ``text``; return that line (a ready
    signal, not a sleep)."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            line = stream.readline().decode(errors="replace")
            if not line:
                break
            if text in line:
                return line
    raise AssertionError(f"{what} did not print {text!r} within {timeout}s")


async def raw_websocket(url: str, ca: str, token: str, *, deaf: bool = False, timeout: float = START_TIMEOUT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket to ``url`` upgraded by hand over TLS (a peer that does not play by the rules:
    it writes frames itself). ``deaf``: on a socket with a tiny receive buffer, for a peer that
    never reads, so what the other side sends piles up on its side."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 0
    if deaf:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, ssl=client_context(ca), server_hostname=host)
    else:
        reader, writer = await asyncio.open_connection(host, port, ssl=client_context(ca), server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    assert b" 101 " in head.split(b"\r\n")[0], head
    return reader, writer


def wait_stdout(proc: Proc, text: str, timeout: float = START_TIMEOUT) -> None:
    """Block until a role process prints ``text`` on stdout (package code prints markers)."""
    assert proc.popen.stdout is not None
    try:
        wait_line(proc.popen.stdout, text, timeout, proc.name)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{proc.text()}") from None


class Proc:
    def __init__(self, name: str, args: list[str], logs: Path, wait_listening: bool, cwd: Path | None = None) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        self.stderr = open(self.log, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "scaleout", *args, "--log-level", "debug"],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL, cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.url: str | None = None
        if wait_listening:
            self.url = self._wait_listening()

    def _wait_listening(self) -> str:
        assert self.popen.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            line = self.popen.stdout.readline().decode()
            if not line:
                raise AssertionError(f"{self.name} exited with {self.popen.wait()}:\n{self.text()}")
            if line.startswith("listening on "):
                return line.removeprefix("listening on ").strip()
        raise AssertionError(f"{self.name} not ready in {START_TIMEOUT}s:\n{self.text()}")

    def text(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
            raise AssertionError(f"{self.name} ignored {sig.name} for {timeout}s:\n{self.text()}")
        finally:
            if self.popen.stdout is not None:
                self.popen.stdout.close()
            self.stderr.close()
        return code


class Federation:
    """Start roles and talk to the controller as an admin. ``store``: a postgresql:// URL every
    controller of it is started with (``--store``); default: SQLite in the data dir, or a new
    database of the test server under SCALEOUT_TEST_STORE=postgresql."""

    def __init__(self, tmp: Path, store: str | None = None) -> None:
        self.tmp = tmp
        if store is None and _postgres is not None:
            store = _postgres.url(_postgres.create_database())
        self.store = store
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.data = tmp / "controller"
        self.procs: list[Proc] = []
        self.conn: Connection | None = None
        self._tokens: dict[str, str] = {}

    # -- roles -------------------------------------------------------------------------

    def controller(self, *extra: str, name: str = "controller", port: int = 0) -> Proc:
        if self.store is not None and "--store" not in extra:
            extra = ("--store", self.store, *extra)
        if self.store is not None and "--key-file" not in extra and not os.environ.get("SCALEOUT_KEY_FILE"):
            extra = ("--key-file", str(self._key_file()), *extra)  # a postgresql store needs one
        p = Proc(name, ["serve", "--data-dir", str(self.data), "--port", str(port), *extra], self.logs, True)
        self.procs.append(p)
        info = json.loads((self.data / "controller.json").read_text())
        self.conn = Connection(info["url"], (self.data / "admin.token").read_text().strip(), self.data / "ca.pem", False)
        return p

    def _key_file(self) -> Path:
        """One key file for every controller of this federation (serve --key-file)."""
        from scaleout.store.vault import keygen

        path = self.tmp / "store.key"
        if not path.exists():
            keygen(path)
        return path

    def stored(self, kind: str) -> set[str]:
        """The ids of the blobs of ``kind`` (models, packages, state) the controller stored:
        files in the data dir, or large objects in PostgreSQL."""
        if self.store is None:
            return {p.name.split(".")[0] for p in (self.data / kind).glob("*.safetensors")} | {p.stem for p in (self.data / kind).glob("*.tgz")}
        import psycopg

        with psycopg.connect(self.store) as conn:
            return {row[0] for row in conn.execute("SELECT id FROM blobs WHERE kind=%s", (kind,))}

    @property
    def url(self) -> str:
        assert self.conn is not None
        return self.conn.url

    @property
    def ca(self) -> str:
        return str(self.data / "ca.pem")

    def token(self, role: str) -> str:
        if role not in self._tokens:
            self._tokens[role] = self.admin("token.create", {"role": role, "ttl_s": 3600})[0]["token"]
        return self._tokens[role]

    def identity(self, role: str, name: str) -> str:
        """The own credential of a node named ``name``, enrolled with the ``role`` token as
        `scaleout join` and `scaleout combine` do (for tests that speak the protocol by hand)."""
        from scaleout.security.tls import client_context
        from scaleout.transport.net import connect

        join = self.token(role)

        async def go() -> str:
            link = await connect(self.url, join, client_context(self.ca), max_payload=1 << 20)
            reader = asyncio.create_task(link.run())
            try:
                return str((await link.request("node.enrol", {"name": name}))[0]["token"])
            finally:
                await link.ws.close()
                reader.cancel()

        return asyncio.run(go())

    def assigned_ticket(self, name: str, prefer: str | None = None) -> str:
        """Enrol client ``name`` and ask for its combiner, as `scaleout join` does: the ticket
        it connects to that combiner with."""
        ident = self.identity("client", name)
        conn = Connection(self.url, ident, Path(self.ca), False)
        return str(asyncio.run(call_async(conn, "client.assign", {"name": name, "prefer": prefer}))[0]["ticket"])

    def ticket(self, client: str, combiner: str) -> str:
        """A ticket as the controller issues one in client.assign (signed with its token key):
        for stand-in combiners that announce many clients without running them."""
        import time

        from scaleout.security.tokens import TokenSigner

        signer = TokenSigner.load_or_create(self.data / "token.key")
        return signer.issue("client", 3600, time.time(), jti=f"k-test-{client}", sub=client, nid=f"n-test-{client}", aud=combiner)

    def combiner(self, name: str) -> Proc:
        args = ["combine", "--controller", self.url, "--token", self.token("combiner"), "--ca", self.ca, "--name", name, "--port", "0", "--state-dir", str(self.tmp / "combiners" / name)]
        p = Proc(name, args, self.logs, True)
        self.procs.append(p)
        return p

    def client(self, name: str, package: Path | None = None, cwd: Path | None = None, extra: tuple[str, ...] = ()) -> Proc:
        """A client; ``package`` (a local compute package) may be relative to ``cwd``; ``extra``: more join flags."""
        args = ["join", "--controller", self.url, "--token", self.token("client"), "--ca", self.ca, "--name", name, "--work-dir", str(self.tmp / name)]
        if package is not None:
            args += ["-p", str(package)]
        args += list(extra)
        p = Proc(name, args, self.logs, False, cwd=cwd)
        self.procs.append(p)
        return p

    # -- admin ---------------------------------------------------------------------------

    def admin(self, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None, timeout: float = 120) -> tuple[dict[str, Any], bytes | None]:
        assert self.conn is not None

        async def go() -> tuple[dict[str, Any], bytes | None]:
            return await asyncio.wait_for(call_async(self.conn, op, args, blob), timeout)  # type: ignore[arg-type]

        return asyncio.run(go())

    def seed_from(self, package: Path) -> str:
        """Run the package's build() and set its seed model; returns the model id."""
        from scaleout.package.seed import read_model_file

        out = self.tmp / f"build-{package.name}"
        r = scaleout("run", "build", "-p", str(package), "-o", str(out))
        assert r.returncode == 0, r.stderr
        seed = next(p for p in out.iterdir() if p.suffix in (".npz", ".safetensors"))
        return str(self.admin("model.set_seed", {}, read_model_file(seed))[0]["id"])

    def activate(self, package: Path) -> str:
        from scaleout.package.archive import create_archive

        archive = create_archive(package, self.tmp / f"{package.name}.tgz")
        return str(self.admin("package.set_active", {"name": archive.name}, archive.read_bytes())[0]["id"])

    def wait_clients(self, n: int) -> None:
        self.admin("client.wait", {"count": n, "timeout": START_TIMEOUT})

    def run_session(self, **config: Any) -> dict[str, Any]:
        config.setdefault("round_timeout", 30)
        session = self.admin("session.start", config)[0]["session"]
        return self.admin("session.wait", {"id": session["id"]})[0]["session"]

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.popen.returncode is None:
                p.stop()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``mount -o size=``, e.g. "4m") on the directory ``path``,
    for tests of a really full disk; unmounted at the end, failed test or not. Mounting
    needs root (CI runs as root): elsewhere the test is skipped and says why."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs these as root)")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # busy: detach it anyway


def fill_disk(directory: Path) -> Path:
    """Write ``directory/filler`` until the file system holding it has no byte left."""
    import errno

    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return path


@contextlib.contextmanager
def federation(tmp: Path, store: str | None = None) -> Iterator[Federation]:
    """A Federation whose processes are stopped at the end, and whose logs hold no traceback."""
    f = Federation(tmp, store)
    try:
        yield f
    finally:
        f.stop_all()
    for p in f.procs:
        assert "Traceback" not in without_package_tracebacks(p.text()), f"{p.name} logged a traceback:\n{p.text()}"


PACKAGE_TRACEBACK = "traceback of the package code"
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d ")


def without_package_tracebacks(log: str) -> str:
    """``log`` without the tracebacks of a failing compute package that a client shows at
    debug level on purpose (a traceback of Scaleout itself stays)."""
    kept, skipping = [], False
    for line in log.splitlines():
        if LOG_RECORD.match(line):
            skipping = PACKAGE_TRACEBACK in line
            kept.append(line)
        elif not skipping:
            kept.append(line)
    return "\n".join(kept)


@pytest.fixture(scope="session", autouse=True)
def _test_store(request: pytest.FixtureRequest) -> None:
    """Under SCALEOUT_TEST_STORE=postgresql, start the PostgreSQL server Federations use."""
    global _postgres
    if TEST_STORE == "postgresql":
        _postgres = request.getfixturevalue("postgres_server")
    elif TEST_STORE != "sqlite":
        raise pytest.UsageError(f"SCALEOUT_TEST_STORE={TEST_STORE!r}: use sqlite or postgresql")


def sqlite_only(why: str) -> None:
    """Skip the calling test on PostgreSQL (SCALEOUT_TEST_STORE=postgresql): ``why`` it checks
    something only SQLite has."""
    if TEST_STORE == "postgresql":
        pytest.skip(f"SQLite only: {why}")


@pytest.fixture(autouse=True)
def node_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes started without --state-dir keep their identities under the test's folder, not ~."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation]:
    with federation(tmp_path) as f:
        yield f
