"""The audit hash chain and --since times, without a database."""

from __future__ import annotations

import datetime as dt

import pytest

from scaleout.core.audit import GENESIS, entry_hash, parse_since, verify_chain
from scaleout.core.errors import ConfigError


def chain(n: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    prev = GENESIS
    for i in range(1, n + 1):
        entry: dict[str, object] = {"id": i, "time": 1000.0 + i, "actor": "admin:x", "action": f"op{i}", "address": "127.0.0.1:1", "detail": "{}"}
        prev = entry_hash(prev, entry)
        entry["hash"] = prev
        out.append(entry)
    return out


def head(entries: list[dict[str, object]]) -> tuple[int, str]:
    return int(entries[-1]["id"]), str(entries[-1]["hash"])  # type: ignore[call-overload]


def test_an_intact_chain_verifies() -> None:
    entries = chain(5)
    assert verify_chain(entries, head(entries)) == (5, None)
    assert verify_chain([], None) == (0, None)


def test_each_field_is_covered() -> None:
    for key, value in (("time", 1.5), ("actor", "client:y"), ("action", "x"), ("address", None), ("detail", '{"a":1}'), ("id", 3)):
        entries = chain(3)
        h = head(entries)
        entries[1] = {**entries[1], key: value}
        _, broken = verify_chain(entries, h)
        assert broken is not None and broken.id in (2, 3), key


def test_deleted_moved_and_cut_entries_are_caught() -> None:
    entries = chain(5)
    h = head(entries)
    _, broken = verify_chain(entries[:2] + entries[3:], h)
    assert broken is not None and broken.id == 4 and "entry 3 is missing" in broken.reason
    _, broken = verify_chain(entries[1:], h)
    assert broken is not None and broken.id == 2
    swapped = [entries[0], {**entries[2], "id": 2}, {**entries[1], "id": 3}, *entries[3:]]
    _, broken = verify_chain(swapped, h)
    assert broken is not None and broken.id == 2
    _, broken = verify_chain(entries[:4], h)
    assert broken is not None and broken.id == 5 and "removed" in broken.reason
    _, broken = verify_chain(entries, None)
    assert broken is not None and "no recorded head" in broken.reason
    _, broken = verify_chain([], h)
    assert broken is not None and "empty" in broken.reason


def test_since_takes_iso_times_and_times_ago() -> None:
    now = 1_800_000_000.0
    assert parse_since("1h", now) == now - 3600
    assert parse_since("90s", now) == now - 90
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("1w", now) == now - 7 * 86400
    assert parse_since("1.5m", now) == now - 90
    want = dt.datetime(2026, 11, 29, 10, 0, tzinfo=dt.timezone.utc).timestamp()
    assert parse_since("2026-11-29T10:00:00Z", now) == want
    assert parse_since("2026-11-29T10:00:00", now) == want  # no zone: UTC
    assert parse_since("2026-11-29T11:00:00+01:00", now) == want
    assert parse_since("2026-11-29", now) == want - 10 * 3600
    for bad in ("", "yesterday", "1y", "-1h", "h"):
        with pytest.raises(ConfigError, match="since"):
            parse_since(bad, now)


def test_verify_log_against_a_signed_head() -> None:
    from scaleout.core.audit import Anchor, verify_log

    entries = chain(5)
    full = Anchor(5, str(entries[-1]["hash"]), 5)
    assert verify_log(entries, head(entries), full, exact=True) == (5, None)
    # The tail cut and state.db's head rewritten to match: the chain alone holds, the anchor does not.
    cut = entries[:3]
    assert verify_chain(cut, head(cut)) == (3, None)
    _, broken = verify_log(cut, head(cut), full, exact=True)
    assert broken is not None and broken.id == 4 and "entries after 3 were removed: the signed head names entry 5 of 5" in broken.reason
    # Everything deleted, head too.
    _, broken = verify_log([], None, full, exact=True)
    assert broken is not None and "the log is empty, but the signed head names entry 5 of 5" in broken.reason
    # A kept copy from earlier: the log may have grown past it, but not be rewritten under it.
    early = Anchor(3, str(entries[2]["hash"]), 3)
    assert verify_log(entries, head(entries), early, exact=False) == (5, None)
    _, broken = verify_log(entries, head(entries), early, exact=True)
    assert broken is not None and "goes on past the signed head's entry 3" in broken.reason
    forged = Anchor(3, "f" * 64, 3)
    _, broken = verify_log(entries, head(entries), forged, exact=False)
    assert broken is not None and broken.id == 3 and "another hash" in broken.reason
    assert verify_log([], None, Anchor(0, "", 0), exact=True) == (0, None)  # a new, empty log


def test_parse_anchor_refuses_what_is_not_a_head_file() -> None:
    from scaleout.core.audit import Anchor, anchor_text, parse_anchor

    anchor = Anchor(7, "a" * 64, 7)
    assert parse_anchor(anchor_text(anchor, "sig"), "x") == (anchor, "sig")
    for text in ("", "{}", "[1]", '{"id": -1, "hash": "a", "count": 1, "signature": "s"}', "x" * 5000):
        with pytest.raises(ConfigError, match="is not an audit head file"):
            parse_anchor(text, "kept.head")
