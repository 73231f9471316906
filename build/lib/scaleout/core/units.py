"""Human-readable sizes for logs, error messages and reprs."""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    """``fmt_bytes(1536)`` -> ``'1.5 KiB'``; whole bytes below 1 KiB, GiB at most."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
