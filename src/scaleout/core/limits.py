"""How much text a client may send, checked where it enters and again before it is stored.

A client's metrics, results and error texts travel client -> combiner -> controller and end
up in state.db; one oversized or escaped-to-3x message must not overflow a frame further up
(the controller refuses frames over 1 MiB and would drop the whole combiner) or fill the
disk. Sizes are of compact UTF-8 JSON (``messages.to_json``), as sent and stored.

- a metric message (one ``log_metric`` call: its metrics and step) is at most 64 KiB;
- a task result's data (training metadata, validation metrics) is at most 64 KiB;
- an error text is truncated to 4 KiB;
- metrics from one client link flow at about 16 KiB/s, in bursts of up to 256 KiB (each
  message counts at least 512 bytes); beyond that they are dropped until the rate falls
  (the bucket is half full again): one burst of drops, told once and counted.

So a report a combiner forwards holds at most 64 KiB of data and 4 KiB of error text, far
below the controller's frame limit (a test checks the worst case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scaleout.core.errors import LimitExceeded
from scaleout.core.messages import to_json
from scaleout.core.units import fmt_bytes

MAX_METRIC_BYTES = 64 << 10
MAX_RESULT_BYTES = 64 << 10
MAX_ERROR_BYTES = 4 << 10
METRIC_BYTES_PER_S = 16 << 10
METRIC_BURST_BYTES = 256 << 10
METRIC_MIN_COST = 512


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON on the wire and in state.db."""
    return len(to_json(value).encode("utf-8"))


def check_size(value: Any, limit: int, what: str, hint: str = "") -> int:
    """The JSON size of ``value``; raises LimitExceeded when it is above ``limit``."""
    size = json_size(value)
    if size > limit:
        raise LimitExceeded(what, size, limit, hint)
    return size


def metric_body(metrics: Any, step: Any) -> dict[str, Any]:
    """What one metric message carries up to the controller (and what its limit counts)."""
    return {"metrics": metrics, "step": step}


def clip_text(text: str, limit: int = MAX_ERROR_BYTES) -> str:
    """``text`` as valid UTF-8 of at most ``limit`` bytes, saying so when it was cut."""
    data = text.encode("utf-8", "replace")  # lone surrogates become "?"
    if len(data) <= limit:
        return data.decode("utf-8")
    note = f" ... [truncated: {fmt_bytes(len(data))} in all]"
    return data[: limit - len(note.encode())].decode("utf-8", "ignore") + note


@dataclass(frozen=True)
class Admission:
    """What to do with one metric message: forward it, or drop it (and maybe say so)."""

    ok: bool
    reason: str = ""  # why it was dropped
    tell: bool = False  # the first drop of a burst: log it once and tell the client
    dropped_before: int = 0  # forwarded after this many were dropped: the burst is over


class MetricGate:
    """One client link's metric limits: size per message, and a token bucket of bytes.

    Pure: the caller passes ``now`` (seconds, any monotonic clock). Drops come in bursts;
    only the first of a burst asks to be told (``tell``), so a flood costs one log line and
    one error message, not one per message. A burst lasts until the bucket is half full
    again (the client logs slower than the rate): a client that keeps logging too fast has
    a message through now and then (as tokens trickle back) within one burst, not a new
    burst each time.
    """

    def __init__(self, rate: float = METRIC_BYTES_PER_S, burst: float = METRIC_BURST_BYTES, max_bytes: int = MAX_METRIC_BYTES) -> None:
        self.rate = rate
        self.burst = burst
        self.max_bytes = max_bytes
        self.tokens = burst
        self.last: float | None = None
        self.dropped = 0  # in the current burst of drops

    def offer(self, size: int, now: float) -> Admission:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if size > self.max_bytes:
            reason = (
                f"a metric message is {fmt_bytes(size)} as JSON; the limit is {fmt_bytes(self.max_bytes)} per log_metric call: "
                "dropped (log fewer or shorter metrics)"
            )
            return self._drop(reason)
        cost = max(size, METRIC_MIN_COST)
        if cost > self.tokens:
            reason = (
                f"metrics arrive faster than {fmt_bytes(self.rate)} per second (bursts of {fmt_bytes(self.burst)}): "
                "dropping them until the rate falls (log less often)"
            )
            return self._drop(reason)
        self.tokens -= cost
        if self.dropped and self.tokens + cost < self.burst / 2:
            return Admission(True)  # still in the burst: the rate has not fallen yet
        dropped, self.dropped = self.dropped, 0
        return Admission(True, dropped_before=dropped)

    def _drop(self, reason: str) -> Admission:
        self.dropped += 1
        return Admission(False, reason, tell=self.dropped == 1)


TRANSFER_GRACE_S = 30.0
TRANSFER_MIN_RATE = 5e6  # bytes/s a pulled payload must sustain: below it the peer counts as stalled


def transfer_timeout(size: int) -> float:
    """How long a pull of ``size`` bytes may take: a grace plus the time at the slowest rate
    we accept, so a large model's update or partial is never cut off for being large."""
    return TRANSFER_GRACE_S + max(0, size) / TRANSFER_MIN_RATE
