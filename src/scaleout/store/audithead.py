"""The audit log's signed head: DATA_DIR/audit.head beside state.db, HMAC-signed with
DATA_DIR/audit.key (see core/audit.py for why and how it is checked); on a PostgreSQL store,
a row of the store itself (``StoreHead``), so every controller on it keeps the same one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from scaleout.core.audit import HEAD_FILE, Anchor, anchor_text, parse_anchor
from scaleout.core.errors import ConfigError
from scaleout.security.tls import write_private

KEY_FILE = "audit.key"
# Where a PostgreSQL store keeps its signed head: a meta row (state.AUDIT_ANCHOR), written in
# the transaction of the entry it names. Signed, not sealed: what it says (the newest entry's id
# and hash, the count) is in the audit table beside it anyway; what matters is that nobody
# without the audit key can write one, which the signature gives. A sealed row would not stop
# an older one being put back either: only the log going on past it (exact) or a kept copy does.
STORE_WHERE = "in the store (meta audit_anchor)"


class HeadFile:
    """Writes and reads one data directory's signed audit head."""

    def __init__(self, key: bytes, path: Path) -> None:
        self._key = key
        self.path = path

    @classmethod
    def load_or_create(cls, data_dir: Path) -> HeadFile:
        key_path = data_dir / KEY_FILE
        if not key_path.exists():
            write_private(key_path, os.urandom(32))
        return cls(key_path.read_bytes(), data_dir / HEAD_FILE)

    @classmethod
    def load(cls, data_dir: Path) -> HeadFile | None:
        """The head of a data directory whose key can be read (None otherwise: `--state` on a copy)."""
        try:
            return cls((data_dir / KEY_FILE).read_bytes(), data_dir / HEAD_FILE)
        except OSError:
            return None

    def sign(self, anchor: Anchor) -> str:
        return base64.b64encode(hmac.new(self._key, anchor.message(), hashlib.sha256).digest()).decode("ascii")

    def write(self, anchor: Anchor) -> None:
        """Atomically: a reader sees the old head or the new one, never half. Not fsynced:
        state.db, whose end it names, commits without one too (WAL, synchronous=NORMAL), and
        it is rewritten after every audited action on the controller's loop; one flush to
        disk each made 10,000 clients enrolling at once stall the loop until links timed out."""
        write_private(self.path, anchor_text(anchor, self.sign(anchor)).encode(), sync=False)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self, path: Path | None = None, text: str | None = None) -> Anchor:
        """The anchor in ``path`` (this directory's head file by default) or ``text``,
        refused unless this controller signed it."""
        where = str(path or self.path)
        if text is None:
            try:
                text = (path or self.path).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError("head", f"cannot read the audit head {where}: {exc}") from None
        return self.check(text, where)

    def check(self, text: str, where: str) -> Anchor:
        """The anchor in ``text``, refused unless signed with this key."""
        subject = f"the signed head {where}" if where == STORE_WHERE else where
        anchor, signature = parse_anchor(text, subject)
        if not hmac.compare_digest(signature, self.sign(anchor)):
            raise ConfigError("head", f"{subject} is not signed by this controller (its signature does not verify)")
        return anchor

    def signed(self, anchor: Anchor) -> str:
        """The text of a head file (or of a store's head row) for ``anchor``."""
        return anchor_text(anchor, self.sign(anchor))

    def in_store(self, text: str | None) -> StoreHead:
        """The head a PostgreSQL store holds (``text``, None when it has none), checked with this key."""
        return StoreHead(self._key, text)


class StoreHead(HeadFile):
    """A PostgreSQL store's signed head, as read from it (``text``) with the rows it names,
    to check with the store's audit key (any controller's data dir on it has that key, or the
    key file that unseals it)."""

    def __init__(self, key: bytes, text: str | None) -> None:
        super().__init__(key, Path(STORE_WHERE))
        self.text = text

    def write(self, anchor: Anchor) -> None:  # pragma: no cover (State writes the row, in the entry's transaction)
        raise TypeError("a store's signed head is written by State.audit, in the transaction of its entry")

    def exists(self) -> bool:
        return self.text is not None

    def read(self, path: Path | None = None, text: str | None = None) -> Anchor:
        if text is not None:  # a kept copy, checked with the store's key
            return self.check(text, str(path or STORE_WHERE))
        if self.text is None:
            raise ConfigError("head", f"the signed head {STORE_WHERE} is missing (removed with the entries it named?)")
        return self.check(self.text, STORE_WHERE)


def verify(
    rows: Any, meta_head: str | None, head_file: HeadFile | None, kept: str | None = None, kept_where: str = "--head", no_key: str | None = None,
) -> dict[str, Any]:
    """`audit verify`'s result for a log (``rows`` in id order, ``meta_head`` state.db's
    "<id> <hash>"): the chain, then the signed head file beside state.db (exactly: when its
    key can be read; a ``StoreHead`` on a PostgreSQL store), then ``kept``, the text of a head
    file the operator kept (a prefix). ``no_key``: why there is no ``head_file``, when it is None."""
    from scaleout.core.audit import Broken, verify_chain, verify_log

    head: tuple[int, str] | None = None
    if meta_head:
        eid, _, digest = meta_head.partition(" ")
        head = (int(eid) if eid.isdigit() else 0, digest)
    entries = [dict(r) for r in rows]
    checked, broken = verify_chain(entries, head)
    anchored: list[str] = []
    checks: list[tuple[str, bool, str | None]] = []
    beside = head_file is not None and head_file.exists()
    if head_file is not None and (beside or kept is None):
        checks.append((str(head_file.path), True, None))
    elif broken is None and entries and kept is None:
        # Deleting audit.head and audit.key with the entries must not pass: a kept copy decides then.
        broken = Broken(head[0] if head else None, no_key or f"no signed audit head ({HEAD_FILE} and {KEY_FILE}) beside state.db to check the log against: pass a copy you kept with --head FILE")
    if kept is not None:
        checks.append((kept_where, False, kept))
    for where, exact, text in checks:
        if broken is not None:
            break
        try:
            if text is None and head_file is not None and not head_file.exists():
                raise ConfigError("", f"the signed head {where} is missing (removed with the entries it named?)")
            if head_file is None:
                anchor, _ = parse_anchor(text or "", where)  # no key here to check its signature with
            else:
                anchor = head_file.read(Path(where), text)
        except ConfigError as exc:
            broken = Broken(head[0] if head else None, exc.problem)
            break
        checked, broken = verify_log(entries, head, anchor, exact=exact)
        if broken is not None and exact and text is None and head_file is not None and "goes on past" in broken.reason:
            # A running controller writes the file just after its commit: read it once more.
            checked, broken = verify_log(entries, head, head_file.read(), exact=True)
        if broken is None:
            anchored.append(where)
    warnings = [
        f"entry {e['id']}: the signed audit head was {_reason(e)} at start and was rewritten (entries cut before then are caught only by a kept copy, --head)"
        for e in entries if e.get("action") == "audit.head_rewritten"
    ]
    result: dict[str, Any] = {"ok": broken is None, "entries": checked, "head": meta_head, "anchored": anchored, "warnings": warnings}
    if broken is not None:
        result["broken"] = {"id": broken.id, "reason": broken.reason}
    return result


def _reason(entry: dict[str, Any]) -> str:
    try:
        detail = json.loads(entry.get("detail") or "{}")
    except ValueError:
        detail = {}
    return str(detail.get("reason") or "missing") if isinstance(detail, dict) else "missing"
