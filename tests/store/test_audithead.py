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


def test_entries_appended_together_rewrite_the_head_once_and_count_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A burst of enrolments is audited in one transaction (roles/enrolment.py AuditBatch):
    # one rewrite of the head, which still names the last entry and counts every one.
    from scaleout.store.state import State

    st = State(tmp_path / "state.db")
    head = HeadFile.load_or_create(tmp_path)
    assert st.anchor_audit(head) == "missing"
    st.audit("admin:x", "token.create", address=None, role="client")
    writes: list[Anchor] = []
    real = head.write
    monkeypatch.setattr(head, "write", lambda anchor: (writes.append(anchor), real(anchor))[1])
    st.audit_many([(f"client:k{i}", "node.enrol", "127.0.0.1:1", {"name": f"k{i}"}) for i in range(5)])
    assert len(writes) == 1
    (count,) = st.db.execute("SELECT COUNT(*) FROM audit").fetchone()
    last = st.audit_log(limit=1)[0]
    assert head.read() == Anchor(last["id"], last["hash"], count) and count == 6
    assert st.audit_verify(head.read())[1] is None  # the chain holds across the batch
    st.audit("admin:x", "token.revoke", address=None, id="k0")  # and goes on, counted, after it
    assert head.read().count == 7
    # A second State on the same files agrees: nothing to rewrite at its start.
    assert State(tmp_path / "state.db").anchor_audit(HeadFile.load_or_create(tmp_path)) is None
