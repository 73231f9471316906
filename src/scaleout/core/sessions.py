"""A session as a durable state machine: steps in, the next thing to do out.

A session's progress is the sequence of its steps (``Step``): session started, round
started, tasks sent, partial received, model committed, validation recorded, round
failed, round retried, session ended. The role writes each step to stable storage (one
transaction, with the rows it implies) *before* it acts on it, then ``apply``s it here;
``next_action`` says what to do next. A controller that restarts replays the steps it
stored (``SessionMachine.replay``) and ``recover`` turns a round that was in flight into a
retry of the same index, so round indexes stay 1..N and each succeeds at most once.

Pure: no clock, no I/O. Times arrive as ``now``.

    Step kinds                    what follows
    session.started  ------------ RunRound(1)
    round.started / tasks.sent /
      partial.received ---------- (the round is in flight: wait for its outcome)
    round.committed ------------- ValidateRound(i) when the session validates, else RunRound(i+1)
    round.validated ------------- RunRound(i+1)
    round.failed ---------------- RunRound(i+1)
    round.retried --------------- RunRound(i) again, attempt + 1, from the last committed model
    session.ended --------------- nothing (EndSession once, then Done)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import Enum


class StepKind(str, Enum):
    SESSION_STARTED = "session.started"
    ROUND_STARTED = "round.started"
    TASKS_SENT = "tasks.sent"
    PARTIAL_RECEIVED = "partial.received"
    ROUND_COMMITTED = "round.committed"
    ROUND_VALIDATED = "round.validated"
    ROUND_FAILED = "round.failed"
    ROUND_RETRIED = "round.retried"
    SESSION_CONTINUED = "session.continued"
    SESSION_ENDED = "session.ended"


@dataclass(frozen=True)
class Step:
    """One persisted transition. ``model_id`` is the model a round started from (started,
    retried) or committed (committed); ``state_id`` the strategy state committed with it."""

    kind: StepKind
    round_index: int = 0
    attempt: int = 1
    model_id: str | None = None
    state_id: str | None = None
    combiner: str | None = None
    count: int = 0
    rounds: int = 0  # session.started / session.continued: the last round index to run
    status: str | None = None  # session.ended: finished, stopped, failed, interrupted
    reason: str | None = None
    at: float = 0.0

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind.value}
        for name, default in _DEFAULTS.items():
            value = getattr(self, name)
            if value != default:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Step:
        known = {k: v for k, v in data.items() if k in _DEFAULTS}
        return cls(kind=StepKind(str(data["kind"])), **known)  # type: ignore[arg-type]


_DEFAULTS = {
    "round_index": 0, "attempt": 1, "model_id": None, "state_id": None, "combiner": None, "count": 0,
    "rounds": 0, "status": None, "reason": None, "at": 0.0,
}


@dataclass(frozen=True)
class RunRound:
    """Run round ``index`` (try ``attempt``) from ``parent`` with the strategy state ``state_id``."""

    index: int
    attempt: int
    parent: str
    state_id: str | None
    retried_because: str | None = None


@dataclass(frozen=True)
class ValidateRound:
    index: int
    attempt: int
    model_id: str


@dataclass(frozen=True)
class EndSession:
    status: str
    reason: str | None


@dataclass(frozen=True)
class Wait:
    """A round is in flight: nothing to decide until its outcome arrives."""

    index: int
    attempt: int


@dataclass(frozen=True)
class Done:
    status: str
    reason: str | None


Action = RunRound | ValidateRound | EndSession | Wait | Done


class SessionStateError(ValueError):
    """A step that cannot follow the ones before it (a bug in the role or a damaged log)."""


@dataclass
class RoundProgress:
    index: int
    attempt: int
    parent: str
    state_id: str | None
    phase: StepKind
    partials: dict[str, int] = field(default_factory=dict)  # combiner -> updates folded
    model_id: str | None = None  # once committed
    committed_state: str | None = None


@dataclass
class SessionMachine:
    """What a session has done, folded from its steps; what it should do next."""

    session_id: str
    validate: bool = False
    last_round: int = 0  # the highest index this session runs to
    model_id: str | None = None  # the session's current global model: where the next round starts
    state_id: str | None = None  # the strategy state committed with it
    current: RoundProgress | None = None  # the round started and not yet over
    succeeded: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    retries: dict[int, list[str]] = field(default_factory=dict)  # index -> why each retry happened
    next_index: int = 1
    ended: EndSession | None = None
    steps: int = 0

    # -- folding -------------------------------------------------------------------------

    @classmethod
    def replay(cls, session_id: str, steps: Iterable[Step], validate: bool = False) -> SessionMachine:
        machine = cls(session_id, validate=validate)
        for step in steps:
            machine.apply(step)
        return machine

    def apply(self, step: Step) -> None:
        """Fold one step in (after it was persisted). A step that cannot follow raises."""
        k = step.kind
        if self.steps == 0 and k is not StepKind.SESSION_STARTED:
            raise SessionStateError(f"session {self.session_id}: the first step must be session.started, not {k.value}")
        if self.ended is not None and k is not StepKind.SESSION_CONTINUED:
            raise SessionStateError(f"session {self.session_id} ended already ({self.ended.status}); {k.value} cannot follow")
        if k is StepKind.SESSION_STARTED:
            if self.steps:
                raise SessionStateError(f"session {self.session_id} started twice")
            self.model_id, self.state_id, self.last_round = step.model_id, step.state_id, step.rounds
            self.next_index = step.round_index or 1
        elif k is StepKind.SESSION_CONTINUED:
            if self.ended is None:
                raise SessionStateError(f"session {self.session_id} is still running: it cannot be continued")
            self.ended, self.last_round = None, step.rounds
            self.failed.clear()  # the continuation's outcome is its own rounds
            if step.model_id is not None:
                self.model_id, self.state_id = step.model_id, step.state_id
        elif k is StepKind.ROUND_STARTED:
            if self.current is not None:
                raise SessionStateError(f"round {step.round_index} started while round {self.current.index} is in flight")
            if step.round_index != self.next_index:
                raise SessionStateError(f"round {step.round_index} started; round {self.next_index} is next")
            parent = step.model_id or self.model_id
            if parent is None:
                raise SessionStateError("a round needs a model to start from")
            self.current = RoundProgress(step.round_index, step.attempt, parent, self.state_id, k)
        elif k in (StepKind.TASKS_SENT, StepKind.PARTIAL_RECEIVED):
            cur = self._in_flight(step)
            if cur.phase is StepKind.ROUND_COMMITTED:
                raise SessionStateError(f"round {cur.index} was committed already: no more {k.value}")
            cur.phase = k
            if k is StepKind.PARTIAL_RECEIVED and step.combiner:
                cur.partials[step.combiner] = step.count
        elif k is StepKind.ROUND_COMMITTED:
            cur = self._in_flight(step)
            if step.model_id is None:
                raise SessionStateError(f"round {cur.index} committed no model")
            cur.phase, cur.model_id, cur.committed_state = k, step.model_id, step.state_id
            self.model_id, self.state_id = step.model_id, step.state_id
            self.succeeded.add(cur.index)
            if not self.validate:
                self._close_round()
        elif k is StepKind.ROUND_VALIDATED:
            cur = self._in_flight(step)
            if cur.phase is not StepKind.ROUND_COMMITTED:
                raise SessionStateError(f"round {cur.index} was validated before its model was committed")
            self._close_round()
        elif k is StepKind.ROUND_FAILED:
            cur = self._in_flight(step)
            if cur.phase is StepKind.ROUND_COMMITTED:
                self._close_round()  # its model stands; only the validation is lost
            else:
                self.failed[cur.index] = step.reason or "failed"
                self._close_round()
        elif k is StepKind.ROUND_RETRIED:
            cur = self._in_flight(step)
            if cur.phase is StepKind.ROUND_COMMITTED:
                raise SessionStateError(f"round {cur.index} was committed: it is not run again")
            self.retries.setdefault(cur.index, []).append(step.reason or "retried")
            self.current = None  # next_action runs it again from the same model
        elif k is StepKind.SESSION_ENDED:
            flight = self.current
            if flight is not None and flight.phase is StepKind.ROUND_COMMITTED:
                self._close_round()  # its model stands; only its validation is lost
            elif flight is not None:  # ended mid-round (interrupted): a continuation runs it again
                self.retries.setdefault(flight.index, []).append(step.reason or step.status or "ended")
                self.current = None
            self.ended = EndSession(step.status or "finished", step.reason)
        self.steps += 1

    def _in_flight(self, step: Step) -> RoundProgress:
        cur = self.current
        if cur is None or cur.index != step.round_index or cur.attempt != step.attempt:
            what = f"round {cur.index} try {cur.attempt}" if cur else "no round"
            raise SessionStateError(f"{step.kind.value} for round {step.round_index} try {step.attempt}, but {what} is in flight")
        return cur

    def _close_round(self) -> None:
        assert self.current is not None
        self.next_index = self.current.index + 1
        self.current = None

    # -- deciding ---------------------------------------------------------------------------

    def attempts(self, index: int) -> int:
        return 1 + len(self.retries.get(index, []))

    def next_action(self) -> Action:
        if self.ended is not None:
            return Done(self.ended.status, self.ended.reason)
        cur = self.current
        if cur is not None:
            if cur.phase is StepKind.ROUND_COMMITTED:  # committed, its validation still to do
                assert cur.model_id is not None
                return ValidateRound(cur.index, cur.attempt, cur.model_id)
            return Wait(cur.index, cur.attempt)
        if self.next_index > self.last_round:
            return EndSession(*self.outcome())
        assert self.model_id is not None
        retried = self.retries.get(self.next_index)
        return RunRound(self.next_index, self.attempts(self.next_index), self.model_id, self.state_id, retried[-1] if retried else None)

    def outcome(self) -> tuple[str, str | None]:
        """How the session ends once every round ran: failed if any round failed."""
        if self.failed:
            index = max(self.failed)
            return "failed", f"round {index}: {self.failed[index]}"
        return "finished", None

    # -- proposing steps (the role persists them, then applies them) --------------------------

    def start_round(self, action: RunRound, now: float) -> Step:
        return Step(StepKind.ROUND_STARTED, action.index, action.attempt, model_id=action.parent, state_id=action.state_id, at=now)

    def recover(self, reason: str, now: float) -> list[Step]:
        """After a restart: the round that was in flight is run again under the same index
        (unless its model was committed: then only its validation is redone)."""
        cur = self.current
        if self.ended is not None or cur is None or cur.phase is StepKind.ROUND_COMMITTED:
            return []
        return [Step(StepKind.ROUND_RETRIED, cur.index, cur.attempt, reason=reason, at=now)]

    def end(self, status: str, reason: str | None, now: float) -> Step:
        return Step(StepKind.SESSION_ENDED, self.current.index if self.current else 0, status=status, reason=reason, at=now)

    def in_flight(self) -> RoundProgress | None:
        return None if self.current is None else replace(self.current, partials=dict(self.current.partials))
