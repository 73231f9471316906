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
