"""The signed audit head beside state.db: rewritten after every audited action."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from scaleout.core.audit import Anchor
from scaleout.store.audithead import HeadFile


def test_the_head_is_replaced_whole_without_a_disk_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each enrolment, token and commit rewrites it on the controller's loop: a flush to disk
    # each stalled the loop (10,000 clients enrolling); state.db commits without one too.
    flushed: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(fd), real(fd))[1])
    head = HeadFile.load_or_create(tmp_path)
    assert len(flushed) == 1  # its key is a secret written once: flushed
    for i in range(1, 4):
        head.write(Anchor(i, f"{i:064x}", i))
    assert len(flushed) == 1
    assert head.read() == Anchor(3, f"{3:064x}", 3)
    assert stat.S_IMODE(head.path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_burst_of_entries_rewrites_the_head_once_per_interval(tmp_path: Path) -> None:
    from scaleout.store.audithead import HeadFile as Head
    from scaleout.store.state import State

    st = State(tmp_path / "state.db")
    head = Head.load_or_create(tmp_path)
    st.anchor_audit(head)
    due: list[tuple[float, object]] = []
    st.schedule = lambda delay, fn: due.append((delay, fn))
    for i in range(50):
        st.audit("client", "node.enrol", n=i)
    # The first of a burst is written at once unless the last write was a moment ago (the
    # one anchor_audit made at start); the others wait for a single write of the newest.
    assert head.read().count in (0, 1) and len(due) == 1
    delay, write = due.pop()
    assert 0 <= delay <= 0.05
    write()  # type: ignore[operator]
    assert head.read().count == 50 and due == []
    st.audit("admin", "last")
    st.close()  # whatever waits is written before state.db closes
    anchor = Head.load(tmp_path).read()  # type: ignore[union-attr]
    assert anchor.count == 51
