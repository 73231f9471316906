"""The session state machine: steps in, next action out, no event loop."""

from __future__ import annotations

import pytest

from scaleout.core.sessions import (
    Done,
    EndSession,
    RunRound,
    SessionMachine,
    SessionStateError,
    Step,
    StepKind,
    ValidateRound,
    Wait,
)

K = StepKind


def started(rounds: int = 3, model: str = "m0", state: str | None = None) -> Step:
    return Step(K.SESSION_STARTED, model_id=model, state_id=state, rounds=rounds)


def run_round(machine: SessionMachine, model: str, state: str | None = None) -> None:
    action = machine.next_action()
    assert isinstance(action, RunRound)
    for step in (
        machine.start_round(action, 1.0),
        Step(K.TASKS_SENT, action.index, action.attempt),
        Step(K.PARTIAL_RECEIVED, action.index, action.attempt, combiner="c1", count=2),
        Step(K.ROUND_COMMITTED, action.index, action.attempt, model_id=model, state_id=state),
    ):
        machine.apply(step)


def test_rounds_run_in_order_each_from_the_model_before():
    machine = SessionMachine("s")
    machine.apply(started(3))
    parents = []
    for i in range(1, 4):
        action = machine.next_action()
        assert isinstance(action, RunRound) and action.index == i and action.attempt == 1
        parents.append(action.parent)
        run_round(machine, f"m{i}")
    assert parents == ["m0", "m1", "m2"]
    assert machine.next_action() == EndSession("finished", None)
    machine.apply(machine.end("finished", None, 9.0))
    assert machine.next_action() == Done("finished", None)


def test_a_round_in_flight_waits_for_its_outcome():
    machine = SessionMachine("s")
    machine.apply(started(2))
    action = machine.next_action()
    machine.apply(machine.start_round(action, 0.0))
    assert machine.next_action() == Wait(1, 1)


def test_replay_after_a_crash_retries_the_round_in_flight_under_the_same_index():
    steps = [started(6, state="st0")]
    machine = SessionMachine("s")
    machine.apply(steps[0])
    for i in range(1, 4):
        before = machine.steps
        run_round(machine, f"m{i}", f"st{i}")
        assert machine.steps == before + 4
    # Round 4 was sent out when the controller died.
    action = machine.next_action()
    machine.apply(machine.start_round(action, 5.0))
    machine.apply(Step(K.TASKS_SENT, 4, 1))
    log = _log_of(machine, steps)  # what the store would hold
    again = SessionMachine.replay("s", log)
    assert again.next_action() == Wait(4, 1)
    retry = again.recover("controller restarted", 7.0)
    assert [s.kind for s in retry] == [K.ROUND_RETRIED]
    again.apply(retry[0])
    action = again.next_action()
    assert action == RunRound(4, 2, "m3", "st3", "controller restarted")
    again.apply(again.start_round(action, 8.0))
    # A step of the first try no longer fits.
    with pytest.raises(SessionStateError):
        again.apply(Step(K.PARTIAL_RECEIVED, 4, 1, combiner="c1", count=1))
    again.apply(Step(K.ROUND_COMMITTED, 4, 2, model_id="m4"))
    assert again.succeeded == {1, 2, 3, 4}
    assert again.retries == {4: ["controller restarted"]}


def _log_of(machine: SessionMachine, first: list[Step]) -> list[Step]:
    """Rebuild the steps a machine applied (the test keeps no store): the same sequence the
    role would have written, round by round."""
    steps = list(first)
    for i in range(1, machine.next_index):
        steps += [
            Step(K.ROUND_STARTED, i, 1, model_id=f"m{i - 1}" if i > 1 else "m0"),
            Step(K.TASKS_SENT, i, 1),
            Step(K.ROUND_COMMITTED, i, 1, model_id=f"m{i}", state_id=f"st{i}"),
        ]
    if machine.current is not None:
        steps.append(Step(K.ROUND_STARTED, machine.current.index, 1, model_id=machine.current.parent))
        steps.append(Step(K.TASKS_SENT, machine.current.index, 1))
    return steps


def test_steps_survive_a_round_trip_through_their_dict_form():
    step = Step(K.ROUND_COMMITTED, 4, 2, model_id="m", state_id="st", at=3.5)
    assert Step.from_dict(step.to_dict()) == step
    assert step.to_dict() == {"kind": "round.committed", "round_index": 4, "attempt": 2, "model_id": "m", "state_id": "st", "at": 3.5}


def test_a_committed_round_is_never_run_again_only_its_validation():
    machine = SessionMachine("s", validate=True)
    machine.apply(started(2))
    run_round(machine, "m1")
    assert machine.next_action() == ValidateRound(1, 1, "m1")
    assert machine.recover("controller restarted", 0.0) == []  # nothing to retry: validate again
    with pytest.raises(SessionStateError):
        machine.apply(Step(K.ROUND_RETRIED, 1, 1, reason="x"))
    machine.apply(Step(K.ROUND_VALIDATED, 1, 1))
    assert isinstance(machine.next_action(), RunRound)


def test_a_failed_round_keeps_the_model_and_fails_the_session_at_its_end():
    machine = SessionMachine("s")
    machine.apply(started(2))
    action = machine.next_action()
    machine.apply(machine.start_round(action, 0.0))
    machine.apply(Step(K.ROUND_FAILED, 1, 1, reason="0 of 2 selected clients contributed"))
    action = machine.next_action()
    assert isinstance(action, RunRound) and action.index == 2 and action.parent == "m0"
    run_round(machine, "m2")
    assert machine.next_action() == EndSession("failed", "round 1: 0 of 2 selected clients contributed")


def test_an_ended_session_takes_no_more_rounds_until_continued():
    machine = SessionMachine("s")
    machine.apply(started(1))
    run_round(machine, "m1")
    machine.apply(machine.end("finished", None, 1.0))
    with pytest.raises(SessionStateError):
        machine.apply(Step(K.ROUND_STARTED, 2, 1, model_id="m1"))
    machine.apply(Step(K.SESSION_CONTINUED, rounds=3))
    action = machine.next_action()
    assert action == RunRound(2, 1, "m1", None, None)


@pytest.mark.parametrize("bad", [
    Step(K.ROUND_STARTED, 1, 1, model_id="m0"),  # before session.started
    Step(K.ROUND_COMMITTED, 1, 1, model_id="m1"),
])
def test_a_log_that_does_not_begin_with_the_session_is_refused(bad):
    with pytest.raises(SessionStateError):
        SessionMachine("s").apply(bad)


def test_rounds_cannot_skip_or_overlap():
    machine = SessionMachine("s")
    machine.apply(started(3))
    with pytest.raises(SessionStateError):
        machine.apply(Step(K.ROUND_STARTED, 2, 1, model_id="m0"))
    machine.apply(Step(K.ROUND_STARTED, 1, 1, model_id="m0"))
    with pytest.raises(SessionStateError):
        machine.apply(Step(K.ROUND_STARTED, 2, 1, model_id="m0"))
    with pytest.raises(SessionStateError):
        machine.apply(Step(K.ROUND_COMMITTED, 1, 1))  # no model


def test_stopping_mid_round_ends_the_session_with_the_reason():
    machine = SessionMachine("s")
    machine.apply(started(3))
    machine.apply(machine.start_round(machine.next_action(), 0.0))
    machine.apply(machine.end("stopped", "stopped by an admin", 1.0))
    assert machine.next_action() == Done("stopped", "stopped by an admin")
    assert machine.recover("controller restarted", 2.0) == []
