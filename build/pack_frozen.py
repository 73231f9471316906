"""Make dist/scaleout: build/launcher.c's binary followed by PyInstaller's one-folder build as a
deflate stream and a trailer (the layout is described at the top of launcher.c).

Usage: python build/pack_frozen.py LAUNCHER FOLDER OUT
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

MAGIC = b"SCOLNCH1"


def entries(root: Path) -> Iterator[tuple[bytes, Path]]:
    """(type, path) for every directory, file and symlink under root, parents first, sorted so
    the same folder always gives the same payload."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in dirnames:
            p = base / name
            yield (b"l" if p.is_symlink() else b"d"), p
        for name in sorted(filenames):
            p = base / name
            yield (b"l" if p.is_symlink() else b"f"), p


def pack(launcher: Path, folder: Path, out: Path) -> tuple[int, str]:
    comp = zlib.compressobj(level=6)
    digest = hashlib.sha256()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(launcher.read_bytes())
        offset = f.tell()

        def put(data: bytes) -> None:
            chunk = comp.compress(data)
            digest.update(chunk)
            f.write(chunk)

        for kind, path in entries(folder):
            rel = path.relative_to(folder).as_posix().encode()
            if kind == b"l":
                data = os.readlink(path).encode()
                mode = 0o777
            else:
                mode = stat.S_IMODE(path.stat().st_mode)
                data = b""
            size = path.stat().st_size if kind == b"f" else len(data)
            put(kind + struct.pack("<HIQ", mode, len(rel), size) + rel + data)
            if kind == b"f":
                with open(path, "rb") as src:
                    while block := src.read(1 << 20):
                        put(block)
        tail = comp.flush()
        digest.update(tail)
        f.write(tail)
        length = f.tell() - offset
        key = digest.hexdigest()[:32].encode()
        f.write(key + struct.pack("<QQ", offset, length) + b"\0" * 8 + MAGIC)
    tmp.chmod(0o755)
    tmp.replace(out)
    return out.stat().st_size, key.decode()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    size, key = pack(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    print(f"{sys.argv[3]}: {size / 1e6:.1f} MB, unpacks once into the cache as frozen-{key}")
