"""The stores on a really full disk: a small tmpfs filled to the last byte.

Mounting needs root (CI runs as root); elsewhere these tests skip and say why.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scaleout.core.errors import ScaleoutError, StorageError
from scaleout.store.blobs import BlobStore
from scaleout.store.state import State

DATA = os.urandom(64 * 1024)
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, unmounted at teardown even when the test fails."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs these as root)")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)  # busy: detach it anyway


def fill(directory: Path) -> Path:
    """A file that takes every free byte of ``directory``'s file system."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return path


def test_put_on_a_full_disk_names_the_reason_and_leaves_no_temp_file(disk: Path) -> None:
    store = BlobStore(disk)
    (disk / "models").mkdir()
    filler = fill(disk)
    with pytest.raises(StorageError) as info:
        store.put("models", DATA, ".safetensors")
    err = info.value
    assert isinstance(err, ScaleoutError) and err.code == "storage" and err.errno == errno.ENOSPC
    path = disk / "models" / f"{DIGEST}.safetensors"
    assert str(err) == f"no space left on device while writing model {path}"
    assert err.path == str(path) and err.problem == "No space left on device"
    assert list((disk / "models").iterdir()) == []  # no temp file, no partial model
    assert not store.has("models", DIGEST, ".safetensors")

    filler.unlink()
    assert store.put("models", DATA, ".safetensors") == DIGEST
    assert store.get("models", DIGEST, ".safetensors") == DATA
    assert [p.name for p in (disk / "models").iterdir()] == [path.name]


def test_put_of_a_package_that_cannot_fit(disk: Path) -> None:
    store = BlobStore(disk)
    too_big = os.urandom(600 * 1024)  # larger than the whole disk: fails half-written
    with pytest.raises(StorageError, match=r"^no space left on device while writing package .*\.tgz$"):
        store.put("packages", too_big, ".tgz")
    assert list((disk / "packages").iterdir()) == []
    assert os.statvfs(disk).f_bfree == os.statvfs(disk).f_blocks  # the half-written bytes were freed


def test_state_on_a_full_disk_refuses_writes_whole_and_recovers(disk: Path) -> None:
    st = State(disk / "state.db")
    try:
        st.commit_model("a" * 64, 10, aggregator="seed")
        st.add_session("s1", {"rounds": 2}, "a" * 64)
        st.start_round("s1", 1, "a" * 64, ["c1"])
        filler = fill(disk)

        with pytest.raises(StorageError) as info:
            st.commit_round("s1", 1, "b" * 64, 10, parent="a" * 64, aggregator="fedavg", contributors=["c1"])
        assert str(info.value) == f"no space left on device while writing {disk / 'state.db'}"
        assert not st.db.in_transaction  # rolled back whole, the connection stays usable
        with pytest.raises(StorageError):
            st.end_session("s1", "failed", "a" * 64, "round 1: disk full", round_reason="disk full")
        # Nothing half-done: reads still work and show the state before the failed writes.
        assert st.get_meta("active_model") == "a" * 64
        assert [m["id"] for m in st.models()] == ["a" * 64]
        row = st.session("s1")
        assert row["status"] == "running" and row["rounds"][0]["status"] == "running"

        filler.unlink()
        st.end_session("s1", "failed", "a" * 64, "round 1: disk full", finished=1234.0, round_reason="disk full")
        row = st.session("s1")
        assert (row["status"], row["reason"], row["finished"]) == ("failed", "round 1: disk full", 1234.0)
        (r,) = row["rounds"]
        assert (r["status"], r["reason"], r["finished"]) == ("failed", "disk full", 1234.0)
    finally:
        st.close()
