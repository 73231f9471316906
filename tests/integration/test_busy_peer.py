"""A peer whose loop is busy longer than a ping interval keeps its links (issue 17, 10,000 clients).

At 10,000 clients a combiner's loop is busy for seconds at a time as a round's model goes out to
its 1,250 clients on a loaded box: it reads its sockets, and so answers pings, late. With a ping
timeout of one interval, the controller called such combiners lost as a round began, and they
registered again in the middle of the round. The busiest a loop can be is a stopped process
(SIGSTOP): it reads nothing and answers no ping. Pings are made frequent here
(SCALEOUT_PING_INTERVAL_S) so the test takes seconds, not minutes.
"""

from __future__ import annotations

import signal
import time

import pytest
from conftest import QUICKSTART, Federation

INTERVAL_S = 1.0
BUSY_S = 2.0  # twice a one-interval timeout (pings go unanswered that long), a second short of three intervals


def test_a_combiner_busy_longer_than_a_ping_interval_keeps_its_controller_link(fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEOUT_PING_INTERVAL_S", str(INTERVAL_S))
    fed.controller()
    fed.seed_from(QUICKSTART)
    combiner = fed.combiner("busy")
    combiner.popen.send_signal(signal.SIGSTOP)
    try:
        time.sleep(BUSY_S)  # the busy spell itself, not a wait for something to happen
    finally:
        combiner.popen.send_signal(signal.SIGCONT)
    # Afterwards a client joins through it and the controller counts it: news from the combiner
    # travelled its controller link after the spell (and any drop of it would have been logged by then).
    fed.client("after", package=QUICKSTART)
    fed.wait_clients(1)
    assert "lost the connection to the controller" not in combiner.text()
    controller = fed.procs[0].text()
    assert "keepalive ping timeout" not in controller and "keepalive ping timeout" not in combiner.text()
