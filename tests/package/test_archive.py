from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from scaleout.core.errors import PackageError
from scaleout.package.archive import create_archive, extract_archive, read_ignore

from .conftest import IMPORTING_YAML, MakePackage

IGNORE = """\
# data and logs stay home

*.csv
!keep.csv
data/
/top.txt
**/secret.txt
logs/*
!logs/important.log
"""

FILES = {
    "scaleout.yaml": IMPORTING_YAML,
    ".scaleoutignore": IGNORE,
    "build.py": "def build():\n    pass\n",
    "a.csv": "1",
    "keep.csv": "2",
    "sub/b.csv": "3",
    "sub/keep.csv": "4",
    "data/x.bin": "5",
    "sub/data/y.bin": "6",
    "sub/data.txt": "file named like an ignored dir",
    "top.txt": "7",
    "sub/top.txt": "8",
    "deep/er/secret.txt": "9",
    "logs/run.log": "10",
    "logs/important.log": "11",
    "__pycache__/build.cpython-311.pyc": "",
    "sub/mod.pyc": "",
    ".git/config": "",
}

KEPT = {
    ".scaleoutignore", "scaleout.yaml", "build.py", "keep.csv", "sub/keep.csv", "sub/data.txt",
    "sub/top.txt", "logs/important.log",
}  # fmt: skip


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_ignore(make_package: MakePackage) -> None:
    root = make_package({".scaleoutignore": IGNORE})
    assert read_ignore(root) == [line for line in IGNORE.splitlines() if line and not line.startswith("#")]
    assert read_ignore(make_package({}, "empty")) == []


def test_archive_honours_ignore_file(make_package: MakePackage) -> None:
    root = make_package(FILES)
    archive = create_archive(root)
    assert archive == root.parent / "client.tgz"
    files = {name.removeprefix("client/") for name, m in members(archive).items() if m.isfile()}
    assert files == KEPT


def test_archive_is_deterministic(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package(FILES)
    first = create_archive(root, tmp_path / "one.tgz")
    os.utime(root / "build.py", (1, 1))
    second = create_archive(root, tmp_path / "two.tgz")
    assert sha(first) == sha(second)
    (root / "build.py").write_text("def build():\n    return 1\n")
    assert sha(create_archive(root, tmp_path / "three.tgz")) != sha(first)


def test_archive_inside_root_skips_itself_and_reports_progress(make_package: MakePackage) -> None:
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "build.py": "x" * 1000})
    calls: list[tuple[int, int]] = []
    archive = create_archive(root, root / "pkg.tgz", progress=lambda done, total: calls.append((done, total)))
    create_archive(root, root / "pkg.tgz")
    assert "client/pkg.tgz" not in members(archive)
    total = len(IMPORTING_YAML) + 1000
    assert calls[-1] == (total, total) and len(calls) == 2


def test_archive_refuses_non_package(tmp_path: Path) -> None:
    (tmp_path / "client").mkdir()
    with pytest.raises(PackageError, match="scaleout.yaml"):
        create_archive(tmp_path / "client")


def test_extract_round_trip(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package(FILES)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    archive = create_archive(root)
    out = extract_archive(archive.read_bytes(), tmp_path / "dest")
    assert out == tmp_path / "dest" / "client"
    for rel in KEPT | {"run.sh"}:
        assert (out / rel).read_bytes() == (root / rel).read_bytes()
    assert os.access(out / "run.sh", os.X_OK) and not os.access(out / "build.py", os.X_OK)
    assert not (out / "a.csv").exists()


def tgz(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, content in entries:
            info.size = len(content) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


YAML = (member("scaleout.yaml"), b"entry_points: {build: build.py}\n")


def test_extract_archive_without_top_level_dir(tmp_path: Path) -> None:
    data = tgz([YAML, (member("./build.py"), b"")])
    assert extract_archive(data, tmp_path / "dest") == tmp_path / "dest"
    assert (tmp_path / "dest" / "build.py").is_file()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ((member("../evil.py"), b"x"), "escapes"),
        ((member("pkg/../../evil.py"), b"x"), "escapes"),
        ((member("/etc/evil.py"), b"x"), "absolute"),
        ((member("link", tarfile.SYMTYPE, "/etc/passwd"), b""), "link or special"),
        ((member("hard", tarfile.LNKTYPE, "scaleout.yaml"), b""), "link or special"),
        ((member("dev", tarfile.CHRTYPE), b""), "link or special"),
        ((member("fifo", tarfile.FIFOTYPE), b""), "link or special"),
    ],
)
def test_extract_refuses_malicious_members(tmp_path: Path, entry: tuple[tarfile.TarInfo, bytes], message: str) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(PackageError, match=message):
        extract_archive(tgz([YAML, entry]), dest)
    assert not dest.exists()
    assert not (tmp_path / "evil.py").exists()


def test_extract_refuses_oversized_archive(tmp_path: Path) -> None:
    data = tgz([YAML, (member("big.bin"), b"\0" * 5000)])
    with pytest.raises(PackageError, match="more than 4096 bytes"):
        extract_archive(data, tmp_path / "dest", max_bytes=4096)
    assert extract_archive(data, tmp_path / "ok", max_bytes=10_000) == tmp_path / "ok"


@pytest.mark.parametrize("cut", [None, 20, -30])
def test_extract_refuses_corrupt_bytes(tmp_path: Path, cut: int | None) -> None:
    good = tgz([YAML, (member("big.bin"), os.urandom(4000))])
    data = b"definitely not a gzip stream" if cut is None else good[:cut]
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(PackageError, match="corrupt"):
        extract_archive(data, dest)
    assert dest.is_dir() and not any(dest.iterdir())


def test_extract_requires_project_file_and_empty_dest(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no scaleout.yaml"):
        extract_archive(tgz([(member("pkg/build.py"), b"")]), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.txt").write_text("")
    with pytest.raises(PackageError, match="not an empty directory"):
        extract_archive(tgz([YAML]), tmp_path / "b")
