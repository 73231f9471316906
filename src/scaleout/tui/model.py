"""What the TUI shows, as plain state: a snapshot loaded, typed events applied.

No Textual and no I/O here: ``FedView.load`` takes the controller's snapshot, ``apply``
takes one typed event and says what changed, so widgets redraw only that. Applying is
idempotent (events are upserts keyed by name, round, client and step), so an event both in
a snapshot and after it changes nothing.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from scaleout.core import messages as m
from scaleout.core.metrics import Spread, spread

LOG_LINES = 5000


@dataclass
class ClientRow:
    name: str
    status: str = "offline"
    combiner: str = ""
    last_seen: float | None = None
    last_round: tuple[str, int] | None = None  # (session id, round) it last trained in
    package: str = ""


@dataclass
class CombinerRow:
    name: str
    status: str = "offline"
    url: str = ""
    clients: int = 0


@dataclass
class RoundRow:
    index: int
    status: str = "running"
    reason: str | None = None
    started: float | None = None
    duration_s: float | None = None
    participants: int = 0
    expected: int = 0
    received: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    deadline: float | None = None
    model_id: str | None = None
    validation: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # client -> why its work was refused or failed


@dataclass
class SessionRow:
    id: str
    status: str = "running"
    reason: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    created: float | None = None
    finished: float | None = None


@dataclass
class ModelRow:
    id: str
    parent: str | None = None
    session_id: str | None = None
    round_index: int | None = None
    aggregator: str | None = None
    contributors: list[str] | int = 0
    size: int = 0
    created: float | None = None

    @property
    def n_contributors(self) -> int:
        return len(self.contributors) if isinstance(self.contributors, list) else self.contributors


@dataclass
class LogLine:
    time: float
    level: str  # info, warning, error
    text: str


@dataclass
class Changes:
    """What an event changed, for the widgets to redraw."""

    clients: set[str] = field(default_factory=set)
    combiners: bool = False
    session: bool = False  # the session panel and the rounds table
    metrics: bool = False
    models: bool = False
    log: bool = False
    header: bool = False  # the active model or package
    everything: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.clients or self.combiners or self.session or self.metrics or self.models or self.log or self.header or self.everything
        )


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


class FedView:
    def __init__(self) -> None:
        self.url = ""
        self.active_model: str | None = None
        self.active_package: tuple[str, str] | None = None  # (id, name)
        self.clients: dict[str, ClientRow] = {}
        self.combiners: dict[str, CombinerRow] = {}
        self.sessions: dict[str, SessionRow] = {}
        self.session_id: str | None = None  # the session shown (the running or latest one)
        self.rounds: dict[int, RoundRow] = {}
        # metric -> round -> client -> value (validation); metric -> (round, step, client) -> value (log_metric)
        self.validation: dict[str, dict[int, dict[str, float]]] = {}
        self.training: dict[str, dict[tuple[int, int, str], float]] = {}
        self.models: dict[str, ModelRow] = {}
        self.log: deque[LogLine] = deque(maxlen=LOG_LINES)
        self.loaded = False
        self._members: dict[str, set[str]] = {}  # combiner -> its online clients
        self._where: dict[str, str] = {}  # online client -> its combiner

    # -- snapshot ---------------------------------------------------------------------------

    def load(self, snap: dict[str, Any]) -> Changes:
        """Replace everything with the controller's snapshot (``events.snapshot``); a
        malformed one raises ValueError saying so (and changes nothing)."""
        before = dict(self.__dict__)
        try:
            return self._load(snap)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            self.__dict__.update(before)
            raise ValueError(f"the controller's snapshot is malformed ({type(exc).__name__}: {exc})") from None

    def _load(self, snap: dict[str, Any]) -> Changes:
        self.url = str(snap.get("url") or "")
        self.active_model = snap.get("active_model")
        pkg = snap.get("active_package")
        self.active_package = (str(pkg.get("id")), str(pkg.get("name") or "")) if isinstance(pkg, dict) else None
        self.combiners = {}
        for row in snap.get("combiners") or []:
            self.combiners[row["name"]] = CombinerRow(row["name"], str(row.get("status") or ""), str(row.get("url") or ""), int(row.get("clients") or 0))
        self.clients = {}
        for row in snap.get("clients") or []:
            last = row.get("last_round")
            self.clients[row["name"]] = ClientRow(
                row["name"], str(row.get("status") or ""), str(row.get("combiner") or ""), _num(row.get("last_seen")),
                (str(last[0]), int(last[1])) if isinstance(last, list) and len(last) == 2 else None, str(row.get("package") or ""),
            )
        self._members, self._where = {}, {}
        for c in self.clients.values():
            self._place(c)
        self.sessions = {}
        for row in snap.get("sessions") or []:
            self.sessions[row["id"]] = SessionRow(row["id"], row["status"], row.get("reason"), row.get("config") or {}, row.get("created"), row.get("finished"))
        self.rounds, self.validation, self.training = {}, {}, {}
        session = snap.get("session")
        self.session_id = session["id"] if isinstance(session, dict) else None
        if isinstance(session, dict):
            self.sessions[session["id"]] = SessionRow(
                session["id"], session["status"], session.get("reason"), session.get("config") or {}, session.get("created"), session.get("finished")
            )
            for r in session.get("rounds") or []:
                self.rounds[int(r["idx"])] = RoundRow(
                    int(r["idx"]), str(r["status"]), r.get("reason"), r.get("started"), r.get("duration_s"), len(r.get("participants") or []),
                    expected=len(r.get("participants") or []), received=len(r.get("participants") or []) if r["status"] == "succeeded" else 0,
                    model_id=r.get("model_id"), validation={k: v for k, v in (r.get("validation") or {}).items() if _num(v) is not None},
                )
            for rep in snap.get("reports") or []:
                self._report(rep["kind"], int(rep["round_index"]), rep["client"], rep.get("error"), rep.get("values") or {}, rep.get("step"))
        running = snap.get("round")
        if isinstance(running, dict) and running.get("session_id") == self.session_id:
            r = self.rounds.setdefault(int(running["round_index"]), RoundRow(int(running["round_index"])))
            for key in ("expected", "received", "refused", "bytes_in", "bytes_out", "deadline"):
                setattr(r, key, running.get(key) or 0)
        self.models = {}
        for row in snap.get("models") or []:
            self.models[row["id"]] = ModelRow(
                row["id"], row.get("parent"), row.get("session_id"), row.get("round_index"), row.get("aggregator"),
                row.get("contributors") or [], int(row.get("size") or 0), row.get("created"),
            )
        self.loaded = True
        return Changes(everything=True)

    # -- events -----------------------------------------------------------------------------

    def say(self, level: str, text: str, when: float | None = None) -> None:
        self.log.append(LogLine(when or time.time(), level, text))

    def apply(self, ev: m.FedEvent) -> Changes:
        ch = Changes()
        when = ev.time or time.time()
        if isinstance(ev, m.ClientJoined):
            c = self.clients.setdefault(ev.client, ClientRow(ev.client))
            c.status, c.combiner, c.last_seen = "online", ev.combiner, when
            c.package = ev.package or c.package
            self._place(c)
            ch.clients.add(ev.client)
            ch.log = True
            self.say("info", f"client {ev.client} joined on combiner {ev.combiner}", when)
            self._recount(ev.combiner, ch)
        elif isinstance(ev, m.ClientLeft):
            c = self.clients.setdefault(ev.client, ClientRow(ev.client))
            if c.combiner == ev.combiner:
                c.status, c.last_seen = "offline", when
                self._place(c)
            ch.clients.add(ev.client)
            ch.log = True
            self.say("warning", f"client {ev.client} left combiner {ev.combiner}", when)
            self._recount(ev.combiner, ch)
        elif isinstance(ev, m.CombinerJoined):
            row = self.combiners.setdefault(ev.combiner, CombinerRow(ev.combiner))
            row.status, row.url = "online", ev.url
            ch.combiners = ch.log = True
            self.say("info", f"combiner {ev.combiner} is up at {ev.url}", when)
        elif isinstance(ev, m.CombinerLeft):
            row = self.combiners.setdefault(ev.combiner, CombinerRow(ev.combiner))
            row.status, row.clients = "offline", 0
            for name in list(self._members.pop(ev.combiner, ())):
                c = self.clients[name]
                c.status, c.last_seen = "offline", when
                self._where.pop(name, None)
                ch.clients.add(name)
            ch.combiners = ch.log = True
            self.say("error", f"combiner {ev.combiner} disconnected ({ev.clients} clients were on it)", when)
        elif isinstance(ev, m.SessionStarted):
            self.sessions[ev.session_id] = SessionRow(ev.session_id, "running", None, dict(ev.config), when)
            self.session_id = ev.session_id
            self.rounds, self.validation, self.training = {}, {}, {}
            ch.session = ch.metrics = ch.log = True
            self.say("info", f"session {ev.session_id} started: {ev.config.get('rounds')} rounds, {ev.config.get('aggregator', 'fedavg')}", when)
        elif isinstance(ev, m.SessionEnded):
            s = self.sessions.setdefault(ev.session_id, SessionRow(ev.session_id))
            s.status, s.reason, s.finished = ev.status, ev.reason, when
            ch.session = ch.log = True
            self.say("info" if ev.status == "finished" else "error", f"session {ev.session_id} {ev.status}" + (f": {ev.reason}" if ev.reason else ""), when)
        elif isinstance(ev, m.RoundStarted):
            if ev.session_id == self.session_id:
                r = self.rounds.setdefault(ev.round_index, RoundRow(ev.round_index))
                r.status, r.started, r.expected, r.deadline = "running", when, ev.expected, ev.deadline
                r.bytes_out = ev.model_bytes * ev.expected
                ch.session = True
            ch.log = True
            self.say("info", f"round {ev.round_index} started: {ev.expected} clients, timeout {ev.timeout:g}s", when)
        elif isinstance(ev, m.RoundProgress):
            if ev.session_id == self.session_id:
                r = self.rounds.setdefault(ev.round_index, RoundRow(ev.round_index))
                r.received, r.refused, r.expected = ev.received, ev.refused, ev.expected
                r.bytes_in, r.bytes_out, r.deadline = ev.bytes_in, ev.bytes_out, ev.deadline or r.deadline
                ch.session = True
        elif isinstance(ev, m.RoundEnded):
            if ev.session_id == self.session_id:
                r = self.rounds.setdefault(ev.round_index, RoundRow(ev.round_index))
                r.status, r.reason, r.duration_s, r.participants = ev.status, ev.reason, ev.duration_s, ev.participants
                r.model_id = ev.model_id
                r.validation = {k: float(v) for k, v in ev.validation.items() if _num(v) is not None}
                if ev.status == "succeeded":
                    r.received = max(r.received, ev.participants)
                ch.session = ch.metrics = True
            ch.log = True
            text = f"round {ev.round_index} {ev.status} in {ev.duration_s or 0:.1f}s, {ev.participants} updates"
            self.say("info" if ev.status == "succeeded" else "error", text + (f": {ev.reason}" if ev.reason else ""), when)
        elif isinstance(ev, m.ClientReported):
            if ev.session_id == self.session_id:
                self._report(ev.task, ev.round_index, ev.client, ev.error, ev.values, None)
                ch.session = ch.metrics = True
            known = self.clients.get(ev.client)
            if known is not None:  # SEEN is the client's last activity, not when it connected
                known.last_seen = max(known.last_seen or 0.0, when)
                ch.clients.add(ev.client)
            if known is not None and ev.task == "train" and not ev.error:
                known.last_round = (ev.session_id, ev.round_index)
            if ev.error:
                ch.log = True
                self.say("warning", f"client {ev.client}: round {ev.round_index} {ev.task} refused: {' '.join(ev.error.split())[:300]}", when)
        elif isinstance(ev, m.MetricLogged):
            known = self.clients.get(ev.client)
            if known is not None:
                known.last_seen = max(known.last_seen or 0.0, when)
                ch.clients.add(ev.client)
            if ev.session_id == self.session_id:
                self._report("metric", ev.round_index, ev.client, None, ev.values, ev.step)
                ch.metrics = True
        elif isinstance(ev, m.ModelCommitted):
            self.models[ev.model_id] = ModelRow(ev.model_id, ev.parent, ev.session_id, ev.round_index, ev.aggregator, ev.contributors, ev.size, when)
            self.active_model = ev.model_id
            ch.models = ch.log = ch.header = True
            self.say("info", f"model {ev.model_id[:12]} committed" + (f" by round {ev.round_index} ({ev.contributors} contributors)" if ev.round_index else f" ({ev.aggregator})"), when)
        elif isinstance(ev, m.ActiveChanged):
            if ev.what == "package":
                self.active_package = (ev.id, ev.name)
            else:
                self.active_model = ev.id
            ch.session = ch.log = ch.header = True
            self.say("info", f"active {ev.what} is now {ev.name or ev.id[:12]} ({ev.id[:12]})", when)
        return ch

    def _recount(self, combiner: str, ch: Changes) -> None:
        """Keep the combiners' client counts (O(1) per event: a fleet joins one by one)."""
        for name in {combiner, *(n for n, members in self._members.items() if members)}:
            row = self.combiners.setdefault(name, CombinerRow(name, "online"))
            row.clients = len(self._members.get(name, ()))
        ch.combiners = True

    def _place(self, client: ClientRow) -> None:
        """Move ``client`` to its combiner's members when online, out of every other."""
        old = self._where.pop(client.name, None)
        if old is not None:
            self._members.get(old, set()).discard(client.name)
        if client.status == "online" and client.combiner:
            self._members.setdefault(client.combiner, set()).add(client.name)
            self._where[client.name] = client.combiner

    def _report(self, kind: str, index: int, client: str, error: str | None, values: dict[str, Any], step: Any) -> None:
        if kind == "metric":
            s = step if isinstance(step, int) else 0
            for key, value in values.items():
                if _num(value) is not None:
                    self.training.setdefault(key, {})[(index, s, client)] = float(value)
            return
        r = self.rounds.setdefault(index, RoundRow(index))
        if error:
            r.failures[client] = error if error.startswith(kind) else f"{kind}: {error}"
            return
        if kind == "validate":
            for key, value in values.items():
                if _num(value) is not None:
                    self.validation.setdefault(key, {}).setdefault(index, {})[client] = float(value)

    # -- what widgets ask ----------------------------------------------------------------------

    @property
    def session(self) -> SessionRow | None:
        return self.sessions.get(self.session_id) if self.session_id else None

    @property
    def running_round(self) -> RoundRow | None:
        s = self.session
        if s is None or s.status != "running":
            return None
        running = [r for r in self.rounds.values() if r.status == "running"]
        return max(running, key=lambda r: r.index) if running else None

    def metric_names(self) -> list[str]:
        """Plot choices: ``validation:NAME`` and ``training:NAME``."""
        return [f"validation:{k}" for k in sorted(self.validation)] + [f"training:{k}" for k in sorted(self.training)]

    def series(self, metric: str, per_client: bool = False, max_clients: int = 6) -> tuple[list[tuple[float, Spread]], dict[str, list[tuple[float, float]]]]:
        """(aggregate points x -> spread across clients, per-client lines) of ``metric``.

        Validation metrics are by round; training metrics by step within each round
        (x = round - 1 + step / steps of that round, so rounds line up)."""
        source, _, name = metric.partition(":")
        points: list[tuple[float, Spread]] = []
        lines: dict[str, list[tuple[float, float]]] = {}
        if source == "validation":
            for index, by_client in sorted(self.validation.get(name, {}).items()):
                s = spread([{name: v} for v in by_client.values()]).get(name)
                if s is not None:
                    points.append((float(index), s))
                if per_client:
                    for client, v in by_client.items():
                        lines.setdefault(client, []).append((float(index), v))
        elif source == "training":
            data = self.training.get(name, {})
            steps: dict[int, int] = {}
            for index, step, _ in data:
                steps[index] = max(steps.get(index, 0), step + 1)
            grouped: dict[float, list[float]] = {}
            for (index, step, client), v in data.items():
                x = index - 1 + step / max(1, steps[index])
                grouped.setdefault(x, []).append(v)
                if per_client:
                    lines.setdefault(client, []).append((x, v))
            for x in sorted(grouped):
                s = spread([{name: v} for v in grouped[x]]).get(name)
                if s is not None:
                    points.append((x, s))
        if per_client:
            chosen = sorted(lines)[:max_clients]
            lines = {c: sorted(lines[c]) for c in chosen}
        return points, lines
