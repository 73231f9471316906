from __future__ import annotations

from scaleout.core.rounds import CombinerRound, ControllerRound, Decision, Outcome, Resume

# -- CombinerRound ----------------------------------------------------------------------


def test_combiner_ready_once_when_all_reported() -> None:
    r = CombinerRound.start(["a", "b", "c"], now=100.0, timeout=10.0)
    assert r.deadline == 110.0 and r.pending == {"a", "b", "c"}
    assert r.on_update("a") is False
    assert r.on_update("b") is False
    assert r.pending == {"c"}
    assert r.on_update("c") is True
    assert r.done and r.pending == set() and r.failed == {}
    assert r.reported == {"a", "b", "c"}
    assert r.on_update("c") is False
    assert r.on_tick(200.0) is False
    assert r.check() is False


def test_combiner_refused_and_lost_count_as_done() -> None:
    r = CombinerRound.start(["a", "b", "c"], now=0.0, timeout=10.0)
    assert r.on_refused("a", "NaN in update") is False
    assert r.on_client_lost("b") is False
    assert r.on_update("c") is True
    assert r.reported == {"c"}
    assert r.failed == {"a": "NaN in update", "b": "client disconnected"}


def test_combiner_all_failed_is_ready() -> None:
    r = CombinerRound.start(["a"], now=0.0, timeout=10.0)
    assert r.on_client_lost("a") is True
    assert r.failed == {"a": "client disconnected"}


def test_combiner_ignores_unknown_clients() -> None:
    r = CombinerRound.start(["a"], now=0.0, timeout=10.0)
    assert r.on_update("x") is False
    assert r.on_refused("y", "bad") is False
    assert r.on_client_lost("z") is False
    assert r.reported == set() and r.failed == {} and r.pending == {"a"} and not r.done


def test_combiner_refusal_after_report_is_ignored() -> None:
    r = CombinerRound.start(["a", "b"], now=0.0, timeout=10.0)
    r.on_update("a")
    assert r.on_client_lost("a") is False
    assert r.failed == {} and r.reported == {"a"} and r.pending == {"b"}


def test_combiner_update_after_refusal_does_not_count() -> None:
    # A refusal is final: a later update must not make the client both reported and failed.
    r = CombinerRound.start(["a", "b"], now=0.0, timeout=10.0)
    r.on_refused("a", "bad update")
    r.on_update("a")
    assert r.reported == set() and r.failed == {"a": "bad update"}


def test_combiner_deadline_fails_pending_with_reason() -> None:
    r = CombinerRound.start(["a", "b", "c"], now=0.0, timeout=10.0)
    r.on_update("a")
    r.on_refused("b", "bad update")
    assert r.on_tick(9.999) is False and not r.done
    assert r.on_tick(10.0) is True
    assert r.done
    assert r.failed == {"b": "bad update", "c": "no update before the round timeout"}
    assert r.reported == {"a"} and r.pending == set()
    assert r.on_tick(11.0) is False


def test_combiner_no_report_after_deadline() -> None:
    r = CombinerRound.start(["a", "b"], now=0.0, timeout=1.0)
    assert r.on_tick(5.0) is True
    assert r.on_update("a") is False
    assert r.on_refused("b", "late") is False
    assert r.on_client_lost("b") is False
    # Events after the round is done change nothing (a stays failed, b keeps its reason).
    timeout = "no update before the round timeout"
    assert r.reported == set() and r.failed == {"a": timeout, "b": timeout}


def test_combiner_without_clients_is_ready_on_check() -> None:
    r = CombinerRound.start([], now=0.0, timeout=10.0)
    assert r.check() is True
    assert r.check() is False


def test_combiner_check_waits_for_pending() -> None:
    r = CombinerRound.start(["a"], now=0.0, timeout=10.0)
    assert r.check() is False and not r.done


def test_combiner_duplicate_clients_collapse() -> None:
    r = CombinerRound.start(iter(["a", "a"]), now=0.0, timeout=1.0)
    assert r.expected == {"a"}
    assert r.on_update("a") is True


# -- ControllerRound --------------------------------------------------------------------


def test_controller_all_partials_succeed() -> None:
    r = ControllerRound.start({"c1": 2, "c2": 3}, min_clients=5, now=0.0, timeout=60.0)
    assert r.deadline == 60.0
    assert r.on_partial("c1", 2) is None
    assert r.waiting_for == {"c2"}
    assert r.on_partial("c2", 3) == Decision(Outcome.SUCCEEDED, 5)
    assert r.contributions == 5


def test_controller_start_copies_selection() -> None:
    selected = {"c1": 1}
    r = ControllerRound.start(selected, min_clients=1, now=0.0, timeout=1.0)
    selected["c2"] = 4
    assert r.selected == {"c1": 1}


def test_controller_fewer_than_selected_waits_for_other_combiners() -> None:
    r = ControllerRound.start({"c1": 3, "c2": 3}, min_clients=2, now=0.0, timeout=60.0)
    # c1 alone already meets min_clients, but c2 may still add to the round
    assert r.on_partial("c1", 2) is None
    assert r.on_tick(30.0) is None
    assert r.on_partial("c2", 1) == Decision(Outcome.SUCCEEDED, 3)


def test_controller_all_selected_succeeds_below_min_clients() -> None:
    r = ControllerRound.start({"c1": 2}, min_clients=5, now=0.0, timeout=60.0)
    assert r.on_partial("c1", 2) == Decision(Outcome.SUCCEEDED, 2)


def test_controller_combiner_lost() -> None:
    r = ControllerRound.start({"c1": 2, "c2": 2}, min_clients=2, now=0.0, timeout=60.0)
    assert r.on_partial("c1", 2) is None
    assert r.on_combiner_lost("c2") == Decision(Outcome.SUCCEEDED, 2)
    assert r.lost == {"c2"}


def test_controller_combiner_lost_below_min_fails() -> None:
    r = ControllerRound.start({"c1": 2, "c2": 2}, min_clients=3, now=0.0, timeout=60.0)
    assert r.on_combiner_lost("c1") is None
    d = r.on_partial("c2", 2)
    assert d is not None and d.outcome is Outcome.FAILED and d.contributions == 2
    assert d.reason == "2 of 4 selected clients contributed; at least 3 needed (lost combiner c1)"


def test_controller_all_combiners_lost_fails() -> None:
    r = ControllerRound.start({"c1": 1}, min_clients=1, now=0.0, timeout=60.0)
    d = r.on_combiner_lost("c1")
    assert d == Decision(Outcome.FAILED, 0, "0 of 1 selected clients contributed; at least 1 needed (lost combiner c1)")


def test_controller_refused_partial_names_its_reason() -> None:
    r = ControllerRound.start({"c1": 1, "c2": 2, "c3": 1}, min_clients=3, now=0.0, timeout=60.0)
    assert r.on_partial("c1", 1) is None
    assert r.on_combiner_lost("c3") is None
    d = r.on_partial_refused("c2", "adding this partial aggregate overflows the running sum")
    assert d is not None and d.outcome is Outcome.FAILED and d.contributions == 1
    assert d.reason == (
        "1 of 4 selected clients contributed; at least 3 needed (lost combiner c3)"
        " (partial from combiner c2 refused: adding this partial aggregate overflows the running sum)"
    )
    assert r.on_partial("c2", 2) is None  # a refused combiner cannot report again


def test_controller_deadline_names_combiners_that_never_reported() -> None:
    r = ControllerRound.start({"c1": 1, "c2": 1}, min_clients=2, now=0.0, timeout=10.0)
    assert r.on_partial("c1", 1) is None
    d = r.on_tick(10.0)
    assert d is not None and d.outcome is Outcome.FAILED
    assert d.reason == "1 of 2 selected clients contributed; at least 2 needed (no report from combiner c2)"


def test_controller_deadline_below_min_fails_with_counts() -> None:
    r = ControllerRound.start({"c1": 3, "c2": 3}, min_clients=4, now=10.0, timeout=5.0)
    r.on_partial("c1", 3)
    assert r.on_tick(14.9) is None
    d = r.on_tick(15.0)
    assert d is not None and d.outcome is Outcome.FAILED and d.contributions == 3
    assert "3 of 6" in d.reason and "at least 4" in d.reason


def test_controller_deadline_at_min_succeeds() -> None:
    r = ControllerRound.start({"c1": 3, "c2": 3}, min_clients=3, now=0.0, timeout=5.0)
    r.on_partial("c1", 3)
    assert r.on_tick(5.0) == Decision(Outcome.SUCCEEDED, 3)


def test_controller_zero_contributions_fail_even_when_min_met() -> None:
    r = ControllerRound.start({"c1": 2}, min_clients=0, now=0.0, timeout=5.0)
    d = r.on_partial("c1", 0)
    assert d is not None and d.outcome is Outcome.FAILED and d.contributions == 0
    assert "0 of 2" in d.reason

    empty = ControllerRound.start({}, min_clients=1, now=0.0, timeout=5.0)
    d = empty.on_tick(0.0)  # nothing to wait for, and 0 == 0 selected is still not a success
    assert d is not None and d.outcome is Outcome.FAILED


def test_controller_decision_returned_once_and_late_partials_ignored() -> None:
    r = ControllerRound.start({"c1": 2, "c2": 2}, min_clients=1, now=0.0, timeout=5.0)
    r.on_partial("c1", 2)
    first = r.on_tick(6.0)
    assert first == Decision(Outcome.SUCCEEDED, 2)
    assert r.on_tick(7.0) is None
    assert r.on_partial("c2", 2) is None
    assert r.on_combiner_lost("c2") is None
    assert r.received == {"c1": 2} and r.lost == set() and r.contributions == 2
    assert r.decision is first


def test_controller_ignores_unknown_and_repeated_partials() -> None:
    r = ControllerRound.start({"c1": 2, "c2": 2}, min_clients=1, now=0.0, timeout=5.0)
    assert r.on_partial("stranger", 9) is None
    assert r.on_partial("c1", 1) is None
    assert r.on_partial("c1", 2) is None  # a repeat cannot change the count
    assert r.on_combiner_lost("c1") is None  # nor can losing a combiner that already reported
    assert r.received == {"c1": 1} and r.lost == set()
    assert r.on_combiner_lost("c2") == Decision(Outcome.SUCCEEDED, 1)


def test_pending_follows_every_event_like_its_definition() -> None:
    """pending is kept as events arrive (O(1) each, not a set difference over all clients per
    event): after any mix of events it equals expected - reported - failed."""
    import random

    rng = random.Random(7)
    names = [f"c{i:04d}" for i in range(300)]
    r = CombinerRound.start(names, now=0.0, timeout=100.0, grace=5.0)
    view = r.pending
    now = 0.0
    for _ in range(2000):
        now += 0.04
        client = rng.choice(names)
        event = rng.randrange(5)
        if event == 0:
            r.on_update(client)
        elif event == 1:
            r.on_refused(client, "bad")
        elif event == 2:
            r.on_client_dropped(client, now)
        elif event == 3:
            r.on_client_back(client, still_working=rng.random() < 0.5)
        else:
            r.on_tick(now)
        assert r.pending == r.expected - r.reported - set(r.failed)
        assert r.pending is view  # one set, kept up to date: never rebuilt per event
    r.on_tick(100.0)
    assert r.done and not r.pending and r.reported | set(r.failed) == set(names)


# -- CombinerRound: the reconnect grace ----------------------------------------------------


def test_a_dropped_client_has_its_grace_then_is_lost() -> None:
    r = CombinerRound.start(["a", "b"], now=0.0, timeout=60.0, grace=10.0)
    assert r.next_wakeup == 60.0
    assert r.on_client_dropped("a", now=5.0) is False
    assert r.pending == {"a", "b"} and r.next_wakeup == 15.0
    assert r.on_tick(14.9) is False and "a" in r.pending
    r.on_update("b")
    assert r.on_tick(15.0) is True  # a's grace ran out and nobody else is pending
    assert r.failed == {"a": "client disconnected and did not come back within 10 s"}
    assert r.next_wakeup is None


def test_a_client_back_in_its_grace_keeps_or_gets_its_task_again() -> None:
    r = CombinerRound.start(["a", "b"], now=0.0, timeout=60.0, grace=10.0)
    r.on_client_dropped("a", now=1.0)
    r.on_client_dropped("b", now=2.0)
    assert r.on_client_back("a", still_working=True) is Resume.KEEP
    assert r.on_client_back("b", still_working=False) is Resume.RESEND
    assert r.away == {} and r.next_wakeup == 60.0
    assert r.on_tick(30.0) is False and r.pending == {"a", "b"}
    assert r.on_update("a") is False and r.on_update("b") is True


def test_only_the_latest_absence_counts() -> None:
    r = CombinerRound.start(["a"], now=0.0, timeout=60.0, grace=10.0)
    r.on_client_dropped("a", now=1.0)
    r.on_client_back("a", still_working=True)
    r.on_client_dropped("a", now=8.0)
    assert r.on_tick(11.0) is False and r.pending == {"a"}  # the first absence's end means nothing
    assert r.on_tick(18.0) is True and "a" in r.failed


def test_grace_never_outlasts_the_deadline_and_goodbye_has_none() -> None:
    r = CombinerRound.start(["a", "b", "c"], now=0.0, timeout=20.0, grace=10.0)
    r.on_client_dropped("a", now=15.0)
    assert r.away["a"] == 20.0
    assert r.on_client_dropped("b", now=15.0, goodbye=True) is False
    assert r.failed == {"b": "client disconnected"}
    assert r.on_tick(20.0) is True
    # The deadline came before a's grace was over: the reason names the deadline, not the grace.
    assert r.failed["a"] == "client disconnected and the round ended before it came back"
    assert r.failed["c"] == "no update before the round timeout"


def test_drops_and_returns_of_clients_not_pending_change_nothing() -> None:
    r = CombinerRound.start(["a", "b"], now=0.0, timeout=60.0, grace=10.0)
    r.on_update("a")
    assert r.on_client_dropped("a", now=1.0) is False and r.away == {}
    assert r.on_client_dropped("x", now=1.0) is False
    assert r.on_client_back("a", still_working=False) is Resume.NOTHING
    assert r.on_client_back("x", still_working=True) is Resume.NOTHING
    r.on_tick(60.0)
    assert r.on_client_back("b", still_working=True) is Resume.NOTHING


def test_no_grace_means_a_drop_is_a_loss() -> None:
    r = CombinerRound.start(["a"], now=0.0, timeout=60.0)
    assert r.on_client_dropped("a", now=1.0) is True
    assert r.failed == {"a": "client disconnected"}


def test_a_combiner_whose_link_drops_has_a_grace_to_come_back_and_report():
    r = ControllerRound.start({"c1": 2, "c2": 2}, min_clients=4, now=0.0, timeout=60.0)
    assert r.on_combiner_dropped("c1", now=1.0, grace=10.0) is None
    assert r.next_wakeup == 11.0 and "c1" in r.waiting_for
    r.on_combiner_back("c1")
    assert r.next_wakeup == 60.0
    assert r.on_partial("c2", 2) is None
    decision = r.on_partial("c1", 2)  # its partial, re-reported over its new link
    assert decision is not None and decision.outcome is Outcome.SUCCEEDED and decision.contributions == 4


def test_a_combiner_that_does_not_come_back_in_its_grace_is_lost():
    r = ControllerRound.start({"c1": 1, "c2": 1}, min_clients=1, now=0.0, timeout=60.0)
    r.on_combiner_dropped("c1", now=0.0, grace=5.0)
    assert r.on_partial("c2", 1) is None  # still waiting for c1's grace
    assert r.on_tick(4.9) is None
    decision = r.on_tick(5.0)
    assert decision is not None and decision.outcome is Outcome.SUCCEEDED and decision.contributions == 1
    assert r.lost == {"c1"}


def test_a_grace_never_outlasts_the_round():
    r = ControllerRound.start({"c1": 1}, min_clients=1, now=0.0, timeout=10.0)
    r.on_combiner_dropped("c1", now=8.0, grace=30.0)
    assert r.next_wakeup == 10.0
    decision = r.on_tick(10.0)
    assert decision is not None and decision.outcome is Outcome.FAILED and "lost combiner c1" in decision.reason
