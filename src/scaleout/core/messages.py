"""The wire schema: typed messages, one parse/serialize pair, protocol version.

Every text frame is a JSON object ``{"v": 1, "type": ..., "id": ..., **fields}``. Binary
frames carry payload chunks: 16 ASCII bytes of transfer id, then the chunk. A message that
refers to a payload names its transfer in ``blob``; the payload is always sent before the
message, so a receiver has the bytes (sha256-checked) when the message arrives.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from scaleout.core.errors import ProtocolError

PROTOCOL_VERSION = 2
MAX_NAMES = 2000  # names per message in lists that grow with the fleet
MAX_INLINE_RESULT = 256 << 10  # a reply's result larger than this travels as its payload
CLOSE_SUPERSEDED = 4001  # close code: a newer connection registered under the same name
CLOSE_REVOKED = 4003  # close code: the link's token or node identity was revoked, or grants not what it asked
MAX_TEXT_BYTES = 1 << 20
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
class ClientsChanged(Message):
    """Combiner -> controller: clients that connected (``joined``) and left since the last
    one. Deltas, so each costs O(1) per client; ``reset`` (after registering) starts a full
    listing, sent in pages of at most MAX_NAMES names like every other one."""

    type: ClassVar[str] = "clients.changed"
    joined: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    reset: bool = False


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
    blob: str | None = None


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
    """Decode and validate one text frame; raises ProtocolError saying what is wrong."""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > MAX_TEXT_BYTES:
        raise ProtocolError(f"message is {size} bytes; the limit is {MAX_TEXT_BYTES}")
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("message is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ProtocolError("message must be a JSON object")
    version = body.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported; this node speaks {PROTOCOL_VERSION}")
    kind = body.pop("type", None)
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = set(body) - set(known)
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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check(kind: str, name: str, value: Any, hint: Any) -> Any:
    """Validate ``value`` against a (simple) type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
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
        (item,) = typing.get_args(hint) or (Any,)
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
