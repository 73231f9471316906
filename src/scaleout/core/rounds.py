"""Round state machines: events in, decisions out, time passed explicitly as ``now``.

Two views of one round:

- ``CombinerRound``: a combiner waits for the updates of the clients it was given; it
  reports its partial when every one of them reported (or was lost), or at its deadline.
  A client whose link drops is given a grace period to come back (most drops on an edge
  network are blips); the role asks ``next_wakeup`` when to call ``on_tick`` again.
- ``ControllerRound``: the controller waits for the partial of every combiner involved;
  the round succeeds when all selected clients contributed, or when the waiting ends
  (deadline, combiners lost or reported) with at least ``min_clients`` contributions.
  Otherwise it fails and the global model stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
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


LOST = "client disconnected"
LOST_FOR_GOOD = "client disconnected and did not come back within {grace:g} s"
TIMED_OUT = "no update before the round timeout"
LOST_AT_DEADLINE = "client disconnected and the round ended before it came back"


class Resume(Enum):
    """What to do with a client that reconnects mid-round."""

    NOTHING = "nothing"  # this round does not wait for it
    KEEP = "keep"  # it is still working on its task: let it finish
    RESEND = "resend"  # it lost its task with the link: send it again


@dataclass
class CombinerRound:
    """Tracks one combiner's share of a round."""

    expected: set[str]
    deadline: float
    grace: float = 0.0
    reported: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    away: dict[str, float] = field(default_factory=dict)  # client -> end of its grace period
    done: bool = False
    # Kept as events arrive, not recomputed: asked about on every event, it must cost O(1), not O(clients).
    _pending: set[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._pending = set(self.expected) - self.reported - set(self.failed)

    @classmethod
    def start(cls, clients: Iterable[str], now: float, timeout: float, grace: float = 0.0) -> CombinerRound:
        return cls(expected=set(clients), deadline=now + timeout, grace=grace)

    @property
    def next_wakeup(self) -> float | None:
        """When ``on_tick`` has something to decide next (None once the round is done)."""
        if self.done:
            return None
        return min([self.deadline, *(until for c, until in self.away.items() if c in self._pending)])

    def on_client_dropped(self, client: str, now: float, goodbye: bool = False) -> bool:
        """The client's link dropped. It said goodbye (a clean close): it is lost now. Else
        it has ``grace`` seconds (never past the deadline) to reconnect; True when the
        combiner should report now."""
        if self.done or client not in self._pending:
            return False
        if goodbye or self.grace <= 0:
            return self.on_client_lost(client)
        self.away[client] = min(now + self.grace, self.deadline)
        return False

    def on_client_back(self, client: str, still_working: bool) -> Resume:
        """The client reconnected; ``still_working`` when it says it is on this round's task."""
        self.away.pop(client, None)
        if self.done or client not in self._pending:
            return Resume.NOTHING
        return Resume.KEEP if still_working else Resume.RESEND

    @property
    def pending(self) -> AbstractSet[str]:
        """Clients expected that have neither reported nor failed: a live, read-only view
        (copy it to keep it across events)."""
        return self._pending

    def on_update(self, client: str) -> bool:
        """An accepted update arrived; True when the combiner should report now."""
        if not self.done and client in self._pending:
            self.reported.add(client)
            self._pending.discard(client)
        return self._ready()

    def on_refused(self, client: str, reason: str) -> bool:
        """The client's update was refused or its task failed; it will not contribute."""
        if not self.done and client in self._pending:
            self._fail(client, reason)
        return self._ready()

    def _fail(self, client: str, reason: str) -> None:
        self.failed[client] = reason
        self._pending.discard(client)

    def on_client_lost(self, client: str) -> bool:
        return self.on_refused(client, LOST)

    def on_tick(self, now: float) -> bool:
        """Time passed: fail clients whose grace ran out, and everyone pending at the deadline."""
        if self.done:
            return False
        if now >= self.deadline:
            for client in sorted(self._pending):
                if client not in self.away:
                    self._fail(client, TIMED_OUT)
                elif self.away[client] < self.deadline:  # its grace ended first
                    self._fail(client, LOST_FOR_GOOD.format(grace=self.grace))
                else:  # the round's deadline came before its grace was over: say that, not the grace
                    self._fail(client, LOST_AT_DEADLINE)
            self.done = True
            return True
        for client, until in list(self.away.items()):
            if now >= until and client in self._pending:
                del self.away[client]
                self._fail(client, LOST_FOR_GOOD.format(grace=self.grace))
        return self._ready()

    def check(self) -> bool:
        """True (once) when nothing is pending, e.g. right after start with no clients."""
        return self._ready()

    def _ready(self) -> bool:
        if not self.done and not self._pending:
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
    away: dict[str, float] = field(default_factory=dict)  # combiner whose link dropped -> end of its grace
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
        self.away.pop(combiner, None)
        if self.decision is None and combiner in self.waiting_for:
            self.lost.add(combiner)
        return self._decide(final=not self.waiting_for)

    def on_combiner_dropped(self, combiner: str, now: float, grace: float) -> Decision | None:
        """The combiner's link dropped: it has ``grace`` seconds (never past the deadline) to
        register again and report, as a client has at its combiner; then it is lost."""
        if grace <= 0:
            return self.on_combiner_lost(combiner)
        if self.decision is None and combiner in self.waiting_for:
            self.away[combiner] = min(now + grace, self.deadline)
        return None

    def on_combiner_back(self, combiner: str) -> None:
        """It registered again within its grace: this round waits for its partial again."""
        self.away.pop(combiner, None)

    @property
    def next_wakeup(self) -> float:
        """When ``on_tick`` has something to decide next: the deadline, or a grace's end."""
        return min([self.deadline, *self.away.values()])

    def on_partial_refused(self, combiner: str, reason: str) -> Decision | None:
        """The combiner's partial was unusable (e.g. it would overflow): none of it counts."""
        if self.decision is None and combiner in self.waiting_for:
            self.refused[combiner] = reason
            self.lost.add(combiner)
        return self._decide(final=not self.waiting_for)

    def on_tick(self, now: float) -> Decision | None:
        for combiner, until in list(self.away.items()):
            if now >= until:
                del self.away[combiner]
                if combiner in self.waiting_for:
                    self.lost.add(combiner)
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
