from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import pytest

from scaleout.core.config import DEFAULT_PORT, SessionConfig, merge, parse_port, parse_sans
from scaleout.core.errors import ConfigError

DEFAULTS = {
    "rounds": 5,
    "round_timeout": 180.0,
    "min_clients": 1,
    "aggregator": "fedavg",
    "aggregator_kwargs": {},
    "validate": True,
    "settings": {},
    "name": None,
    "max_examples_per_client": 1_000_000,
    "max_update_norm": 10.0,
    "clients_per_round": None,
    "seed": None,
    "clients": None,
    "server_functions": None,
    "server_functions_file": "server_functions.py",
    "server_functions_timeout": 60.0,
}


def test_defaults() -> None:
    assert SessionConfig().to_dict() == DEFAULTS
    assert SessionConfig.from_mapping({}) == SessionConfig()
    assert SessionConfig().settings is not SessionConfig().settings


def test_from_mapping_and_to_dict_round_trip() -> None:
    data = {
        "rounds": 3,
        "round_timeout": 2.5,
        "min_clients": 4,
        "aggregator": "fedadam",
        "aggregator_kwargs": {"learning_rate": 0.01, "beta1": 0.5},
        "validate": False,
        "settings": {"epochs": 2, "lr": 0.1},
        "name": "exp-1",
        "max_examples_per_client": 500,
        "max_update_norm": 3.5,
        "clients_per_round": 0.5,
        "seed": 42,
        "clients": ["a", "b", "c", "d"],
        "server_functions": "class ServerFunctions: pass\n",
        "server_functions_file": "sf.py",
        "server_functions_timeout": 5.0,
    }
    cfg = SessionConfig.from_mapping(data)
    assert cfg.to_dict() == data
    assert SessionConfig.from_mapping(cfg.to_dict()) == cfg
    assert SessionConfig.from_mapping(MappingProxyType(data)) == cfg


def test_partial_mapping_keeps_other_defaults() -> None:
    cfg = SessionConfig.from_mapping({"rounds": 1, "round_timeout": 7})
    assert cfg.to_dict() == {**DEFAULTS, "rounds": 1, "round_timeout": 7}


@pytest.mark.parametrize(
    "key, value",
    [
        ("rounds", 0),
        ("rounds", -1),
        ("rounds", 1_000_001),
        ("rounds", "3"),
        ("rounds", True),
        ("rounds", 3.0),
        ("rounds", None),
        ("round_timeout", 0),
        ("round_timeout", -1.0),
        ("round_timeout", math.nan),
        ("round_timeout", math.inf),
        ("round_timeout", "x"),
        ("round_timeout", "60"),
        ("round_timeout", True),
        ("round_timeout", None),
        ("round_timeout", 1e300),  # would wait practically forever
        ("round_timeout", 7 * 86400 + 1),
        ("min_clients", 10**30),  # could never be met
        ("min_clients", 1_000_001),
        ("min_clients", 0),
        ("min_clients", -2),
        ("min_clients", 1.5),
        ("min_clients", False),
        ("aggregator", ""),
        ("aggregator", None),
        ("aggregator", 3),
        ("aggregator", "fedprocs"),
        ("aggregator_kwargs", ["lr", 1]),
        ("validate", "yes"),
        ("validate", 1),
        ("validate", None),
        ("settings", ["epochs", 2]),
        ("settings", '{"epochs": 2}'),
        ("settings", None),
        ("name", 5),
        ("name", ["a"]),
    ],
)
def test_invalid_values_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        SessionConfig.from_mapping({key: value})
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    if key not in ("aggregator", "aggregator_kwargs", "settings", "name"):
        assert f"got {value!r}" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"lr": 0.1}, "aggregator_kwargs.lr"),
        ({"learning_rate": 0}, "aggregator_kwargs.learning_rate"),
        ({"learning_rate": "0.1"}, "aggregator_kwargs.learning_rate"),
        ({"beta1": 1.0}, "aggregator_kwargs.beta1"),
        ({"beta2": -0.1}, "aggregator_kwargs.beta2"),
        ({"tau": math.inf}, "aggregator_kwargs.tau"),
        ({"tau": True}, "aggregator_kwargs.tau"),
    ],
)
def test_aggregator_kwargs_are_checked_against_the_strategy(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        SessionConfig(aggregator="fedadam", aggregator_kwargs=kwargs)
    assert info.value.key == key


def test_fedavg_takes_no_kwargs() -> None:
    with pytest.raises(ConfigError, match="fedavg takes no such setting; it takes: none"):
        SessionConfig(aggregator_kwargs={"learning_rate": 0.1})


def test_constructor_validates_too() -> None:
    with pytest.raises(ConfigError, match="rounds"):
        SessionConfig(rounds=0)


def test_bounds_are_said_in_the_error() -> None:
    with pytest.raises(ConfigError, match=r"at most 604,800 \(7 days\), got 1e\+300"):
        SessionConfig(round_timeout=1e300)
    with pytest.raises(ConfigError, match=r"from 1 to 1,000,000, got 1000000000000000000000000000000"):
        SessionConfig(min_clients=10**30)
    assert SessionConfig(round_timeout=7 * 86400, min_clients=1_000_000).min_clients == 1_000_000


@pytest.mark.parametrize("timeout", [0.001, 1, 3600.5])
def test_valid_timeouts(timeout: float) -> None:
    assert SessionConfig(round_timeout=timeout).round_timeout == timeout


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        SessionConfig.from_mapping({"rounds": 2, "roundz": 3, "zz": 1})
    assert info.value.key == "roundz"
    message = str(info.value)
    assert message.startswith("roundz: unknown session setting")
    assert "rounds" in message and "min_clients" in message


@pytest.mark.parametrize("data", [None, [("rounds", 2)], "rounds=2"])
def test_non_mapping_refused(data: Any) -> None:
    with pytest.raises(ConfigError) as info:
        SessionConfig.from_mapping(data)
    assert info.value.key == "session"


def test_config_is_frozen() -> None:
    cfg = SessionConfig()
    with pytest.raises(AttributeError):
        cfg.rounds = 9  # type: ignore[misc]


ALLOWED = {"host", "port", "data_dir"}


def test_merge_flags_override_file() -> None:
    merged = merge({"host": "0.0.0.0", "port": 9000}, {"port": 9100, "data_dir": "/d"}, ALLOWED, "controller")
    assert merged == {"host": "0.0.0.0", "port": 9100, "data_dir": "/d"}


def test_merge_ignores_flags_not_given_but_keeps_falsy_ones() -> None:
    merged = merge({"host": "h", "port": 9000}, {"host": None, "port": 0, "data_dir": ""}, ALLOWED, "controller")
    assert merged == {"host": "h", "port": 0, "data_dir": ""}


def test_merge_does_not_mutate_inputs() -> None:
    file_settings, flags = {"port": 1}, {"port": 2}
    merge(file_settings, flags, ALLOWED, "controller")
    assert file_settings == {"port": 1} and flags == {"port": 2}


def test_merge_refuses_unknown_file_keys_with_section() -> None:
    with pytest.raises(ConfigError) as info:
        merge({"port": 1, "prot": 2, "zzz": 3}, {}, ALLOWED, "combiner")
    assert info.value.key == "combiner.prot"
    message = str(info.value)
    assert message.startswith("combiner.prot: unknown setting")
    assert "data_dir, host, port" in message


def test_merge_of_empty_inputs() -> None:
    assert merge({}, {}, ALLOWED, "client") == {}


@pytest.mark.parametrize("port", [0, 1, DEFAULT_PORT, 65535])
def test_parse_port_accepts(port: int) -> None:
    assert parse_port(port) == port


@pytest.mark.parametrize("port", [-1, 65536, "8090", True, 8090.0, None])
def test_parse_port_refuses(port: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_port(port)
    assert info.value.key == "port"
    assert f"got {port!r}" in str(info.value) and "0 and 65535" in str(info.value)


def test_parse_sans_accepts_addresses_and_dns_names() -> None:
    given = ["10.0.0.1", "Ctl.Example.org", "[fd00::0:2]", "*.edge.example", "ctl.example.org", "host-1"]
    assert parse_sans(given, "controller") == ["10.0.0.1", "ctl.example.org", "fd00::2", "*.edge.example", "host-1"]
    assert parse_sans(None, "controller") == []


@pytest.mark.parametrize("bad", ["10.0.0.1:8090", "wss://ctl", "a b", "-x.org", "x..org", "10.0.0.300", "fe80::1%eth0", "", 7, "ctl"])
def test_parse_sans_refuses_what_is_not_a_name(bad: Any) -> None:
    value = bad if bad == "ctl" else [bad]  # "ctl" alone: a string where a list is due
    with pytest.raises(ConfigError, match="san"):
        parse_sans(value, "controller")


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("server_functions", "", "must be the Python source"),
        ("server_functions", "x" * (256 << 10 | 1), "at most 262,144 are taken"),
        ("server_functions_timeout", 0, "must be a number of seconds > 0"),
        ("server_functions_timeout", float("nan"), "must be a number of seconds > 0"),
        ("server_functions_file", "", "must be a file name"),
    ],
)
def test_server_functions_settings_are_checked(field: str, value: Any, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        SessionConfig.from_mapping({field: value})


@pytest.mark.parametrize(("serveropt", "named"), [(None, "fedadam"), ("adam", "fedadam"), ("yogi", "fedyogi"), ("adagrad", "fedadagrad")])
def test_edges_fedopt_is_the_server_optimiser_its_serveropt_names(serveropt: str | None, named: str) -> None:
    kwargs: dict[str, Any] = {"learning_rate": 0.01} | ({"serveropt": serveropt} if serveropt else {})
    cfg = SessionConfig(aggregator="fedopt", aggregator_kwargs=kwargs)
    assert cfg.aggregator == named and cfg.aggregator_kwargs == {"learning_rate": 0.01}


def test_fedopt_with_an_unknown_serveropt_is_refused() -> None:
    with pytest.raises(ConfigError, match="serveropt is adam, yogi or adagrad, got 'sgd'"):
        SessionConfig(aggregator="fedopt", aggregator_kwargs={"serveropt": "sgd"})
