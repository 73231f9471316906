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
