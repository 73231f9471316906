"""Metrics logged with log_metric(commit=False) go out at once, at the task's current step
(as in Scaleout Edge), so they belong to the round of the task that logged them."""

from __future__ import annotations

from scaleout.edge import EdgeClient


def test_commit_false_metrics_are_sent_at_once_at_the_current_step() -> None:
    client = EdgeClient("c")
    sent: list[tuple[dict[str, float], int | None]] = []
    client._metric_sink = lambda metrics, step: sent.append((dict(metrics), step))
    client.log_metric({"a": 1.0}, step=3)
    client.log_metric({"b": 2.0}, commit=False)
    client.log_metric({"c": 3.0}, commit=False)
    assert sent == [({"a": 1.0}, 3), ({"b": 2.0}, 4), ({"c": 3.0}, 4)]
    client._flush_metrics()  # the task ended: nothing was held, nothing more goes
    assert len(sent) == 3
