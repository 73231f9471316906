"""Session and role settings: validated, with defaults.

Role settings come from a TOML file (``--config``) overridden by flags; this module only
sees the merged mapping, so it stays free of file I/O.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from scaleout.core.errors import ConfigError

DEFAULT_PORT = 8090
MAX_ROUNDS = 1_000_000
MAX_ROUND_TIMEOUT_S = 7 * 86400  # a week: a longer round is a typo (1e300), and waits practically forever
MAX_MIN_CLIENTS = 1_000_000  # more than any fleet: a larger minimum could never be met


@dataclass(frozen=True)
class SessionConfig:
    """What ``scaleout session start`` asks for."""

    rounds: int = 5
    round_timeout: float = 180.0
    min_clients: int = 1
    aggregator: str = "fedavg"
    aggregator_kwargs: dict[str, Any] = field(default_factory=dict)
    validate: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    # A client's weight is clipped to this many examples (0: no cap); a change beyond this
    # multiple of the model's norm is refused (0: off). See core/aggregators/bounds.py.
    max_examples_per_client: int = 1_000_000
    max_update_norm: float = 10.0
    # Client sampling (core/selection.py): how many of the eligible connected clients train
    # each round (a whole number, or a fraction in (0, 1]; None: all), the seed each round's
    # draw derives from (with the round index), and a fixed set of client names (None: any).
    clients_per_round: int | float | None = None
    seed: int | None = None
    clients: list[str] | None = None
    # Server functions (Scaleout Edge's ServerFunctions class): the file's source, its name
    # (tracebacks name it) and the time limit of each call. See roles/serverfunctions.py.
    server_functions: str | None = None
    server_functions_file: str = "server_functions.py"
    server_functions_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or not 1 <= self.rounds <= MAX_ROUNDS:
            raise ConfigError("rounds", f"must be a whole number from 1 to {MAX_ROUNDS:,}, got {self.rounds!r:.40}")
        timeout = self.round_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or not 0 < timeout <= MAX_ROUND_TIMEOUT_S:
            raise ConfigError("round_timeout", f"must be a number of seconds > 0 and at most {MAX_ROUND_TIMEOUT_S:,} (7 days), got {timeout!r:.40}")
        if not isinstance(self.min_clients, int) or isinstance(self.min_clients, bool) or not 1 <= self.min_clients <= MAX_MIN_CLIENTS:
            raise ConfigError("min_clients", f"must be a whole number from 1 to {MAX_MIN_CLIENTS:,}, got {self.min_clients!r:.40}")
        if not isinstance(self.aggregator, str) or not self.aggregator:
            raise ConfigError("aggregator", "must be a non-empty name")
        if self.aggregator == "fedopt" and isinstance(self.aggregator_kwargs, dict):
            # Scaleout Edge's name: fedopt with serveropt adam (its default), yogi or adagrad.
            kwargs = dict(self.aggregator_kwargs)
            serveropt = kwargs.pop("serveropt", "adam")
            named = {"adam": "fedadam", "yogi": "fedyogi", "adagrad": "fedadagrad"}.get(serveropt) if isinstance(serveropt, str) else None
            if named is None:
                raise ConfigError("aggregator_kwargs.serveropt", f"fedopt's serveropt is adam, yogi or adagrad, got {str(serveropt)[:40]!r}")
            object.__setattr__(self, "aggregator", named)
            object.__setattr__(self, "aggregator_kwargs", kwargs)
        from scaleout.core.aggregators.strategy import make_strategy

        make_strategy(self.aggregator, self.aggregator_kwargs)  # unknown names and bad hyperparameters fail here
        if not isinstance(self.validate, bool):
            raise ConfigError("validate", f"must be true or false, got {self.validate!r}")
        if not isinstance(self.settings, dict):
            raise ConfigError("settings", "must be a JSON object, e.g. '{\"epochs\": 2}'")
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigError("name", "must be a string")
        from scaleout.core.aggregators.bounds import (
            parse_examples_cap,
            parse_norm_bound,
        )

        parse_examples_cap(self.max_examples_per_client)
        _check_server_functions(self)
        object.__setattr__(self, "max_update_norm", parse_norm_bound(self.max_update_norm))  # "off" -> 0.0
        from scaleout.core.selection import check_sampling

        clients = check_sampling(self.clients_per_round, self.seed, self.clients, self.min_clients)
        object.__setattr__(self, "clients", clients)  # a tuple from a caller becomes a list, as JSON has it

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SessionConfig:
        return _build(cls, data, "session")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_server_functions(cfg: SessionConfig) -> None:
    from scaleout.core.serverfunctions import MAX_SOURCE, MAX_TIMEOUT_S

    source, file, timeout = cfg.server_functions, cfg.server_functions_file, cfg.server_functions_timeout
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise ConfigError("server_functions", "must be the Python source of a file defining class ServerFunctions")
    if source is not None and len(source.encode("utf-8", "replace")) > MAX_SOURCE:
        raise ConfigError("server_functions", f"the file is {len(source.encode('utf-8', 'replace')):,} bytes; at most {MAX_SOURCE:,} are taken")
    if not isinstance(file, str) or not 0 < len(file) <= 200 or "\n" in file:
        raise ConfigError("server_functions_file", "must be a file name")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ConfigError("server_functions_timeout", f"must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:g}, got {timeout!r:.40}")


def _build(cls: Any, data: Mapping[str, Any], what: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(what, "must be a table of settings")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown {what} setting; known settings: {', '.join(sorted(known))}")
    try:
        return cls(**dict(data))
    except TypeError as exc:  # a wrong type that __post_init__ did not anticipate
        raise ConfigError(what, str(exc)) from None


def merge(file_settings: Mapping[str, Any], flags: Mapping[str, Any], allowed: set[str], section: str) -> dict[str, Any]:
    """Merge a role's TOML table with command-line flags (flags win when given).

    ``flags`` holds only options the user actually passed (None means "not given").
    Unknown keys in the file are refused so a typo never silently falls back to a default.
    """
    unknown = sorted(set(file_settings) - allowed)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", f"unknown setting; known settings: {', '.join(sorted(allowed))}")
    merged = dict(file_settings)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged


PATH = (str, os.PathLike)


def check_types(settings: Mapping[str, Any], schema: Mapping[str, type | tuple[type, ...]], section: str) -> None:
    """Refuse settings of the wrong type (a TOML ``insecure = "false"`` must not mean true)."""
    for key, value in settings.items():
        want = schema.get(key)
        if value is None or want is None:
            continue
        bad_bool = isinstance(value, bool) and want is not bool and not (isinstance(want, tuple) and bool in want)
        if bad_bool or not isinstance(value, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            names = names.replace("PathLike", "path").replace("str or path", "path")
            raise ConfigError(f"{section}.{key}", f"must be a {names}, got {value!r}")
        if want is int and isinstance(value, int) and value < 0:
            raise ConfigError(f"{section}.{key}", f"must not be negative, got {value!r}")


def parse_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError("port", f"must be a whole number between 0 and 65535, got {value!r}")
    return value


_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


def parse_sans(value: Any, section: str) -> list[str]:
    """Extra certificate names (``--san``, ``san = [...]``): IP addresses or DNS names."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{section}.san", f'must be a list of names or addresses, e.g. ["10.0.0.1", "ctl.example.org"], got {value!r}')
    names: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{section}.san", f"must be a host name or an IP address, got {item!r}")
        text = item.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            if "%" not in text:  # a zone (fe80::1%eth0) cannot be named in a certificate
                names.append(str(ipaddress.ip_address(text)))
                continue
        except ValueError:
            pass
        if len(text) > 253 or not _DNS_NAME.fullmatch(text) or text.replace(".", "").isdigit():
            raise ConfigError(f"{section}.san", f"{item!r} is neither an IP address nor a DNS name (letters, digits, '-' and '.')")
        names.append(text.lower())
    return list(dict.fromkeys(names))
