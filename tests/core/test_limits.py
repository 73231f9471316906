from __future__ import annotations

import json

import pytest

from scaleout.core import messages as m
from scaleout.core.errors import LimitExceeded, ScaleoutError
from scaleout.core.limits import (
    MAX_ERROR_BYTES,
    MAX_METRIC_BYTES,
    MAX_RESULT_BYTES,
    METRIC_BURST_BYTES,
    METRIC_BYTES_PER_S,
    METRIC_MIN_COST,
    MetricGate,
    check_size,
    clip_text,
    json_size,
    metric_body,
)

WIDE = "\u00e9"  # 2 bytes in UTF-8, 6 as a \u escape


# -- sizes ------------------------------------------------------------------------------


def test_json_size_counts_utf8_not_escapes() -> None:
    assert json_size({"a": WIDE * 100}) == len('{"a":""}') + 200
    assert json_size({"\U0001f600": 1}) == len('{"":1}') + 4
    # Lone surrogates are not UTF-8: they travel escaped, and are counted so.
    assert json_size({"a": "\udcff"}) == len('{"a":"\\udcff"}')


def test_check_size_says_what_how_big_and_the_limit() -> None:
    assert check_size({"x": 1}, 100, "it") == 7
    with pytest.raises(LimitExceeded) as info:
        check_size({"x": "y" * 2000}, 1024, "the training metadata", "return a few numbers")
    exc = info.value
    assert isinstance(exc, ScaleoutError) and isinstance(exc, ValueError) and exc.code == "limit_exceeded"
    assert (exc.size, exc.limit) == (2008, 1024)
    assert str(exc) == "the training metadata is 2.0 KiB as JSON; the limit is 1.0 KiB: return a few numbers"


def test_clip_text_keeps_short_text_and_cuts_long_text_at_a_character() -> None:
    assert clip_text("short reason") == "short reason"
    assert clip_text("bad \udcff name") == "bad ? name"  # always valid UTF-8 (sqlite, the wire)
    for unit in ("x", WIDE, "\u4e2d", "\U0001f600"):
        text = "start " + unit * 100_000
        clipped = clip_text(text)
        data = clipped.encode("utf-8")  # would raise on a split character
        assert len(data) <= MAX_ERROR_BYTES and len(data) > MAX_ERROR_BYTES - 8, (unit, len(data))
        assert clipped.startswith("start " + unit * 10)
        assert clipped.endswith("in all]") and "truncated" in clipped
    assert clip_text(clip_text("y" * 10_000)) == clip_text("y" * 10_000)  # cutting twice changes nothing


# -- the metric gate ----------------------------------------------------------------------


def test_gate_admits_a_burst_then_drops_and_tells_once() -> None:
    gate = MetricGate()
    size = 60_000
    admitted = [gate.offer(size, 0.0) for _ in range(METRIC_BURST_BYTES // size)]
    assert all(a.ok for a in admitted)
    drops = [gate.offer(size, 0.0) for _ in range(50)]
    assert not any(d.ok for d in drops)
    assert [d.tell for d in drops] == [True] + [False] * 49  # one warning per burst
    assert "per second" in drops[0].reason and "16.0 KiB" in drops[0].reason
    # Tokens trickle back: a message gets through now and then, but the burst goes on (no
    # new warning each time) until the client has slowed down (the bucket half full again).
    t = 0.0
    for _ in range(20):
        t += size / METRIC_BYTES_PER_S
        trickled = gate.offer(size, t)
        assert trickled.ok and trickled.dropped_before == 0
        again = gate.offer(size, t)
        assert not again.ok and not again.tell
    t += METRIC_BURST_BYTES / 2 / METRIC_BYTES_PER_S
    later = gate.offer(size, t)
    assert later.ok and later.dropped_before == 70  # the first message after the burst says how many were dropped
    assert all(gate.offer(size, t).ok for _ in range(1))
    drops = [gate.offer(size, t) for _ in range(3)]
    assert [d.tell for d in drops] == [True, False, False]  # a new burst of drops is told again


def test_gate_refuses_an_oversized_message_without_spending_the_budget() -> None:
    gate = MetricGate()
    big = [gate.offer(MAX_METRIC_BYTES + 1, 0.0) for _ in range(3)]
    assert [(b.ok, b.tell) for b in big] == [(False, True), (False, False), (False, False)]
    assert "64.0 KiB per log_metric call" in big[0].reason
    ok = gate.offer(MAX_METRIC_BYTES, 0.0)
    assert ok.ok and ok.dropped_before == 3
    assert gate.tokens == METRIC_BURST_BYTES - MAX_METRIC_BYTES


def test_gate_counts_small_messages_at_a_minimum_cost() -> None:
    gate = MetricGate()
    n = sum(gate.offer(20, 0.0).ok for _ in range(10_000))
    assert n == METRIC_BURST_BYTES // METRIC_MIN_COST
    # The bucket never holds more than a burst, however long the link was quiet.
    assert sum(gate.offer(20, 3600.0).ok for _ in range(10_000)) == n


# -- what a combiner forwards fits the controller's frames --------------------------------------


@pytest.mark.parametrize("text", [WIDE, "\U0001f600", "\udcff"], ids=["2-byte", "4-byte", "surrogate"])
def test_the_largest_report_a_combiner_forwards_fits_a_frame(text: str) -> None:
    filler = text * (MAX_RESULT_BYTES // 2)
    data = {"notes": filler}
    while json_size(data) > MAX_RESULT_BYTES:  # the largest data that passes check_size
        filler = filler[: len(filler) - max(1, (json_size(data) - MAX_RESULT_BYTES) // 12)]
        data = {"notes": filler}
    check_size(data, MAX_RESULT_BYTES, "data")
    error = clip_text("x" + WIDE * 1_000_000)
    report = m.Report(kind="validate", session_id="s-" + "f" * 126, round_index=2**62, client="c" * 128, data=data, error=error)
    assert len(m.serialize(report).encode("utf-8")) < m.MAX_TEXT_BYTES // 8
    body = metric_body({"k" * 10: 1.0}, 2**62)
    assert json_size(body) < MAX_METRIC_BYTES


# -- the wire encoding -----------------------------------------------------------------------


def test_messages_travel_as_utf8_and_round_trip() -> None:
    msg = m.Error(code="x", message=WIDE * 1000)
    text = m.serialize(msg)
    assert WIDE * 1000 in text and "\\u00e9" not in text
    assert len(text.encode("utf-8")) < 2100
    assert m.parse(text) == msg
    odd = m.Metric(task_id="t", metrics={"bad \udcff name": 1.0, WIDE: 2.0})
    text = m.serialize(odd)
    text.encode("utf-8")  # a websocket can send it
    assert m.parse(text) == odd and json.loads(text)["metrics"] == odd.metrics
