"""The tables of commands and predictions in ``state.db`` (store/commands.py reads and
writes them): created by State with the others, so this module imports neither."""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, params TEXT NOT NULL, model_id TEXT,
  timeout REAL NOT NULL, status TEXT NOT NULL, created REAL NOT NULL, finished REAL, reason TEXT);
CREATE INDEX IF NOT EXISTS commands_by_kind ON commands(kind, created);
CREATE TABLE IF NOT EXISTS command_results (
  command_id TEXT NOT NULL, client TEXT NOT NULL, combiner TEXT, status TEXT NOT NULL, data TEXT, error TEXT,
  code TEXT, duration_s REAL, finished REAL, PRIMARY KEY (command_id, client));
CREATE INDEX IF NOT EXISTS reports_attributes ON reports(client, id) WHERE kind = 'attributes';
"""
CLIENT_COLUMNS = ("attributes", "package", "package_error")


def ensure_schema(db: sqlite3.Connection) -> None:
    """Create the tables and add the clients' columns to an older state.db (idempotent)."""
    db.executescript(SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(clients)")}
    for column in CLIENT_COLUMNS:
        if column not in columns:
            db.execute(f"ALTER TABLE clients ADD COLUMN {column} TEXT")
