from __future__ import annotations

import pytest

from scaleout.core.errors import NotFoundError
from scaleout.core.selection import Assigner, choose_validators, select_clients


def test_no_combiner_ready_says_what_to_do() -> None:
    a = Assigner(ttl=30)
    with pytest.raises(NotFoundError, match="scaleout combine"):
        a.assign("x", now=0)


def test_least_loaded_counts_assignments_until_the_client_is_seen_or_sent_elsewhere() -> None:
    a = Assigner(ttl=30)
    a.combiner_ready("c1")
    a.combiner_ready("c2")
    got = [a.assign(f"k{i}", now=0) for i in range(4)]
    assert got == ["c1", "c2", "c1", "c2"]  # a burst of joins spreads out before anyone connects
    assert a.load("c1") == 2 and a.load("c2") == 2
    a.client_joined("c1", "k0")
    assert a.load("c1") == 2  # k0 moved from assigned to connected
    # c2 never reports k1 and k3 (a combiner that under-reports): they still count there.
    assert a.load("c2") == 2
    assert a.assign("late", now=31) == "c1"
    assert a.assign("k1", now=31) == "c2"  # asked again past the ttl: counted anew, where it goes
    assert a.load("c1") == 3 and a.load("c2") == 2
    # A client said to have left counts where it was until it is assigned again.
    a.client_left("c1", "k0")
    assert a.load("c1") == 3 and "k0" not in a.where


def test_a_connected_or_just_assigned_client_goes_back_where_it_is() -> None:
    a = Assigner(ttl=30)
    a.combiner_ready("c1")
    a.combiner_ready("c2")
    a.client_joined("c2", "x")
    assert a.assign("x", now=0) == "c2"
    assert a.assign("y", now=0) == "c1"
    assert a.assign("y", now=1) == "c1"  # a twin of y lands where y was sent
    assert a.assign("z", now=1, prefer="c2") == "c2"  # a reconnecting client prefers its combiner
    assert a.assign("w", now=1, prefer="gone") in ("c1", "c2")


def test_combiner_gone_releases_its_clients_and_assignments() -> None:
    a = Assigner(ttl=30)
    a.combiner_ready("c1")
    a.combiner_ready("c2")
    a.client_joined("c1", "x")
    a.assign("y", now=0)  # c2 (c1 has x)
    assert a.combiner_gone("c1") == ["x"]
    assert a.connected() == 0 and "x" not in a.where
    assert a.assign("x", now=1) == "c2"
    assert a.combiner_gone("c2") == []
    assert a.load("c2") == 0


def test_client_moves_and_leaves() -> None:
    a = Assigner(ttl=30)
    a.combiner_ready("c1")
    a.combiner_ready("c2")
    a.client_joined("c1", "x")
    a.client_joined("c2", "x")  # the newest connection wins
    assert a.members == {"c1": set(), "c2": {"x"}} and a.where == {"x": "c2"}
    a.client_left("c1", "x")  # a stale leave from the old combiner changes nothing
    assert a.where == {"x": "c2"}
    a.client_left("c2", "x")
    assert a.where == {} and a.connected() == 0


def test_ten_thousand_joins_spread_evenly() -> None:
    a = Assigner(ttl=30)
    for c in ("c1", "c2", "c3", "c4"):
        a.combiner_ready(c)
    for i in range(10_000):
        c = a.assign(f"k{i}", now=i * 0.001)
        a.client_joined(c, f"k{i}")
    assert sorted(len(m) for m in a.members.values()) == [2500] * 4


def test_select_and_validators() -> None:
    members = {"c2": {"b", "a"}, "c1": {"z"}, "c3": set(), "gone": {"q"}}
    selected = select_clients(members, ready={"c1", "c2", "c3"})
    assert selected == {"c1": ["z"], "c2": ["a", "b"]}
    assert choose_validators(selected, ["a", "z"]) == {"c1": ["z"], "c2": ["a"]}
    assert choose_validators(selected, ["b"]) == {"c2": ["b"]}
    assert choose_validators(selected, []) == {}
