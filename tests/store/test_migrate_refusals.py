"""`scaleout store migrate` refuses what it cannot move before it touches any database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scaleout.core.errors import ConfigError
from scaleout.store.migrate import migrate


def test_a_postgresql_controllers_empty_state_db_is_not_migrated(tmp_path: Path) -> None:
    """A controller on a PostgreSQL store leaves an empty state.db in its data dir: migrating
    that dir "moved 0 rows" (exit 0) and wrote a SQLite schema into it before."""
    (tmp_path / "state.db").touch()
    with pytest.raises(ConfigError, match="state.db is empty: nothing to migrate"):
        migrate(tmp_path, "postgresql://nobody@127.0.0.1:1/none")
    assert (tmp_path / "state.db").stat().st_size == 0


@pytest.mark.parametrize("to", ["postgresql://postgres@127.0.0.1:1", "postgresql://postgres@127.0.0.1:1/"])
def test_a_target_url_without_a_database_is_refused(tmp_path: Path, to: str) -> None:
    """As serve --store does: libpq would otherwise copy into the database named after the user."""
    r = subprocess.run([sys.executable, "-m", "scaleout", "store", "migrate", "--from", str(tmp_path), "--to", to], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.strip() == f"scaleout: error: --to names no database: postgresql://USER[:PW]@HOST:PORT/DB, got {to.split('@')[-1]!r}"


def test_a_target_server_that_cannot_be_reached_is_exit_3(tmp_path: Path) -> None:
    """Cannot reach the peer: exit 3, as everywhere else (it was 1, 'the operation failed')."""
    from scaleout.store.state import State

    State(tmp_path / "state.db").close()  # a data dir with a store to move
    r = subprocess.run(
        [sys.executable, "-m", "scaleout", "store", "migrate", "--from", str(tmp_path), "--to", "postgresql://u:secret@127.0.0.1:1/x"],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 3, r
    assert "while connecting to the PostgreSQL store postgresql://u:***@127.0.0.1:1/x" in r.stderr and "secret" not in r.stderr, r.stderr
