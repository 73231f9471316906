"""Fixtures every test folder may use: a real PostgreSQL server (issue 18's store).

The server is started once per test run from Debian's binaries (``initdb`` into a temp dir,
``pg_ctl start`` on a free loopback port; as the ``postgres`` user when the tests run as
root, since initdb refuses root). Each test that asks for ``pg_url`` gets a database of its
own in it. Without the binaries, those tests are skipped with the reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _pg_bin() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: PG_BIN, PATH or Debian's versioned folder."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "postgres").exists():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found and Path(found).resolve().parent.joinpath("postgres").exists() else None


def _free_port() -> int:
    # PostgreSQL cannot be told port 0; a port the kernel just handed out is free in practice.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``url(db)`` for a database in it, ``stop()``/``start()``
    to take it away and bring it back (the connection-cut tests)."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.sock = root / "sock"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl, postgres) are not installed: apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    # Not under pytest's temp root: that is 0700 root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="scaleout-pg-"))
    server = PostgresServer(bindir, root)
    try:
        server.init()
        server.start()
    except (subprocess.CalledProcessError, OSError) as exc:
        log = server.root / "log"
        detail = getattr(exc, "stderr", "") or (log.read_text() if log.exists() else "")
        pytest.fail(f"could not start PostgreSQL from {bindir}: {exc}\n{detail}")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """postgresql://... of a new, empty database for this test alone."""
    return postgres_server.url(postgres_server.create_database())


AppendConcurrently = Callable[[list[Any], int], list[BaseException]]


def _append_concurrently(states: list[Any], n: int) -> list[BaseException]:
    """One thread per item of ``states`` (a State may come twice: two threads on it) appending
    ``n`` audit entries each, all at once; the errors they met."""
    errors: list[BaseException] = []

    def append(s: Any) -> None:
        try:
            for i in range(n):
                s.audit("controller", "x", i=i)
        except BaseException as exc:  # noqa: BLE001 (returned to the test)
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture
def append_concurrently() -> AppendConcurrently:
    """``append_concurrently(states, n)``: see ``_append_concurrently`` (a fixture, so a test in any
    folder gets it without importing this conftest by name)."""
    return _append_concurrently
