"""Round state machines: events in, decisions out, time passed explicitly as ``now``.

Two views of one round:

- ``CombinerRound``: a combiner waits for the updates of the clients it was given; it
  reports its partial when every one of them reported (or was lost), or at its deadline.
- ``ControllerRound``: the controller waits for the partial of every combiner involved;
  the round succeeds when all selected clients contributed, or when the waiting ends
  (deadline, combiners lost or reported) with at least ``min_clients`` contributions.
  Otherwise it fails and the global model stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    contributions: int
    reason: str = ""


@dataclass
class CombinerRound:
    """Tracks one combiner's share of a round."""

    expected: set[str]
    deadline: float
    reported: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    done: bool = False

    @classmethod
    def start(cls, clients: Iterable[str], now: float, timeout: float) -> CombinerRound:
        return cls(expected=set(clients), deadline=now + timeout)

    @property
    def pending(self) -> set[str]:
        return self.expected - self.reported - set(self.failed)

    def on_update(self, client: str) -> bool:
        """An accepted update arrived; True when the combiner should report now."""
        if not self.done and client in self.pending:
            self.reported.add(client)
        return self._ready()

    def on_refused(self, client: str, reason: str) -> bool:
        """The client's update was refused or its task failed; it will not contribute."""
        if not self.done and client in self.pending:
            self.failed[client] = reason
        return self._ready()

    def on_client_lost(self, client: str) -> bool:
        return self.on_refused(client, "client disconnected")

    def on_tick(self, now: float) -> bool:
        if not self.done and now >= self.deadline:
            for client in self.pending:
                self.failed[client] = "no update before the round timeout"
            self.done = True
            return True
        return False

    def check(self) -> bool:
        """True (once) when nothing is pending, e.g. right after start with no clients."""
        return self._ready()

    def _ready(self) -> bool:
        if not self.done and not self.pending:
            self.done = True
            return True
        return False


@dataclass
class ControllerRound:
    """Tracks the combiners' partials of one round at the controller."""

    selected: dict[str, int]  # combiner -> number of clients it was given
    min_clients: int
    deadline: float
    received: dict[str, int] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)  # combiner -> why its partial was refused
    decision: Decision | None = None

    @classmethod
    def start(cls, selected: dict[str, int], min_clients: int, now: float, timeout: float) -> ControllerRound:
        return cls(selected=dict(selected), min_clients=min_clients, deadline=now + timeout)

    @property
    def contributions(self) -> int:
        return sum(self.received.values())

    @property
    def waiting_for(self) -> set[str]:
        return set(self.selected) - set(self.received) - self.lost

    def on_partial(self, combiner: str, count: int) -> Decision | None:
        if self.decision is None and combiner in self.waiting_for:
            self.received[combiner] = count
        return self._decide(final=not self.waiting_for)

    def on_combiner_lost(self, combiner: str) -> Decision | None:
        if self.decision is None and combiner in self.waiting_for:
            self.lost.add(combiner)
        return self._decide(final=not self.waiting_for)

    def on_partial_refused(self, combiner: str, reason: str) -> Decision | None:
        """The combiner's partial was unusable (e.g. it would overflow): none of it counts."""
        if self.decision is None and combiner in self.waiting_for:
            self.refused[combiner] = reason
            self.lost.add(combiner)
        return self._decide(final=not self.waiting_for)

    def on_tick(self, now: float) -> Decision | None:
        return self._decide(final=now >= self.deadline or not self.waiting_for)

    def _decide(self, final: bool) -> Decision | None:
        if self.decision is not None or not final:
            return None
        n, wanted = self.contributions, sum(self.selected.values())
        if n > 0 and (n == wanted or n >= self.min_clients):
            self.decision = Decision(Outcome.SUCCEEDED, n)
        else:
            reason = f"{n} of {wanted} selected clients contributed; at least {self.min_clients} needed"
            lost = sorted(self.lost - set(self.refused))
            if lost:
                reason += f" (lost combiner{'s' if len(lost) > 1 else ''} {', '.join(lost)})"
            for name, why in sorted(self.refused.items()):
                reason += f" (partial from combiner {name} refused: {why})"
            silent = sorted(set(self.selected) - set(self.received) - self.lost)
            if silent:
                reason += f" (no report from combiner{'s' if len(silent) > 1 else ''} {', '.join(silent)})"
            self.decision = Decision(Outcome.FAILED, n, reason)
        return self.decision
