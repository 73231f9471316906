"""Custom commands and predictions: what a request may be, what a client's result may be,
and when a job is over. Pure: callers pass ``now``.

A job runs one callback (a custom command, or the predict callback on a model) on a set of
clients. Each client's outcome is stored: ``ok`` with its result, or ``error`` with a code
(``REASONS``) and a line saying why. A job is over when every client answered or its
deadline passed; those that did not answer by then are recorded as ``timeout``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scaleout.core.errors import CommandFailed, ConfigError
from scaleout.core.limits import MAX_RESULT_BYTES, check_size
from scaleout.core.errors import LimitExceeded

KINDS = ("command", "predict")
CUSTOM_PREFIX = "Custom_"  # Scaleout Edge registers custom callbacks under this prefix
MAX_PARAMS_BYTES = 64 << 10  # params of one job, as JSON
MAX_TIMEOUT_S = 86400.0
DEFAULT_TIMEOUT_S = {"command": 60.0, "predict": 300.0}
RELAY_GRACE_S = 5.0  # a combiner waits this much past a client's timeout for its answer
CONTROLLER_GRACE_S = 10.0  # the controller waits this much past the combiners' deadline

# Why a client's result is an error (the stored ``code``).
RAISED = "raised"  # the callback raised
TIMEOUT = "timeout"  # it did not return within the timeout (or no answer came)
NOT_JSON = "not_json"  # it returned something that is not a JSON object
NO_SUCH_COMMAND = "no_such_command"  # no custom callback of that name (or no predict callback)
TOO_LARGE = "too_large"  # its result is larger than MAX_RESULT_BYTES as JSON
NOT_CONNECTED = "not_connected"  # the client was not connected when the job started
LOST = "lost"  # its link (or its combiner's) dropped before it answered
NO_PACKAGE = "no_package"  # its compute package failed to load: it takes no work
BUSY = "busy"  # too many earlier callbacks are still running past their timeout
FAILED = "failed"  # anything else (the model could not be fetched, ...)
REASONS = (RAISED, TIMEOUT, NOT_JSON, NO_SUCH_COMMAND, TOO_LARGE, NOT_CONNECTED, LOST, NO_PACKAGE, BUSY, FAILED)


def command_key(name: str) -> str:
    """The name a custom callback is registered and looked up under: Edge's ``Custom_``
    prefix is optional on either side, so ``Custom_x`` and ``x`` find the same callback."""
    return name[len(CUSTOM_PREFIX):] if name.startswith(CUSTOM_PREFIX) and len(name) > len(CUSTOM_PREFIX) else name


def check_command_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 128 or any(c.isspace() or not c.isprintable() for c in name):
        raise ConfigError("name", f"a command name is 1-128 printable characters without spaces, got {name!r:.60}")
    return name


def check_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, Mapping):
        raise ConfigError("params", f"must be a JSON object, e.g. '{{\"n\": 3}}', got {type(params).__name__}")
    try:
        check_size(dict(params), MAX_PARAMS_BYTES, "params", "pass a few settings, not data")
    except LimitExceeded as exc:
        raise ConfigError("params", str(exc)) from None
    except ValueError:
        raise ConfigError("params", "numbers must be finite (no NaN or Infinity)") from None
    return dict(params)


def check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ConfigError("timeout", f"must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}, got {timeout!r:.40}")
    return float(timeout)


def json_result(value: Any, what: str) -> dict[str, Any]:
    """A callback's return value as a strict JSON object (numpy scalars and arrays become
    numbers and lists); raises CommandFailed(NOT_JSON or TOO_LARGE) saying where it is not."""
    if not isinstance(value, Mapping):
        kind = "None" if value is None else f"a {type(value).__name__}"
        raise CommandFailed(NOT_JSON, f"the {what} callback must return a dict (a JSON object), got {kind}")
    out = strict_json(value, "result", f"the {what} result")
    try:
        check_size(out, MAX_RESULT_BYTES, f"the {what} result", "return a summary, not data")
    except LimitExceeded as exc:
        raise CommandFailed(TOO_LARGE, str(exc)) from None
    return out  # type: ignore[no-any-return]


def strict_json(value: Any, where: str, what: str, depth: int = 0) -> Any:
    """``value`` as plain JSON types; raises CommandFailed(NOT_JSON) naming ``what`` and
    where inside it (``where``) a value is not JSON (a set, an object, NaN, ...)."""
    if depth > 64:
        raise CommandFailed(NOT_JSON, f"{what} is nested more than 64 levels deep")
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CommandFailed(NOT_JSON, f"{what} holds {value} at {where}: not JSON (use None or a string)")
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CommandFailed(NOT_JSON, f"{what} has a key {k!r} at {where} that is not a string")
            out[k] = strict_json(v, f"{where}[{k!r}]", what, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [strict_json(v, f"{where}[{i}]", what, depth + 1) for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist) and type(value).__module__ == "numpy":
        return strict_json(tolist(), where, what, depth)
    raise CommandFailed(NOT_JSON, f"{what} holds a {type(value).__name__} at {where}: not JSON")


@dataclass
class Outcome:
    """One client's result of a job."""

    client: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    code: str | None = None
    duration_s: float | None = None


@dataclass
class JobTracker:
    """Which clients of a job have answered; over when all did or ``deadline`` passed."""

    expected: set[str]
    deadline: float
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @classmethod
    def start(cls, clients: Iterable[str], now: float, wait_s: float) -> JobTracker:
        return cls(set(clients), now + wait_s)

    @property
    def pending(self) -> set[str]:
        return self.expected - self.outcomes.keys()

    @property
    def done(self) -> bool:
        return not self.pending

    def on_outcome(self, outcome: Outcome) -> bool:
        """Record a client's first outcome (later ones and strangers are ignored); True if new."""
        if outcome.client not in self.expected or outcome.client in self.outcomes:
            return False
        self.outcomes[outcome.client] = outcome
        return True

    def fail(self, clients: Iterable[str], code: str, error: str) -> list[Outcome]:
        """Those of ``clients`` still pending fail with ``code``; returns their outcomes."""
        out = []
        for client in sorted(set(clients) & self.pending):
            outcome = Outcome(client, False, error=error, code=code)
            self.outcomes[client] = outcome
            out.append(outcome)
        return out

    def on_tick(self, now: float, what: str = "no answer") -> list[Outcome]:
        """At the deadline every client still pending times out."""
        if now < self.deadline:
            return []
        return self.fail(self.pending, TIMEOUT, what)


def summary(results: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Counts by status: ``ok``, ``error`` and ``pending``."""
    counts = {"ok": 0, "error": 0, "pending": 0}
    for r in results:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    return counts
