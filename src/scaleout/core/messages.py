"""The wire schema: typed messages, one parse/serialize pair, protocol version.

Every text frame is a JSON object ``{"v": 1, "type": ..., "id": ..., **fields}``. Binary
frames carry payload chunks: 16 ASCII bytes of transfer id, then the chunk. A message that
refers to a payload names its transfer in ``blob``; the payload is always sent before the
message, so a receiver has the bytes (sha256-checked) when the message arrives.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from scaleout.core.errors import ProtocolError

PROTOCOL_VERSION = 2
MAX_NAMES = 2000  # names per message in lists that grow with the fleet
MAX_PROOFS = 1000  # clients joined per clients.changed (each with its ticket: about 400 bytes)
MAX_INLINE_RESULT = 256 << 10  # a reply's result larger than this travels as its payload
CLOSE_SUPERSEDED = 4001  # close code: a newer connection registered under the same name
CLOSE_REVOKED = 4003  # close code: the link's token or node identity was revoked, or grants not what it asked
MAX_TEXT_BYTES = 1 << 20
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1  # every integer a message carries fits a signed 64-bit one (SQLite's)
TRANSFER_ID_BYTES = 16
JSON = dict[str, Any]


@dataclass(kw_only=True)
class Message:
    """Base of all messages. ``id`` is unique per sender; replies name it in ``re``."""

    type: ClassVar[str] = ""
    id: str = ""


_REGISTRY: dict[str, type[Message]] = {}


def message(cls: type[Message]) -> type[Message]:
    """Register a message class under its ``type``."""
    assert cls.type and cls.type not in _REGISTRY, cls
    _REGISTRY[cls.type] = cls
    return cls


# -- generic request / reply ------------------------------------------------------------


@message
@dataclass(kw_only=True)
class Request(Message):
    """An operation on the peer, e.g. ``session.start``; answered by one Reply."""

    type: ClassVar[str] = "request"
    op: str
    args: JSON = field(default_factory=dict)
    blob: str | None = None


@message
@dataclass(kw_only=True)
class Reply(Message):
    type: ClassVar[str] = "reply"
    re: str
    ok: bool
    result: JSON = field(default_factory=dict)
    error: JSON | None = None  # {"code": ..., "message": ...}
    blob: str | None = None
    result_blob: bool = False  # the result was too large for a frame: it is the payload, as JSON


@message
@dataclass(kw_only=True)
class BlobStart(Message):
    """Announces a payload: its binary chunks follow, tagged with ``transfer``."""

    type: ClassVar[str] = "blob"
    transfer: str
    size: int
    sha256: str


@message
@dataclass(kw_only=True)
class BlobAbort(Message):
    """The sender of payload ``transfer`` will not finish it (a combiner relaying a model as it
    arrives, whose download failed or did not match its digest): drop what arrived of it.
    A peer that predates it answers with an error and drops the rest when its link closes."""

    type: ClassVar[str] = "blob.abort"
    transfer: str
    reason: str = ""


@message
@dataclass(kw_only=True)
class Error(Message):
    """A complaint about a message that could not be handled (no request to reply to)."""

    type: ClassVar[str] = "error"
    code: str
    message: str
    re: str | None = None


@message
@dataclass(kw_only=True)
class Event(Message):
    """Something happened on the controller (round ended, session finished, ...)."""

    type: ClassVar[str] = "event"
    kind: str
    data: JSON = field(default_factory=dict)


# -- controller <-> combiner -------------------------------------------------------------


@message
@dataclass(kw_only=True)
class Revoked(Message):
    """Controller -> combiner: tokens or node identities (by id) revoked; links holding
    them are closed and they are refused from now on."""

    type: ClassVar[str] = "revoked"
    ids: list[str] = field(default_factory=list)
    reason: str = ""


@message
@dataclass(kw_only=True)
class ControllersChanged(Message):
    """Controller -> combiners -> clients: the addresses of every controller on its store
    (the active one first), sent when one appears: nodes add them to the addresses they dial,
    so they follow a standby started after they did (transport/dialer.py Controllers.add)."""

    type: ClassVar[str] = "controllers"
    urls: list[str] = field(default_factory=list)


@message
@dataclass(kw_only=True)
class ClientsChanged(Message):
    """Combiner -> controller: clients that connected (``joined``) and left since the last
    one. Deltas, so each costs O(1) per client; ``reset`` (after registering) starts a full
    listing, sent in pages of at most MAX_PROOFS names. ``proofs[i]`` is the ticket
    ``joined[i]`` connected with (the controller issued it for that client and this combiner):
    a client counts as attached only with it."""

    type: ClassVar[str] = "clients.changed"
    joined: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    reset: bool = False
    proofs: list[str] = field(default_factory=list)


@message
@dataclass(kw_only=True)
class RoundStart(Message):
    """Controller -> combiner: train ``count`` clients on ``model_id`` until ``timeout``
    seconds. Their names travel as a JSON list in the payload ``blob`` (a list that grows
    with the fleet never rides in one capped frame)."""

    type: ClassVar[str] = "round.start"
    session_id: str
    round_index: int
    model_id: str
    count: int
    timeout: float
    settings: JSON = field(default_factory=dict)
    aggregator: str = "fedavg"
    max_examples: int = 1_000_000  # a client's weight is clipped to this (0: no cap)
    max_update_norm: float = 10.0  # a change beyond this multiple of the model's norm is refused (0: off)
    blob: str | None = None
    attempt: int = 1  # a round run again after a controller restart keeps its index: its partial names the try
    forward_updates: bool = False  # the round's strategy sees each update (server functions' aggregate, median...): forward, do not fold


@message
@dataclass(kw_only=True)
class RoundPartial(Message):
    """Combiner -> controller: its share of a round is ready. The controller pulls the
    ``size`` bytes of the partial aggregate (which name its contributors) with a
    ``partial.get`` request when it can fold them; ``timing`` splits the combiner's time
    (distribute_s, train_s, collect_s)."""

    type: ClassVar[str] = "round.partial"
    session_id: str
    round_index: int
    count: int
    weight: float
    size: int = 0
    timing: JSON = field(default_factory=dict)
    attempt: int = 1  # the try of round_index it belongs to (RoundStart.attempt)


@message
@dataclass(kw_only=True)
class RoundUpdate(Message):
    """Combiner -> controller, in a round whose strategy needs each update on its own
    (``needs_updates``): ``client``'s update, checked as a fold would check it, is ready
    (``size`` bytes, in the model's dtypes). The controller pulls it with an ``update.get``
    request and spills it to disk; the combiner's RoundPartial (its count and weight, no
    bytes) comes after its last update."""

    type: ClassVar[str] = "round.update"
    session_id: str
    round_index: int
    client: str
    num_examples: int
    size: int
    metadata: JSON = field(default_factory=dict)  # what the client's train callback returned
    attempt: int = 1


@message
@dataclass(kw_only=True)
class RoundValidate(Message):
    """Controller -> combiner: have ``count`` clients (named in the payload, as for
    RoundStart) validate ``model_id``."""

    type: ClassVar[str] = "round.validate"
    session_id: str
    round_index: int
    model_id: str
    count: int
    timeout: float
    blob: str | None = None


@message
@dataclass(kw_only=True)
class ValidateDone(Message):
    """Combiner -> controller: every validation of this round is in (or timed out)."""

    type: ClassVar[str] = "round.validated"
    session_id: str
    round_index: int


@message
@dataclass(kw_only=True)
class SessionStop(Message):
    type: ClassVar[str] = "session.stop"
    session_id: str


@message
@dataclass(kw_only=True)
class Report(Message):
    """Combiner -> controller: one client's train result, validation or logged metric.

    ``kind`` is ``train``, ``validate`` or ``metric``; ``error`` is set when the client's
    work was refused or failed, and says why in words.
    """

    type: ClassVar[str] = "report"
    kind: str
    session_id: str
    round_index: int
    client: str
    data: JSON = field(default_factory=dict)
    error: str | None = None


@message
@dataclass(kw_only=True)
class Reports(Message):
    """Combiner -> controller: its clients' outcomes of one round (``kind`` train or
    validate), sent once as its share of the round ends (in pages of at most MAX_NAMES
    entries within a frame), so the messages a round brings the controller grow with the
    combiners, not the clients. Each entry is ``{"client", "data", "error"}``, as in Report;
    ``done`` and ``failed`` count the entries without and with an error, over all pages."""

    type: ClassVar[str] = "reports"
    kind: str
    session_id: str
    round_index: int
    entries: list[Any] = field(default_factory=list)  # objects, checked by the receiver
    done: int = 0
    failed: int = 0


# -- combiner <-> client ------------------------------------------------------------------


@message
@dataclass(kw_only=True)
class Hello(Message):
    """Client -> combiner: first message on the link."""

    type: ClassVar[str] = "hello"
    name: str
    task_id: str | None = None  # the task a reconnecting client is still working on


@message
@dataclass(kw_only=True)
class Task(Message):
    """Combiner -> client: ``kind`` is ``train`` or ``validate``; the model is in ``blob``."""

    type: ClassVar[str] = "task"
    task_id: str
    kind: str
    session_id: str
    round_index: int
    model_id: str
    settings: JSON = field(default_factory=dict)
    blob: str | None = None


@message
@dataclass(kw_only=True)
class TaskResult(Message):
    """Client -> combiner: outcome of a task. A train update stays with the client, which
    says its ``size``; the combiner pulls it (``update.get``) when it has room to fold it,
    so a combiner never holds more updates than it chose to."""

    type: ClassVar[str] = "task.result"
    task_id: str
    ok: bool
    data: JSON = field(default_factory=dict)
    error: str | None = None
    size: int | None = None


@message
@dataclass(kw_only=True)
class TaskAbort(Message):
    """Combiner -> client: stop work for a session, or only the task ``task_id``."""

    type: ClassVar[str] = "task.abort"
    session_id: str
    task_id: str | None = None
    reason: str | None = None  # why, when it is not the obvious one (the session stopped, the task is late)


@message
@dataclass(kw_only=True)
class Metric(Message):
    """Client -> combiner: a metric the train callback logged with ``log_metric``."""

    type: ClassVar[str] = "metric"
    task_id: str
    metrics: JSON
    step: int | None = None


# -- admin event stream -------------------------------------------------------------------


@message
@dataclass(kw_only=True)
class Subscribe(Message):
    """Admin -> controller: push this link the typed event stream (``kinds``: only these
    event kinds; empty: all). The first event is a ``resync``: read the snapshot
    (``events.snapshot``) and apply the events that follow it. A subscriber that falls
    more than ``buffer`` events behind loses them and gets another ``resync``."""

    type: ClassVar[str] = "subscribe"
    kinds: list[str] = field(default_factory=list)
    buffer: int = 4096


@dataclass(kw_only=True)
class FedEvent:
    """Base of the typed events a controller pushes to subscribers, in an ``Event``
    envelope (``kind`` = the class's kind, ``data`` = its fields). ``seq`` numbers them per
    controller run; ``time`` is the controller's wall clock (seconds since the epoch)."""

    kind: ClassVar[str] = ""
    seq: int = 0
    time: float = 0.0


_EVENTS: dict[str, type[FedEvent]] = {}


def fed_event(cls: type[FedEvent]) -> type[FedEvent]:
    assert cls.kind and cls.kind not in _EVENTS, cls
    _EVENTS[cls.kind] = cls
    return cls


@fed_event
@dataclass(kw_only=True)
class Resync(FedEvent):
    """Events were dropped (or the subscription just began): re-read the snapshot."""

    kind: ClassVar[str] = "resync"
    reason: str = ""
    dropped: int = 0


@fed_event
@dataclass(kw_only=True)
class ClientJoined(FedEvent):
    kind: ClassVar[str] = "client.joined"
    client: str
    combiner: str
    package: str = ""  # the package it runs, as it said: "NAME (ID)" or "local DIR"


@fed_event
@dataclass(kw_only=True)
class ClientLeft(FedEvent):
    kind: ClassVar[str] = "client.left"
    client: str
    combiner: str


@fed_event
@dataclass(kw_only=True)
class CombinerJoined(FedEvent):
    kind: ClassVar[str] = "combiner.joined"
    combiner: str
    url: str = ""


@fed_event
@dataclass(kw_only=True)
class CombinerLeft(FedEvent):
    kind: ClassVar[str] = "combiner.left"
    combiner: str
    clients: int = 0  # clients it had: they are gone with it


@fed_event
@dataclass(kw_only=True)
class SessionStarted(FedEvent):
    kind: ClassVar[str] = "session.started"
    session_id: str
    config: JSON = field(default_factory=dict)


@fed_event
@dataclass(kw_only=True)
class SessionEnded(FedEvent):
    kind: ClassVar[str] = "session.ended"
    session_id: str
    status: str
    reason: str | None = None


@fed_event
@dataclass(kw_only=True)
class RoundStarted(FedEvent):
    kind: ClassVar[str] = "round.started"
    session_id: str
    round_index: int
    expected: int  # clients asked to train
    timeout: float
    deadline: float  # wall clock: the round times out then
    model_bytes: int = 0


@fed_event
@dataclass(kw_only=True)
class RoundProgress(FedEvent):
    """Where the running round is: updates in and refused of those expected; bytes of
    updates in and of the model out to the clients asked (an update is the model's size)."""

    kind: ClassVar[str] = "round.progress"
    session_id: str
    round_index: int
    received: int
    refused: int
    expected: int
    bytes_in: int = 0
    bytes_out: int = 0
    deadline: float = 0.0


@fed_event
@dataclass(kw_only=True)
class RoundEnded(FedEvent):
    kind: ClassVar[str] = "round.ended"
    session_id: str
    round_index: int
    status: str
    reason: str | None = None
    duration_s: float | None = None
    participants: int = 0
    model_id: str | None = None
    validation: JSON = field(default_factory=dict)


@fed_event
@dataclass(kw_only=True)
class ClientReported(FedEvent):
    """One client's train or validate outcome; ``error`` says why it was refused or failed;
    ``values``: its numeric results (validation metrics, training metadata)."""

    kind: ClassVar[str] = "client.reported"
    session_id: str
    round_index: int
    client: str
    task: str  # train or validate
    error: str | None = None
    values: JSON = field(default_factory=dict)


@fed_event
@dataclass(kw_only=True)
class MetricLogged(FedEvent):
    """A metric a client logged with ``log_metric`` while training."""

    kind: ClassVar[str] = "metric.logged"
    session_id: str
    round_index: int
    client: str
    step: int | None = None
    values: JSON = field(default_factory=dict)


@fed_event
@dataclass(kw_only=True)
class ModelCommitted(FedEvent):
    kind: ClassVar[str] = "model.committed"
    model_id: str
    parent: str | None = None
    session_id: str | None = None
    round_index: int | None = None
    aggregator: str | None = None
    contributors: int = 0
    size: int = 0


@fed_event
@dataclass(kw_only=True)
class ActiveChanged(FedEvent):
    """The active package or seed model was set by an admin."""

    kind: ClassVar[str] = "active.changed"
    what: str  # package or model
    id: str
    name: str = ""


EVENT_KINDS = frozenset(_EVENTS)


def encode_event(ev: FedEvent) -> Event:
    """A typed event in its wire envelope."""
    return Event(kind=ev.kind, data={f.name: getattr(ev, f.name) for f in fields(ev)})


def decode_event(msg: Event) -> FedEvent:
    """The typed event an ``Event`` carries; raises ProtocolError saying what is wrong
    (an unknown kind too: a subscriber skips what it does not know)."""
    cls = _EVENTS.get(msg.kind)
    if cls is None:
        raise ProtocolError(f"unknown event kind {msg.kind!r:.60}")
    what = f"event {msg.kind}"
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: JSON = {}
    for name, f in known.items():
        if name not in msg.data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProtocolError(f"{what}: missing field {name!r}")
            continue
        values[name] = _check(what, name, msg.data[name], hints[name])
    return cls(**values)


def numeric_values(data: Any) -> dict[str, float]:
    """The finite numbers of a flat JSON object (what a plot can show), nested
    ``training_metadata`` and ``metadata`` objects flattened in."""
    out: dict[str, float] = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        if isinstance(value, dict) and key in ("metadata", "training_metadata"):
            out.update(numeric_values(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                continue
            if number == number and abs(number) != float("inf"):
                out[str(key)] = number
    return out


# -- commands, predictions, client logs and package updates (issue 9) --------------------


@message
@dataclass(kw_only=True)
class CommandStart(Message):
    """Controller -> combiner: run job ``job_id`` on ``count`` of its clients (their names
    in the payload ``blob``, as for RoundStart). ``kind`` is ``command`` (the custom
    callback ``name``) or ``predict`` (the predict callback on model ``model_id``)."""

    type: ClassVar[str] = "command.start"
    job_id: str
    kind: str
    name: str = ""
    params: JSON = field(default_factory=dict)
    model_id: str | None = None
    count: int
    timeout: float
    blob: str | None = None


@message
@dataclass(kw_only=True)
class CommandTask(Message):
    """Combiner -> client: call a custom or predict callback; a predict's model is in ``blob``.
    The client gives the callback ``timeout`` seconds."""

    type: ClassVar[str] = "command.task"
    job_id: str
    kind: str
    name: str = ""
    params: JSON = field(default_factory=dict)
    model_id: str | None = None
    timeout: float
    blob: str | None = None


@message
@dataclass(kw_only=True)
class CommandResult(Message):
    """Client -> combiner -> controller: one client's outcome of job ``job_id``. ``code``
    says what went wrong when ``ok`` is false (``raised``, ``timeout``, ``not_json``,
    ``no_such_command``, ...); ``client`` is filled in by the combiner."""

    type: ClassVar[str] = "command.result"
    job_id: str
    ok: bool
    data: JSON = field(default_factory=dict)
    error: str | None = None
    code: str | None = None
    duration_s: float | None = None
    client: str | None = None


@message
@dataclass(kw_only=True)
class ClientLog(Message):
    """Client -> combiner -> controller: what the package logged outside a task's metrics:
    ``kind`` is ``attributes`` (a dict merged into the client's record) or ``telemetry``
    (``data`` = {"key": ..., "payload": {...}}); ``client`` is filled in by the combiner."""

    type: ClassVar[str] = "client.log"
    kind: str
    data: JSON = field(default_factory=dict)
    client: str | None = None


@message
@dataclass(kw_only=True)
class ClientStatus(Message):
    """Client -> combiner -> controller: the compute package this client runs (sha256 of the
    archive, or ``local``), and why it could not load one (it takes no tasks meanwhile)."""

    type: ClassVar[str] = "client.status"
    package: str | None = None
    error: str | None = None
    client: str | None = None


@message
@dataclass(kw_only=True)
class PackageChanged(Message):
    """Controller -> combiners -> clients: a new compute package is active; clients fetch it
    (package.get) before their next task."""

    type: ClassVar[str] = "package.changed"
    package_id: str
    name: str = ""


# -- parse / serialize --------------------------------------------------------------------


_SURROGATE = re.compile("[\ud800-\udfff]")


def to_json(value: Any) -> str:
    """Compact JSON as it travels and is stored: UTF-8 text, not ``\\u`` escapes (which make
    non-ASCII text up to 3x larger). Text holding lone surrogates (valid JSON, not valid
    UTF-8) is escaped instead, so it still round-trips exactly. Raises ValueError for NaN."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    if _SURROGATE.search(text):
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text


def serialize(msg: Message) -> str:
    body: JSON = {"v": PROTOCOL_VERSION, "type": msg.type}
    for f in fields(msg):
        body[f.name] = getattr(msg, f.name)
    try:
        return to_json(body)
    except ValueError as exc:
        raise ProtocolError(f"{msg.type}: cannot send {exc}: use finite numbers only") from None


def parse(text: str | bytes) -> Message:
    """Decode and validate one text frame; raises ProtocolError saying what is wrong, with
    ``re`` set to the frame's id when it is a request whose id can be read (so its sender is
    answered, not left waiting)."""
    try:
        return _parse(text)
    except ProtocolError as exc:
        exc.re = _request_id(text)
        raise


def _request_id(text: str | bytes) -> str | None:
    """The id of a refused request frame, read leniently (any number as 0), or None."""
    try:
        body = json.loads(text, parse_int=lambda _: 0, parse_float=lambda _: 0.0, parse_constant=lambda _: 0)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(body, dict) and body.get("type") == "request" and isinstance(body.get("id"), str):
        return str(body["id"])[:64]
    return None


def _parse(text: str | bytes) -> Message:
    # A character is at most 4 bytes in UTF-8: most frames need no encoding to be measured.
    size = len(text) if not isinstance(text, str) or 4 * len(text) <= MAX_TEXT_BYTES else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ProtocolError(f"message is {size} bytes; the limit is {MAX_TEXT_BYTES}")
    body = loads(text, "message")
    if not isinstance(body, dict):
        raise ProtocolError("message must be a JSON object")
    version = body.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported; this node speaks {PROTOCOL_VERSION}")
    kind = body.pop("type", None)
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    hints = _hints(cls)
    known = _FIELDS.get(cls)
    if known is None:
        known = _FIELDS[cls] = {f.name: f for f in fields(cls)}
    unknown = body.keys() - known.keys()
    if unknown:
        raise ProtocolError(f"{kind}: unexpected field(s) {', '.join(sorted(unknown))}")
    values: JSON = {}
    for name, f in known.items():
        if name not in body:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProtocolError(f"{kind}: missing field {name!r}")
            continue
        values[name] = _check(kind, name, body[name], hints[name])
    return cls(**values)


_HINTS: dict[type, dict[str, Any]] = {}  # a cache of a pure function of the (fixed) classes
_FIELDS: dict[type, dict[str, Any]] = {}  # likewise: a message class's fields by name


def _hints(cls: type) -> dict[str, Any]:
    """A message class's field types, worked out once (get_type_hints is slow: every frame needs them)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def loads(text: str | bytes, what: str = "message") -> Any:
    """JSON as it arrives from a peer, with every number bounded wherever it is nested:
    integers within a signed 64-bit range, floats finite (no NaN, Infinity or 1e309).
    Raises ProtocolError in one line saying what is wrong."""
    try:
        if isinstance(text, str):  # one decoder for all: json.loads would build one per call
            return _DECODER.decode(text)
        return json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)
    except _OutOfRange as exc:
        raise ProtocolError(f"{what} holds {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{what} is not valid JSON: nested too deeply") from None


class _OutOfRange(ValueError):
    """A JSON number that is valid JSON but not one a message may carry."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    # Checked by its length first: converting a 5000-digit integer costs time (and Python refuses it).
    if len(text.lstrip("-")) > 19 or not INT_MIN <= (value := int(text)) <= INT_MAX:
        shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text.lstrip('-'))} digits)"
        raise _OutOfRange(f"the integer {shown}, outside the signed 64-bit range: use numbers within +-9.2e18")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else f"{text[:12]}..."
        raise _OutOfRange(f"the number {shown}, beyond the float range: use finite numbers only")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)


_SHAPES: dict[Any, tuple[Any, tuple[Any, ...]]] = {}  # hint -> (origin, args): a cache of a pure function of the (fixed) hints
_PLAIN = {type(None): lambda v: v is None, Any: lambda v: True, bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}


def _shape(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    shape = _SHAPES.get(hint)
    if shape is None:
        shape = _SHAPES[hint] = (typing.get_origin(hint), typing.get_args(hint))
    return shape


def _check(kind: str, name: str, value: Any, hint: Any) -> Any:
    """Validate ``value`` against a (simple) type hint; ints are accepted for floats."""
    origin, args = _shape(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            plain = _PLAIN.get(option)
            if plain is not None:  # answered without raising: every frame checks its optional fields
                if plain(value):
                    return value
                continue
            try:
                return _check(kind, name, value, option)
            except ProtocolError:
                pass
        raise ProtocolError(f"{kind}: field {name!r} has the wrong type ({type(value).__name__})")
    if hint is type(None):
        ok = value is None
    elif hint is Any:
        ok = True
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list or hint is list:
        ok = isinstance(value, list)
        (item,) = args or (Any,)
        if ok:
            value = [_check(kind, name, v, item) for v in value]
    elif origin is dict or hint is dict:
        ok = isinstance(value, dict)
    else:  # pragma: no cover - schema error, not input error
        raise TypeError(f"unsupported hint {hint!r}")
    if not ok:
        raise ProtocolError(f"{kind}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


def check_name(value: Any, what: str) -> str:
    """A node name: 1-128 letters, digits or ._@:- (names appear in logs, tables and URLs)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ProtocolError(f"{what} must be 1-128 letters, digits or ._@:- (starting with a letter or digit), got {value!r:.60}")
    return value


def split_chunk(frame: bytes) -> tuple[str, bytes]:
    """Split a binary frame into (transfer id, chunk)."""
    if len(frame) < TRANSFER_ID_BYTES:
        raise ProtocolError("binary frame is too short to carry a transfer id")
    try:
        transfer = frame[:TRANSFER_ID_BYTES].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("binary frame has a malformed transfer id") from None
    return transfer, frame[TRANSFER_ID_BYTES:]
