"""Metrics held with log_metric(commit=False) go out when the task ends, not with the next task."""

from __future__ import annotations

from scaleout.edge import EdgeClient


def test_held_metrics_are_flushed_at_the_end_of_a_task() -> None:
    client = EdgeClient("c")
    sent: list[tuple[dict[str, float], int | None]] = []
    client._metric_sink = lambda metrics, step: sent.append((dict(metrics), step))
    client.log_metric({"a": 1.0}, step=3)
    client.log_metric({"b": 2.0}, commit=False)
    client.log_metric({"c": 3.0}, commit=False)
    assert sent == [({"a": 1.0}, 3)]
    client._flush_metrics()  # the task ended: what was held goes now, without a step
    client._flush_metrics()  # and only once
    assert sent == [({"a": 1.0}, 3), ({"b": 2.0, "c": 3.0}, None)]
    client.log_metric({"d": 4.0})  # the next task starts with nothing held
    assert sent[-1] == ({"d": 4.0}, None)
