"""A client's unpacked packages live in a bounded cache."""

from __future__ import annotations

import os
from pathlib import Path

from scaleout.roles.client import prune_packages


def test_the_newest_packages_are_kept_and_the_one_in_use_always(tmp_path: Path) -> None:
    cache = tmp_path / "package"
    dirs = []
    for i in range(6):
        d = cache / f"p{i}"
        d.mkdir(parents=True)
        (d / ".complete").write_text(str(d))
        os.utime(d / ".complete", (1000 + i, 1000 + i))
        dirs.append(d)
    half = cache / "half"  # unpacking was interrupted: no .complete
    half.mkdir()
    prune_packages(cache, 3, current=dirs[0])
    assert sorted(p.name for p in cache.iterdir()) == ["p0", "p3", "p4", "p5"]
    prune_packages(cache, 1, current=None)
    assert sorted(p.name for p in cache.iterdir()) == ["p5"]
    prune_packages(tmp_path / "missing", 3, None)  # nothing there yet: nothing to do
