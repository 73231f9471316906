"""Build-kind detection and how scaleout starts another of itself (scaleout.runtime).

The real artefacts are checked by `make dist-check`; here a tiny zipapp laid out as shiv lays
out its archives (a ``_bootstrap`` package that runs first) stands in for the .pyz.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scaleout import __version__, runtime
from scaleout.core.messages import PROTOCOL_VERSION

SRC = Path(__file__).resolve().parents[1] / "src"


def test_source_run() -> None:
    assert runtime.build_kind() == "source"
    assert runtime.zipapp_path() is None
    assert runtime.self_command() == [sys.executable, "-m", "scaleout"]
    assert runtime.version_text() == f"scaleout {__version__} (protocol {PROTOCOL_VERSION}, source)"


def test_frozen_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert runtime.build_kind() == "frozen"
    assert runtime.self_command() == [sys.executable]
    assert runtime.version_text().endswith(", frozen)")
    assert "single-file executable" in runtime.missing_module_hint("torch.nn")


def test_zipapp_run(tmp_path: Path) -> None:
    pyz = tmp_path / "app.pyz"
    with zipfile.ZipFile(pyz, "w") as zf:
        zf.writestr("_bootstrap/__init__.py", "")
        zf.writestr(
            "__main__.py",
            "import json, os, _bootstrap\n"
            "os.chdir('/')\n"  # a later chdir must not change what the archive is
            "from scaleout import runtime\n"
            "print(json.dumps([runtime.build_kind(), runtime.self_command(), runtime.version_text(), runtime.missing_module_hint('torch')]))\n",
        )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, pyz.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    kind, command, version, hint = json.loads(r.stdout)
    assert kind == "zipapp"
    assert command == [sys.executable, str(pyz.resolve())]
    assert version.endswith(", zipapp)")
    assert f"{sys.executable} -m pip install torch" in hint and str(pyz.resolve()) in hint


def test_a_bootstrap_module_outside_an_archive_is_not_a_zipapp(tmp_path: Path) -> None:
    (tmp_path / "_bootstrap").mkdir()
    (tmp_path / "_bootstrap" / "__init__.py").write_text("")
    code = "import _bootstrap; from scaleout import runtime; print(runtime.build_kind())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(SRC)])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "source"
