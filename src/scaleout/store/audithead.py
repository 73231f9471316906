"""The audit log's head kept outside state.db: DATA_DIR/audit.head, HMAC-signed with
DATA_DIR/audit.key (see core/audit.py for why and how it is checked)."""

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
        anchor, signature = parse_anchor(text, where)
        if not hmac.compare_digest(signature, self.sign(anchor)):
            raise ConfigError("head", f"{where} is not signed by this controller (its signature does not verify)")
        return anchor


def verify(rows: Any, meta_head: str | None, head_file: HeadFile | None, kept: str | None = None, kept_where: str = "--head") -> dict[str, Any]:
    """`audit verify`'s result for a log (``rows`` in id order, ``meta_head`` state.db's
    "<id> <hash>"): the chain, then the signed head file beside state.db (exactly: when its
    key can be read), then ``kept``, the text of a head file the operator kept (a prefix)."""
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
        broken = Broken(head[0] if head else None, f"no signed audit head ({HEAD_FILE} and {KEY_FILE}) beside state.db to check the log against: pass a copy you kept with --head FILE")
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
