"""The audit log's hash chain and the times ``audit ls --since`` takes (pure: no I/O, no clock).

Each entry's hash is ``sha256(previous entry's hash + its canonical content)``; the first
entry follows ``GENESIS``. The content includes the entry's id, so an edited, deleted or
reordered entry breaks the chain from there on; the newest entry's id and hash are kept
beside the log (the head), so cutting entries off the end is caught too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from scaleout.core.errors import ConfigError

GENESIS = "0" * 64
FIELDS = ("id", "time", "actor", "action", "address", "detail")
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes an entry's hash covers: its fields as they are stored (``detail`` is the
    stored JSON text), as compact JSON with sorted keys."""
    return json.dumps({k: entry.get(k) for k in FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(prev: str, entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev.encode("ascii") + canonical(entry)).hexdigest()


@dataclass(frozen=True)
class Broken:
    """Where the chain first fails: the entry's id (or the head's) and why."""

    id: int | None
    reason: str


def verify_chain(entries: Iterable[Mapping[str, Any]], head: tuple[int, str] | None) -> tuple[int, Broken | None]:
    """Check entries (in id order, with their stored ``prev``-less ``hash``) against the chain
    and the head; returns (entries checked, the first break or None)."""
    prev = GENESIS
    count = 0
    last: tuple[int, str] | None = None
    expected_id: int | None = None
    for entry in entries:
        count += 1
        eid = int(entry["id"])
        if expected_id is not None and eid != expected_id:
            return count, Broken(eid, f"entry {expected_id} is missing (the next one is {eid})")
        want = entry_hash(prev, entry)
        if entry.get("hash") != want:
            return count, Broken(eid, "its content or position does not match its hash (edited, moved or removed before it)")
        prev = want
        last = (eid, want)
        expected_id = eid + 1
    if head is None:
        if last is not None:
            return count, Broken(last[0], "the log has entries but no recorded head")
        return count, None
    if last is None:
        return count, Broken(head[0], f"the log is empty but its head names entry {head[0]}")
    if last != head:
        if last[0] < head[0]:
            return count, Broken(last[0] + 1, f"entries after {last[0]} were removed (the head names entry {head[0]})")
        return count, Broken(last[0], f"the head names entry {head[0]}, the log ends at entry {last[0]} with another hash")
    return count, None


def parse_since(text: str, now: float) -> float:
    """Unix seconds from ``2026-11-29T10:00:00Z`` (ISO 8601; no zone means UTC), ``2026-11-29``,
    or a time ago: ``90s``, ``15m``, ``1h``, ``2d``, ``1w``."""
    value = text.strip() if isinstance(text, str) else ""
    match = _RELATIVE.fullmatch(value.lower())
    if match:
        return now - float(match[1]) * _UNITS[match[2]]
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError("since", f"expected an ISO time like 2026-11-29T10:00:00Z or a time ago like 1h, 30m, 2d; got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


# -- the head outside state.db ------------------------------------------------------------
#
# state.db keeps its head in the meta table, so whoever can edit the file can cut the tail
# and rewrite the head to match: no hashing needed. The controller therefore also writes
# the head, signed with its token key, to a file beside state.db (HEAD_FILE), after each
# append; `audit verify` checks the log against it (exactly: it is always the newest), and
# `audit verify --head FILE` against a copy the operator kept (a prefix: the log may have
# grown since). The count is part of it, so a log emptied with its head is caught too.

HEAD_FILE = "audit.head"
_HEAD_CONTEXT = b"scaleout audit head v1\n"


@dataclass(frozen=True)
class Anchor:
    """A signed statement of the log's newest entry (id, hash) and its number of entries."""

    id: int
    hash: str
    count: int

    def message(self) -> bytes:
        """The bytes the controller signs."""
        return _HEAD_CONTEXT + json.dumps({"id": self.id, "hash": self.hash, "count": self.count}, sort_keys=True).encode()


def anchor_text(anchor: Anchor, signature: str) -> str:
    return json.dumps({"id": anchor.id, "hash": anchor.hash, "count": anchor.count, "signature": signature}) + "\n"


def parse_anchor(text: str | bytes, where: str) -> tuple[Anchor, str]:
    """(anchor, base64 signature) from a head file's text; ConfigError naming ``where``."""
    try:
        body = json.loads(text) if len(text) < 4096 else None
    except (ValueError, UnicodeDecodeError):
        body = None
    ok = isinstance(body, dict) and all(type(body.get(k)) is int and body[k] >= 0 for k in ("id", "count"))
    ok = ok and isinstance(body.get("hash"), str) and isinstance(body.get("signature"), str)  # type: ignore[union-attr]
    if not ok:
        raise ConfigError("head", f"{where} is not an audit head file (a JSON object with id, hash, count and signature)")
    assert isinstance(body, dict)
    return Anchor(body["id"], body["hash"], body["count"]), body["signature"]


def verify_log(
    entries: Iterable[Mapping[str, Any]], head: tuple[int, str] | None, anchor: Anchor | None, *, exact: bool
) -> tuple[int, Broken | None]:
    """`verify_chain`, then the log against ``anchor``: ``exact`` for the controller's own head
    file (the log must end at it, with its count), else a kept copy (the log must still hold
    that entry with that hash, and at least that many entries)."""
    seen: dict[str, Any] = {}

    def tap() -> Iterable[Mapping[str, Any]]:
        for entry in entries:
            if anchor is not None and int(entry["id"]) == anchor.id:
                seen["hash"] = entry.get("hash")
            yield entry

    checked, broken = verify_chain(tap(), head)
    if broken is not None or anchor is None:
        return checked, broken
    last_id = head[0] if head is not None and checked else 0
    if checked < anchor.count:
        if checked == 0:
            return checked, Broken(anchor.id, f"the log is empty, but the signed head names entry {anchor.id} of {anchor.count}")
        return checked, Broken(last_id + 1, f"entries after {last_id} were removed: the signed head names entry {anchor.id} of {anchor.count}")
    if anchor.count and seen.get("hash") != anchor.hash:
        return checked, Broken(anchor.id, f"entry {anchor.id} is not the one the signed head names (another hash)")
    if exact and (checked != anchor.count or (anchor.count and last_id != anchor.id)):
        return checked, Broken(anchor.id, f"the log goes on past the signed head's entry {anchor.id} ({checked} entries, the head says {anchor.count})")
    return checked, None
