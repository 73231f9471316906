"""`scaleout package set-active DIR` packs the folder as `package create` (and the TUI) do."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from conftest import QUICKSTART, Federation, scaleout

from scaleout.package.archive import create_archive


def test_set_active_packs_a_folder_honouring_scaleoutignore(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    package = shutil.copytree(QUICKSTART, tmp_path / "mypkg", ignore=shutil.ignore_patterns("*.npz", "__pycache__", "data"))
    (package / "secret.txt").write_text("stays home\n")
    (package / ".scaleoutignore").write_text("secret.txt\n")
    r = scaleout("package", "set-active", str(package), "--json", "--data-dir", str(fed.data), cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # was: "Is a directory"
    result = json.loads(r.stdout)
    (tmp_path / "expected").mkdir()
    expected = create_archive(package, tmp_path / "expected" / "mypkg.tgz")
    assert result["name"] == "mypkg.tgz"
    assert result["id"] == hashlib.sha256(expected.read_bytes()).hexdigest()  # the same bytes: secret.txt left out
    assert "packed" in r.stderr and "mypkg.tgz" in r.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    r = scaleout("package", "set-active", str(empty), "--data-dir", str(fed.data), cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "scaleout.yaml" in r.stderr, r.stderr
