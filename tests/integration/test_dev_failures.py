"""`scaleout dev` says why clients failed, under the round line, and keeps the logs it points to."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import FIXTURES, QUICKSTART, scaleout

RAISING = FIXTURES / "raising_client"


def test_dev_prints_each_client_failure_and_keeps_the_logs(tmp_path: Path) -> None:
    (line,) = [i for i, text in enumerate((RAISING / "startup.py").read_text().splitlines(), 1) if "# RAISES HERE" in text]
    tmp = tmp_path / "tmp"  # where dev makes its temporary data dir
    tmp.mkdir()
    args = ["dev", "-p", str(RAISING), "--clients", "2", "--rounds", "1", "--round-timeout", "20", "--no-validate", "--headless", "--report", "r.json"]
    r = scaleout(*args, cwd=tmp_path, timeout=90, env={"TMPDIR": str(tmp)})
    assert r.returncode == 1, (r.stdout, r.stderr)
    reason = rf"train failed: ValueError: cannot reshape array of size 6 into shape \(5,4\) \(startup\.py:{line}\)"
    # Under the round line, one line per client, saying why.
    assert re.search(rf"^\s+round 1\s+failed .*\n\s+client-1: {reason}\n\s+client-2: {reason}\n", r.stdout, re.M), r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    (rnd,) = report["rounds"]
    assert [f["client"] for f in rnd["failures"]] == ["client-1", "client-2"], rnd
    assert all(re.fullmatch(reason, f["reason"]) for f in rnd["failures"]), rnd
    # The logs it points to are still there, and say where in the package it failed.
    (where,) = re.findall(r"^logs are in (\S+), the controller's data in (\S+) \(kept", r.stdout, re.M)
    logs, data = Path(where[0]), Path(where[1])
    assert logs.parent.parent == tmp and (data / "state.db").is_file(), r.stdout
    client_log = (logs / "client-1.log").read_text()
    assert f"(startup.py:{line})" in client_log and "Traceback" not in client_log, client_log
    assert "Traceback" not in r.stderr, r.stderr


def test_dev_removes_its_temporary_data_after_a_good_session(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["dev", "-p", str(QUICKSTART), "--clients", "2", "--rounds", "1", "--no-validate", "--headless"]
    r = scaleout(*args, cwd=tmp_path, timeout=90, env={"TMPDIR": str(tmp)})
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "logs are in" not in r.stdout and list(tmp.iterdir()) == [], r.stdout


def test_dev_keeps_the_logs_when_the_federation_cannot_start(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "scaleout.yaml").write_text("entry_points:\n  build: build.py\n  startup: startup.py\n")
    (package / "build.py").write_text("def build():\n    raise OSError('no disk')\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = scaleout("dev", "-p", str(package), "--headless", cwd=tmp_path, timeout=60, env={"TMPDIR": str(tmp)})
    assert r.returncode == 1 and "run build failed" in r.stdout and "(build.py:2)" in r.stdout, r.stdout
    (logs,) = re.findall(r"^logs are in (\S+) \(kept", r.stdout, re.M)
    assert "OSError: no disk" in (Path(logs) / "build.log").read_text()
