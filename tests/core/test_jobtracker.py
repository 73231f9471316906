from __future__ import annotations

import pytest

from scaleout.core import commands as cmd
from scaleout.core.errors import ConfigError


def test_custom_prefix_is_optional() -> None:
    assert cmd.command_key("Custom_train_more") == cmd.command_key("train_more") == "train_more"
    assert cmd.command_key("Custom_") == "Custom_"  # nothing after the prefix: a name of its own


@pytest.mark.parametrize("name", ["", " ", "a b", "x\n", "a" * 129, 3, None])
def test_command_names_are_checked(name: object) -> None:
    with pytest.raises(ConfigError, match="a command name is 1-128 printable characters"):
        cmd.check_command_name(name)


def test_params_and_timeouts_are_checked() -> None:
    assert cmd.check_params({"k": [1, 2]}) == {"k": [1, 2]}
    for bad, text in [([1], "must be a JSON object"), ({"x": "y" * (65 << 10)}, "params is 65.0 KiB"), ({"x": float("nan")}, "finite")]:
        with pytest.raises(ConfigError, match=text):
            cmd.check_params(bad)
    assert cmd.check_timeout(2) == 2.0
    for bad in (0, -1, float("inf"), float("nan"), True, "5", cmd.MAX_TIMEOUT_S + 1):
        with pytest.raises(ConfigError, match="timeout"):
            cmd.check_timeout(bad)


def test_job_tracker_first_outcome_stands_and_the_deadline_times_out_the_rest() -> None:
    job = cmd.JobTracker.start(["a", "b", "c"], now=100.0, wait_s=10.0)
    assert not job.done and job.pending == {"a", "b", "c"}
    assert job.on_outcome(cmd.Outcome("a", True, {"x": 1}))
    assert not job.on_outcome(cmd.Outcome("a", False, error="late twin", code=cmd.RAISED))  # the first stands
    assert not job.on_outcome(cmd.Outcome("stranger", True))
    assert [o.client for o in job.fail(["b", "a"], cmd.LOST, "gone")] == ["b"]
    assert job.on_tick(109.9) == []
    (late,) = job.on_tick(110.0, "no answer")
    assert (late.client, late.code, late.error) == ("c", cmd.TIMEOUT, "no answer")
    assert job.done and job.outcomes["a"].ok and job.outcomes["b"].code == cmd.LOST
    assert cmd.summary([{"status": "ok"}, {"status": "error"}, {"status": "ok"}]) == {"ok": 2, "error": 1, "pending": 0}
