"""Issue 9's first Done-when: from the CLI, a custom command and a prediction reach every
client of a `scaleout dev` federation and their results are listed by command/predict show."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from conftest import QUICKSTART, scaleout, wait_line


def test_a_command_and_a_prediction_reach_every_client_of_scaleout_dev(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    dev = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "dev", "-p", str(QUICKSTART), "--clients", "3", "--rounds", "1", "--no-validate",
         "--headless", "--keep", "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        bufsize=0,  # unbuffered: wait_line selects on the pipe, so no line may wait in a buffer
    )
    try:
        assert dev.stdout is not None
        line = wait_line(dev.stdout, "the federation stays up", 120, "scaleout dev")
        ctl = str(data / "controller")
        assert f"--data-dir {ctl}" in line
        r = scaleout("command", "run", "data_summary", "--wait", "--json", "--data-dir", ctl)
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        assert [x["client"] for x in job["results"]] == ["client-1", "client-2", "client-3"]
        assert all(x["status"] == "ok" and x["data"]["train"] == 600 and sum(x["data"]["classes"]) == 600 for x in job["results"])
        r = scaleout("command", "show", job["id"], "--data-dir", ctl)
        assert r.returncode == 0, r.stderr
        for name in ("client-1", "client-2", "client-3"):
            assert re.search(rf"{name}\s+ok\s+-\s+[\d.]+s\s+\{{\"train\": 600", r.stdout), r.stdout
        r = scaleout("predict", "run", "--params", '{"n": 100}', "--wait", "--json", "--data-dir", ctl)
        assert r.returncode == 0, r.stderr
        prediction = json.loads(r.stdout)
        assert all(x["status"] == "ok" and x["data"]["n"] == 100 and sum(x["data"]["predicted"]) == 100 for x in prediction["results"])
        r = scaleout("predict", "show", "--data-dir", ctl)  # the latest
        assert r.returncode == 0 and prediction["id"] in r.stdout and "3 clients: 3 ok, 0 failed" in r.stdout, r.stdout
    finally:
        dev.send_signal(signal.SIGINT)
        out = dev.communicate(timeout=60)[0].decode(errors="replace")
    assert dev.returncode == 0, out  # --keep: Ctrl-C ends it with the session's outcome
    assert "Traceback" not in out
