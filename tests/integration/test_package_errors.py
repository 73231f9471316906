"""A compute package that raises: the client names the file and line in the package, the
controller gets one short line, and the whole traceback is there at --log-level debug."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FIXTURES, Federation, scaleout

RAISING = FIXTURES / "raising_client"


def marked_line(file: Path, marker: str) -> int:
    """The line number of ``marker`` in ``file`` (so the test follows the fixture's edits)."""
    (line,) = [i for i, text in enumerate(file.read_text().splitlines(), 1) if marker in text]
    return line


def test_train_error_names_the_package_line_and_reports_one_short_line(fed: Federation) -> None:
    line = marked_line(RAISING / "startup.py", "# RAISES HERE")
    fed.controller()
    fed.seed_from(RAISING)
    fed.combiner("c1")
    client = fed.client("odd", package=RAISING)
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, min_clients=1, validate=False)
    assert session["status"] == "failed", session
    shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
    (report,) = [c for c in shown["rounds"][0]["clients"] if c["client"] == "odd"]
    error = report["error"]
    # The reason stored and reported: short, one line, naming the user's line (not numpy's).
    assert error.startswith("train failed: ValueError: cannot reshape array") and error.endswith(f"(startup.py:{line})"), error
    assert "\n" not in error and len(error) < 200, error
    log = client.text()
    assert f"round 1: train failed: ValueError: cannot reshape array of size 6 into shape (5,4) (startup.py:{line})" in log, log
    # At --log-level debug (the harness's level) the whole traceback follows, down into numpy.
    assert "traceback of the package code" in log and "Traceback (most recent call last)" in log, log
    assert "batch = np.reshape(batch, (5, 4))" in log and "numpy" in log.split("traceback of the package code", 1)[1], log


STARTUP_RAISES = '''\
from scaleout import EdgeClient


def startup(client: EdgeClient):
    raise RuntimeError("no data in ./data")  # RAISES HERE
'''

IMPORT_RAISES = '''\
import os

DATA = os.environ["SCALEOUT_TEST_NO_SUCH_VARIABLE"]  # RAISES HERE


def startup(client):
    pass
'''


@pytest.mark.parametrize(("source", "what"), [(STARTUP_RAISES, "RuntimeError: no data in ./data"), (IMPORT_RAISES, "KeyError: 'SCALEOUT_TEST_NO_SUCH_VARIABLE'")], ids=["startup", "import"])
def test_startup_error_stops_the_client_naming_the_package_line(fed: Federation, tmp_path: Path, source: str, what: str) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "scaleout.yaml").write_text("entry_points:\n  startup: startup.py\n")
    (package / "startup.py").write_text(source)
    line = marked_line(package / "startup.py", "# RAISES HERE")
    fed.controller()
    args = ["join", "--controller", fed.url, "--token", fed.token("client"), "--ca", fed.ca, "--name", "broken", "-p", str(package)]
    r = scaleout(*args, timeout=60)
    assert r.returncode == 2, r.stderr
    (error,) = [x for x in r.stderr.splitlines() if x.startswith("scaleout: error:")]
    assert what in error and error.endswith(f"(startup.py:{line})"), r.stderr
    assert "Traceback" not in r.stderr and "--log-level debug" in r.stderr, r.stderr
    r = scaleout(*args, "--log-level", "debug", timeout=60)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr and "# RAISES HERE" in r.stderr, r.stderr


def test_sys_exit_or_ctrl_c_in_a_callback_fails_the_task_not_the_client(fed: Federation) -> None:
    exits, interrupts = (marked_line(RAISING / "startup.py", m) for m in ("# EXITS HERE", "# INTERRUPTS HERE"))
    fed.controller()
    fed.seed_from(RAISING)
    fed.combiner("c1")
    client = fed.client("odd", package=RAISING)
    fed.wait_clients(1)
    for how, expected in (("exit", f"the train callback called sys.exit(3) (startup.py:{exits})"),
                          ("interrupt", f"the train callback raised KeyboardInterrupt (startup.py:{interrupts})")):
        session = fed.run_session(rounds=1, min_clients=1, validate=False, settings={"how": how})
        assert session["status"] == "failed", session
        shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
        (report,) = [c for c in shown["rounds"][0]["clients"] if c["client"] == "odd"]
        assert report["error"] == expected, report
        assert client.popen.poll() is None, client.text()  # still running, ready for the next round
    assert fed.admin("status")[0]["clients"] == 1
