"""What a compute package may unpack to: the same limits at both ends (the controller's
``package set-active`` and every client), so the controller refuses what a client would."""

from __future__ import annotations

from dataclasses import dataclass

from scaleout.core.units import fmt_bytes

MIB = 1 << 20


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int = 1024 * MIB  # total size of the unpacked files
    max_files: int = 10_000  # files and directories
    max_depth: int = 32  # directories from the package's top to a file
    max_ratio: int = 100  # unpacked size at most this many times the archive's (beyond FREE_BYTES)
    max_path: int = 1024  # characters of one member's path
    max_header: int = 64 * 1024  # bytes of one pax extended header or GNU long name/link (read before tarfile sees it)
    max_headers: int = 16 * MIB  # bytes of all of them in one archive (each is parsed: many small ones cost CPU)

    FREE_BYTES = 16 * MIB  # a small package may expand more than max_ratio: only its total counts

    def max_total(self, archive_size: int) -> int:
        """The unpacked size allowed for an archive of ``archive_size`` bytes."""
        return min(self.max_bytes, max(self.FREE_BYTES, self.max_ratio * archive_size))

    def describe(self) -> str:
        return f"{fmt_bytes(self.max_bytes)}, {self.max_files} files, depth {self.max_depth}, {self.max_ratio}x the archive"
