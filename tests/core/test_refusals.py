"""Refusal texts map to a few monitoring labels; the texts come from the real checks, so a
reworded check that would fall into "other" fails here."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.errors import ScaleoutError
from scaleout.core.limits import MAX_RESULT_BYTES, check_size
from scaleout.core.refusals import REASONS, refusal_reason
from scaleout.core.rounds import LOST, LOST_AT_DEADLINE, LOST_FOR_GOOD, TIMED_OUT
from scaleout.core.updates import read_num_examples

MODEL = {"w": np.zeros((2, 3), dtype=np.float32), "n": np.zeros(2, dtype=np.int32)}
SPECS = payload.describe(payload.encode(MODEL))


def raised(fn: Callable[[], object]) -> str:
    with pytest.raises(ScaleoutError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: raised(lambda: payload.check_values(SPECS, {"w": np.full((2, 3), np.nan, np.float32), "n": MODEL["n"]})), "non_finite"),
        (lambda: raised(lambda: payload.check_finite({"w": np.array([np.inf])})), "non_finite"),
        (lambda: raised(lambda: payload.check_values(SPECS, {"w": np.full((2, 3), 1e300), "n": MODEL["n"]})), "out_of_range"),
        (lambda: raised(lambda: payload.check_values(SPECS, {"w": MODEL["w"], "n": np.array([2**40, 0])})), "out_of_range"),
        (lambda: raised(lambda: payload.check_compatible(SPECS, {"w": np.zeros((3, 2), np.float32), "n": MODEL["n"]})), "mismatch"),
        (lambda: raised(lambda: payload.check_compatible(SPECS, {"w": MODEL["w"]})), "mismatch"),
        (lambda: raised(lambda: read_num_examples({"training_metadata": {}})), "num_examples"),
        (lambda: raised(lambda: read_num_examples({"training_metadata": {"num_examples": 2**60}})), "num_examples"),
        (lambda: raised(lambda: payload.views(b"not a model at all")), "corrupt"),
        (lambda: raised(lambda: check_size({"x": "y" * MAX_RESULT_BYTES}, MAX_RESULT_BYTES, "the training metadata")), "too_large"),
        (lambda: "update of 9.0 MiB exceeds the limit of 2.0 MiB (twice the model)", "too_large"),
        (lambda: "the client announced an update of 100 bytes and sent 7", "corrupt"),
        (lambda: "payload is corrupt: sha256 0123456789ab does not match the announced ba9876543210", "corrupt"),
        (lambda: "train failed: ValueError: bad shape (startup.py:42)", "client_error"),
        (lambda: "the train callback raised KeyboardInterrupt (startup.py:9)", "client_error"),
        (lambda: "train callback must return (model, metadata), got a tuple of 3", "client_error"),
        (lambda: "train failed: tensor 'w' contains NaN or inf", "client_error"),  # the client's own words come first
        (lambda: "task aborted: the session was stopped", "aborted"),
        (lambda: TIMED_OUT, "timeout"),
        (lambda: "its update was still arriving at the round timeout", "timeout"),
        (lambda: "sent nothing for 10 s when asked for its update", "stalled"),
        (lambda: LOST, "disconnected"),
        (lambda: LOST_FOR_GOOD.format(grace=10), "disconnected"),
        (lambda: LOST_AT_DEADLINE, "disconnected"),
        (lambda: "could not send the task: not connected to this combiner", "unreachable"),
        (lambda: "the round closed while the update was being checked", "other"),
        (lambda: "", "other"),
        (lambda: None, "other"),
    ],
)
def test_each_refusal_text_gets_its_label(make: Callable[[], str | None], reason: str) -> None:
    text = make()
    assert refusal_reason(text) == reason, text
    assert reason in REASONS
