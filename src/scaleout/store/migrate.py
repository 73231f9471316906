"""Copy a data dir's state.db and blob files into a PostgreSQL store (``scaleout store migrate``).

Rows keep their keys (the audit log its ids, hashes and head, so ``audit verify`` passes on
the copy as on the original; the signed head beside state.db becomes the store's own, the meta
row every controller on it shares, checked with the data dir's audit.key); blobs are streamed
file by file into large objects, each checked against its name. The rows go in one transaction: a failed migrate leaves no rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scaleout.core.audit import HEAD_FILE, parse_anchor
from scaleout.core.errors import ConfigError, IntegrityError
from scaleout.store.audithead import KEY_FILE
from scaleout.store.blobs import BLOB_DIRS, SUFFIXES
from scaleout.store.pg import PgConnection, redact
from scaleout.store.pgblobs import PgBlobStore
from scaleout.store.state import AUDIT_ANCHOR, AUDIT_HEAD, State

BATCH = 1000  # rows per INSERT batch


@dataclass
class Migrated:
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows copied
    blobs: int = 0
    blob_bytes: int = 0
    audit_head: str | None = None
    signed_head: bool = False  # the data dir's audit.head went into the store


def held(db: PgConnection) -> dict[str, int]:
    """What a PostgreSQL database already holds of a Scaleout store: table -> rows (non-empty ones)."""
    tables = [r[0] for r in db.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()").fetchall()]
    out = {}
    for t in tables:
        if t in _TABLES or t == "blobs":
            (n,) = db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()  # type: ignore[misc]
            if n:
                out[t] = n
    return out


_TABLES = ("meta", "combiners", "clients", "packages", "models", "sessions", "rounds", "reports", "session_steps", "audit",
           "commands", "command_results", "tokens", "identities")


def drop(db: PgConnection) -> None:
    """Remove a Scaleout store's tables (and the large objects its blobs name) from a database."""
    with db.transaction():
        if db.execute("SELECT to_regclass('blobs')").fetchone()[0] is not None:  # type: ignore[index]
            db.execute("SELECT lo_unlink(oid) FROM blobs")
        for t in (*_TABLES, "blobs", "scaleout_secrets", "scaleout_active", "scaleout_controllers"):  # the old store's CA and keys too
            db.execute(f'DROP TABLE IF EXISTS "{t}" CASCADE')


def migrate(src: Path, url: str, *, replace: bool = False, progress: Callable[[str], None] = lambda line: None) -> Migrated:
    """Copy the data dir ``src`` into the empty PostgreSQL database at ``url``."""
    from scaleout.store.identities import Identities

    path = src / "state.db"
    if not path.is_file():
        raise ConfigError("from", f"{src} holds no state.db: is it a controller's data dir (serve --data-dir)?")
    if path.stat().st_size == 0:  # what a controller on a postgresql store leaves there: its state is in that store
        raise ConfigError("from", f"{path} is empty: nothing to migrate (a controller on a PostgreSQL store keeps its state in that store, not in its data dir)")
    source = State(path)  # brings an older state.db's columns up to date, as a start would
    Identities(source)
    target_db = PgConnection(url)
    try:
        there = held(target_db)
        if there and not replace:
            what = ", ".join(f"{n} {t}" for t, n in sorted(there.items()))
            raise ConfigError("to", f"{redact(url)} already holds a Scaleout store ({what}); migrate into an empty database, or pass --replace to drop what it holds first")
        if there:
            _refuse_if_active(url)
            progress(f"dropping what {redact(url)} holds ({sum(there.values())} rows)")
            drop(target_db)
    finally:
        target_db.close()
    target = State(url)
    Identities(target)
    blobs = PgBlobStore(url, src)
    out = Migrated()
    try:
        # Blobs first: rows that name a blob never arrive before it (a failure here leaves only
        # blobs, which a controller's start sweeps as unnamed).
        files = [(kind, p) for kind in BLOB_DIRS if (src / kind).is_dir() for p in sorted((src / kind).iterdir())
                 if p.is_file() and p.name.endswith(SUFFIXES[kind]) and len(p.name) == 64 + len(SUFFIXES[kind])]
        for i, (kind, p) in enumerate(files, 1):
            digest = p.name[:64]
            try:
                blobs.put_file(kind, p, digest)
            except IntegrityError as exc:
                raise ConfigError("from", f"{p} is damaged (its bytes hash to {exc.actual[:16]}..., not its name): restore it or remove it, then migrate again") from None
            out.blobs += 1
            out.blob_bytes += p.stat().st_size
            progress(f"blob {i}/{len(files)}: {kind}/{digest[:16]} ({p.stat().st_size / (1 << 20):.1f} MiB)")
        tables = [r[0] for r in source.db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()]
        with target.transaction():
            for table in tables:
                theirs = {r[1] for r in target.db.execute(f"PRAGMA table_info({table})").fetchall()}
                if not theirs:
                    progress(f"table {table}: not part of the store here, left out")
                    continue
                cols = [r[1] for r in source.db.execute(f'PRAGMA table_info("{table}")').fetchall() if r[1] in theirs]
                names = ", ".join(cols)
                insert = f"INSERT INTO {table}({names}) VALUES({', '.join('?' * len(cols))})"
                cur = source.db.execute(f'SELECT {names} FROM "{table}" ORDER BY rowid')
                n = 0
                while batch := cur.fetchmany(BATCH):
                    target.db.executemany(insert, [tuple(r) for r in batch])
                    n += len(batch)
                out.rows[table] = n
                progress(f"table {table}: {n} rows")
                seq = target.db.execute(f"SELECT pg_get_serial_sequence('{table}', 'id')").fetchone()[0] if "id" in cols and n else None
                if seq is not None:  # an identity column goes on after the ids copied
                    target.db.execute(f"SELECT setval('{seq}', (SELECT MAX(id) FROM {table}))")
            signed = _signed_head(src)
            if signed is not None:  # with the rows it names, in their transaction
                target.set_meta(AUDIT_ANCHOR, signed)
                out.signed_head = True
                progress(f"signed audit head: {src / HEAD_FILE} (checked with {src / KEY_FILE} or, once a controller runs on the store, the key file)")
            else:
                progress(f"signed audit head: none in {src} (a controller on the store writes one at start, and records that in the log)")
        out.audit_head = target.get_meta(AUDIT_HEAD)
        if out.audit_head != source.get_meta(AUDIT_HEAD):  # pragma: no cover (the copy is of the same rows)
            raise ConfigError("to", f"the copied audit head {out.audit_head} is not the source's {source.get_meta(AUDIT_HEAD)}")
    finally:
        blobs.close()
        target.close()
        source.close()
    # serve --store on this data dir then knows its state.db was moved, not left behind
    (src / MIGRATED).write_text(f"{redact(url)}\n")
    return out


def _signed_head(src: Path) -> str | None:
    """The text of the data dir's signed audit head, as it is (audit verify judges it), if it has one."""
    try:
        text = (src / HEAD_FILE).read_text()
        parse_anchor(text, str(src / HEAD_FILE))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    return text


MIGRATED = "state.db.migrated"  # beside a state.db that store migrate copied into PostgreSQL


def _refuse_if_active(url: str) -> None:
    """--replace must not drop a store a controller is running on: its lock says one is."""
    from scaleout.store.lease import LOCK_KEY, connect

    conn = connect(url, keepalive=False)
    try:
        (free,) = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        if not free:
            row = conn.execute("SELECT to_regclass('scaleout_active')").fetchone()
            active = conn.execute("SELECT url FROM scaleout_active WHERE id = 1").fetchone() if row and row[0] else None
            raise ConfigError("replace", f"a controller is active on {redact(url)}{f' ({active[0]})' if active else ''}: stop every controller on it before --replace drops what it holds")
    finally:
        conn.close()
