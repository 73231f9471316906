"""A package that logs far faster than the combiner's metric rate: one warning per burst, and
what was dropped is counted, stored and shown by `metric ls` (issue 19 #8)."""

from __future__ import annotations

import re

from conftest import FIXTURES, Federation, scaleout

CALLS = 5000  # small log_metric calls in one train callback: about 10 times a burst


def test_a_flood_of_metrics_is_one_warning_and_its_drops_are_counted(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(FIXTURES / "loud_client")
    c1 = fed.combiner("c1")
    fed.client("loud", package=FIXTURES / "loud_client")
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, min_clients=1, validate=False, settings={"loud_metric_calls": CALLS})
    assert session["rounds"][0]["status"] == "succeeded", session
    log = c1.text()
    # One warning for the whole flood (values still trickle through now and then within it).
    assert log.count("metrics arrive faster than") == 1, [line for line in log.splitlines() if "faster than" in line]
    r = scaleout("metric", "ls", "--limit", "0", "--data-dir", str(fed.data), "--json")
    assert r.returncode == 0, r.stderr
    import json

    stored = json.loads(r.stdout)
    notes = re.findall(r"client loud, session (\S+) round 1: (\d+) log_metric calls dropped by the rate limit", r.stderr)
    assert len(notes) == 1, r.stderr
    sid, dropped = notes[0]
    assert sid == session["id"]
    # Every call is accounted for: stored, or counted as dropped.
    assert len(stored) + int(dropped) == CALLS, (len(stored), dropped)
    assert 0 < len(stored) < CALLS // 2
    # The count is filtered like the values: another client or round has none.
    r = scaleout("metric", "ls", "--round", "2", "--data-dir", str(fed.data))
    assert r.returncode == 0 and "dropped" not in r.stderr, r.stderr
