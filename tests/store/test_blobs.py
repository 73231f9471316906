from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from scaleout.core.errors import IntegrityError, NotFoundError, PayloadError
from scaleout.store.blobs import BlobStore, release

DATA = b"model bytes \x00\xff"
DIGEST = hashlib.sha256(DATA).hexdigest()


def test_put_get_has(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert not store.has("models", DIGEST, ".safetensors")
    assert store.put("models", DATA, ".safetensors") == DIGEST
    assert (tmp_path / "models" / f"{DIGEST}.safetensors").read_bytes() == DATA
    assert store.has("models", DIGEST, ".safetensors")
    assert store.get("models", DIGEST, ".safetensors") == DATA


def test_kind_and_suffix_are_part_of_the_address(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put("models", DATA, ".safetensors")
    assert not store.has("packages", DIGEST, ".safetensors")
    assert not store.has("models", DIGEST, ".tgz")
    with pytest.raises(NotFoundError) as info:
        store.get("packages", DIGEST, ".safetensors")
    assert info.value.kind == "packages" and info.value.key == DIGEST


def test_put_is_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first = store.put("packages", DATA, ".tgz")
    path = tmp_path / "packages" / f"{first}.tgz"
    mtime = path.stat().st_mtime_ns
    assert store.put("packages", DATA, ".tgz") == first
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    other = store.put("packages", b"other", ".tgz")
    assert other != first
    assert sorted(p.name for p in (tmp_path / "packages").iterdir()) == sorted([f"{first}.tgz", f"{other}.tgz"])


def test_empty_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.put("models", b"", ".bin")
    assert digest == hashlib.sha256(b"").hexdigest()
    assert store.get("models", digest, ".bin") == b""


def test_corrupt_file_raises_integrity_error(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put("models", DATA, ".safetensors")
    (tmp_path / "models" / f"{DIGEST}.safetensors").write_bytes(DATA + b"!")
    with pytest.raises(IntegrityError) as info:
        store.get("models", DIGEST, ".safetensors")
    assert isinstance(info.value, PayloadError)
    assert info.value.expected == DIGEST
    assert info.value.actual == hashlib.sha256(DATA + b"!").hexdigest()
    assert "corrupt" in str(info.value) and "stored models file" in str(info.value)


def test_reopened_store_reads_existing_files(tmp_path: Path) -> None:
    BlobStore(tmp_path).put("models", DATA, ".bin")
    assert BlobStore(tmp_path).get("models", DIGEST, ".bin") == DATA


@pytest.mark.parametrize(
    "digest",
    ["", "abc", DIGEST[:-1], DIGEST + "0", DIGEST.upper(), "g" * 64, "../" + DIGEST[3:], "/" + DIGEST[1:], " " + DIGEST[1:]],
)
def test_bad_digest_is_not_found(tmp_path: Path, digest: str) -> None:
    store = BlobStore(tmp_path)
    store.put("models", DATA, ".bin")
    with pytest.raises(NotFoundError) as info:
        store.get("models", digest, ".bin")
    assert info.value.kind == "models" and info.value.key == digest


def test_missing_digest_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        BlobStore(tmp_path).get("models", "0" * 64, ".bin")


def test_pieces_are_stored_as_the_bytes_they_make_and_mapped_back_checked(tmp_path: Path) -> None:
    import numpy as np

    from scaleout.transport.link import Pieces

    store = BlobStore(tmp_path)
    array = np.arange(3000, dtype=np.float32)
    pieces = Pieces([b"head", array, b"", b"tail"])
    joined = b"head" + array.tobytes() + b"tail"
    digest = store.put("models", pieces, ".safetensors")
    assert digest == hashlib.sha256(joined).hexdigest()
    path = tmp_path / "models" / f"{digest}.safetensors"
    assert path.read_bytes() == joined
    mapped = store.map("models", digest, ".safetensors")
    assert mapped[:] == joined and len(mapped) == len(joined)
    release(mapped, 4097, 100)  # a stretch, page-aligned inside: the bytes read back the same
    release(mapped)
    assert mapped[:] == joined
    mapped.close()
    # A corrupt file is refused when mapped with its check, and mapped as it is without.
    path.write_bytes(joined[:-1] + b"X")
    with pytest.raises(IntegrityError):
        store.map("models", digest, ".safetensors")
    assert store.map("models", digest, ".safetensors", check=False)[-1:] == b"X"
    with pytest.raises(NotFoundError):
        store.map("models", "0" * 64, ".safetensors")


def test_a_new_model_is_hashed_as_it_is_written_not_in_a_pass_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """put() names the file by its sha256, taken of each stretch as it goes to the file: the
    bytes of the model are read once. Seen from the hash (the real one, watched): each stretch
    it is given comes after the ones before it are in the file, not before any is."""
    import numpy as np

    from scaleout.store import blobs
    from scaleout.transport.link import Pieces

    monkeypatch.setattr(blobs, "WRITE_STRETCH", 1 << 16)
    array = np.arange(3 << 16, dtype=np.float32)  # 768 KiB: 12 stretches
    pieces = Pieces([b"head", array, b"tail"])
    joined = b"head" + array.tobytes() + b"tail"
    written_before: list[int] = []  # bytes in the half-written file when the hash took each stretch
    real = hashlib.sha256

    class Watched:
        def __init__(self, data: bytes = b"") -> None:
            self.h = real(data)

        def update(self, data: bytes) -> None:
            written_before.append(sum(p.stat().st_size for p in (tmp_path / "models").glob(".*.tmp")))
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Watched)
    digest = BlobStore(tmp_path).put("models", pieces, ".safetensors")
    monkeypatch.undo()
    assert digest == hashlib.sha256(joined).hexdigest()
    assert (tmp_path / "models" / f"{digest}.safetensors").read_bytes() == joined
    assert len(written_before) >= 12 and written_before == sorted(written_before)
    assert written_before[-1] >= len(joined) - 4 - (1 << 16), written_before  # all but the last stretch were in the file
