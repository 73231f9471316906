"""Client sampling: how many a round draws, the same draw for the same seed and round
(a restarted controller), why each other client is left out, and bad settings refused."""

from __future__ import annotations

from typing import Any

import pytest

from scaleout.core.config import SessionConfig
from scaleout.core.errors import ConfigError
from scaleout.core.selection import clients_to_wait_for, round_quota, sample_clients

FLEET = {"c0": ["a", "b", "c"], "c1": ["d", "e"], "c2": ["f", "g", "h", "i", "j"]}


def names(selected: dict[str, list[str]]) -> list[str]:
    return sorted(c for cs in selected.values() for c in cs)


@pytest.mark.parametrize(("per_round", "eligible", "want"), [(None, 7, 7), (2, 7, 2), (9, 7, 7), (0.1, 7, 1), (0.5, 7, 3), (1.0, 7, 7), (0.3, 10, 3), (0.5, 0, 0)])
def test_round_quota(per_round: Any, eligible: int, want: int) -> None:
    assert round_quota(per_round, eligible) == want


def test_n_per_round_draws_n_reproducibly_from_seed_and_round() -> None:
    draws = []
    for index in range(1, 6):
        selected, left_out = sample_clients(FLEET, index, 1234, 3, None)
        assert len(names(selected)) == 3
        assert all(cs for cs in selected.values())  # combiners none of whose clients were drawn are left out
        assert left_out == {c: "not sampled" for c in "abcdefghij" if c not in names(selected)}
        # Another controller (a restart) draws the same: the same seed, round and clients,
        # whatever order the combiners list them in.
        shuffled = {k: list(reversed(v)) for k, v in reversed(FLEET.items())}
        assert names(sample_clients(shuffled, index, 1234, 3, None)[0]) == names(selected)
        draws.append(names(selected))
    assert len({tuple(d) for d in draws}) > 1  # rounds differ from each other
    assert names(sample_clients(FLEET, 1, 99, 3, None)[0]) != draws[0] or names(sample_clients(FLEET, 2, 99, 3, None)[0]) != draws[1]


def test_without_sampling_everyone_takes_part() -> None:
    selected, left_out = sample_clients(FLEET, 1, 0, None, None)
    assert selected == FLEET and left_out == {}


def test_fixed_set_with_reasons_for_the_others() -> None:
    selected, left_out = sample_clients(FLEET, 1, 7, None, ["b", "e", "zed"])
    assert selected == {"c0": ["b"], "c1": ["e"]}
    assert left_out["zed"] == "not connected"
    assert left_out["a"] == "not in --clients" and left_out["j"] == "not in --clients"
    assert len(left_out) == 9
    selected, left_out = sample_clients(FLEET, 1, 7, 1, ["b", "e", "zed"])
    assert len(names(selected)) == 1
    assert sorted(k for k, v in left_out.items() if v == "not sampled") == sorted({"b", "e"} - set(names(selected)))


def test_clients_to_wait_for() -> None:
    assert clients_to_wait_for(None, None, 2) == 2
    assert clients_to_wait_for(4, None, 2) == 4
    assert clients_to_wait_for(0.5, None, 2) == 2
    assert clients_to_wait_for(None, ["a", "b", "c"], 1) == 3
    assert clients_to_wait_for(2, ["a", "b", "c"], 1) == 2
    assert clients_to_wait_for(9, ["a", "b", "c"], 1) == 3


def test_config_keeps_sampling_settings() -> None:
    cfg = SessionConfig.from_mapping({"clients_per_round": 2, "seed": 5, "clients": ("a", "b")})
    assert cfg.to_dict()["clients"] == ["a", "b"] and cfg.clients_per_round == 2 and cfg.seed == 5
    assert SessionConfig.from_mapping({"clients_per_round": 0.25}).clients_per_round == 0.25
    assert SessionConfig().clients_per_round is None and SessionConfig().seed is None and SessionConfig().clients is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"clients_per_round": 1.5}, r"a fraction must lie in \(0, 1\]"),
        ({"clients_per_round": 0.0}, "fraction"),
        ({"clients_per_round": True}, "clients_per_round"),
        ({"clients_per_round": "2"}, "clients_per_round"),
        ({"clients_per_round": 2, "min_clients": 3}, "fewer than min_clients"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"clients": "a,b"}, "list of client names"),
        ({"clients": []}, "at least one"),
        ({"clients": ["a", "a"]}, "a more than once"),
        ({"clients": ["a b"]}, "letters, digits"),
        ({"clients": ["a"], "min_clients": 2}, "fewer than min_clients"),
    ],
)
def test_bad_sampling_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SessionConfig.from_mapping(settings)
