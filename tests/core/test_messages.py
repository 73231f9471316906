from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

import pytest

from scaleout.core import messages as m
from scaleout.core.errors import ProtocolError

CLASSES = sorted(m._REGISTRY.values(), key=lambda cls: cls.type)


def _hints(cls: type[m.Message]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_none(hint: Any) -> Any:
    if _is_optional(hint):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def _valid(name: str, hint: Any) -> Any:
    hint = _strip_none(hint)
    if hint is bool:
        return True
    if hint is int:
        return 3
    if hint is float:
        return 2.5
    if hint is str:
        return f"{name}-värde"  # non-ASCII survives the round trip
    if typing.get_origin(hint) is list:
        return ["a", "b"]
    if typing.get_origin(hint) is dict:
        return {"n": 1, "x": 0.5, "nested": {"k": [1, None, "s"]}}
    raise AssertionError(f"no sample for {hint!r}")


def _wrong(hint: Any) -> Any:
    """A value of another JSON type than ``hint`` allows (never null)."""
    hint = _strip_none(hint)
    if hint is bool:
        return 1
    if hint in (int, float):
        return "3"
    if hint is str:
        return 5
    if typing.get_origin(hint) is list:
        return "a"
    if typing.get_origin(hint) is dict:
        return ["k"]
    raise AssertionError(f"no wrong value for {hint!r}")


def _sample(cls: type[m.Message]) -> m.Message:
    return cls(**{name: _valid(name, hint) for name, hint in _hints(cls).items()})


def _body(cls: type[m.Message], **changes: Any) -> dict[str, Any]:
    body = json.loads(m.serialize(_sample(cls)))
    body.update(changes)
    return body


def _parse_error(body: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        m.parse(body if isinstance(body, (str, bytes)) else json.dumps(body))
    return str(info.value)


def _id(value: Any) -> str | None:
    if isinstance(value, type) and issubclass(value, m.Message):
        return value.type
    return value if isinstance(value, str) else None


FIELDS = [(cls, name, hint) for cls in CLASSES for name, hint in _hints(cls).items()]
REQUIRED = [(cls, f.name) for cls in CLASSES for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
OPTIONAL = [(cls, name) for cls, name, hint in FIELDS if _is_optional(hint)]


def test_registry_covers_the_schema() -> None:
    assert {cls.type for cls in CLASSES} >= {
        "request", "reply", "blob", "error", "event", "clients.changed", "round.start", "round.partial",
        "round.validate", "round.validated", "session.stop", "report", "hello", "task", "task.result",
        "task.abort", "metric",
    }  # fmt: skip
    assert all(m._REGISTRY[cls.type] is cls for cls in CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=_id)
def test_round_trip(cls: type[m.Message]) -> None:
    msg = _sample(cls)
    text = m.serialize(msg)
    body = json.loads(text)
    assert body["v"] == m.PROTOCOL_VERSION and body["type"] == cls.type
    assert set(body) == {"v", "type"} | {f.name for f in fields(cls)}
    assert m.parse(text) == msg
    assert m.parse(text.encode()) == msg
    assert type(m.parse(text)) is cls


@pytest.mark.parametrize("cls", CLASSES, ids=_id)
def test_defaults_round_trip_and_may_be_omitted(cls: type[m.Message]) -> None:
    required = {name for c, name in REQUIRED if c is cls}
    msg = cls(**{name: _valid(name, hint) for name, hint in _hints(cls).items() if name in required})
    assert m.parse(m.serialize(msg)) == msg
    body = {k: v for k, v in json.loads(m.serialize(msg)).items() if k in required | {"v", "type"}}
    assert m.parse(json.dumps(body)) == msg


@pytest.mark.parametrize("cls, name", OPTIONAL, ids=_id)
def test_optional_fields_accept_null(cls: type[m.Message], name: str) -> None:
    msg = m.parse(json.dumps(_body(cls, **{name: None})))
    assert getattr(msg, name) is None


@pytest.mark.parametrize("cls, name", REQUIRED, ids=_id)
def test_missing_required_field(cls: type[m.Message], name: str) -> None:
    body = _body(cls)
    del body[name]
    assert _parse_error(body) == f"{cls.type}: missing field {name!r}"


@pytest.mark.parametrize("cls, name, hint", FIELDS, ids=_id)
def test_wrong_field_type(cls: type[m.Message], name: str, hint: Any) -> None:
    bad = _wrong(hint)
    message = _parse_error(_body(cls, **{name: bad}))
    assert message == f"{cls.type}: field {name!r} has the wrong type ({type(bad).__name__})"


@pytest.mark.parametrize("cls, name", [(cls, n) for cls, n, h in FIELDS if not _is_optional(h)], ids=_id)
def test_null_refused_for_required_types(cls: type[m.Message], name: str) -> None:
    assert f"field {name!r} has the wrong type (NoneType)" in _parse_error(_body(cls, **{name: None}))


@pytest.mark.parametrize(
    "cls, name, value",
    [
        (m.RoundStart, "round_index", "3"),
        (m.RoundStart, "round_index", True),
        (m.RoundStart, "round_index", 3.0),
        (m.RoundStart, "round_index", 3.5),
        (m.RoundPartial, "count", False),
        (m.Metric, "step", True),
        (m.Metric, "step", 1.0),
        (m.RoundStart, "timeout", True),
        (m.RoundStart, "timeout", "1.5"),
        (m.Reply, "ok", 1),
        (m.Reply, "ok", "true"),
        (m.ClientsChanged, "joined", "alice"),
        (m.ClientsChanged, "joined", {"alice": 1}),
        (m.ClientsChanged, "left", ["alice", 2]),
        (m.ClientsChanged, "joined", ["alice", None]),
        (m.RoundPartial, "timing", [["nested"]]),
        (m.TaskResult, "size", 1.5),
        (m.Request, "args", ["a"]),
        (m.Request, "args", "a=1"),
        (m.Reply, "error", "boom"),
        (m.Metric, "metrics", 0.5),
        (m.Hello, "id", 7),
    ],
)
def test_specific_wrong_types(cls: type[m.Message], name: str, value: Any) -> None:
    message = _parse_error(_body(cls, **{name: value}))
    assert message.startswith(f"{cls.type}: field {name!r} has the wrong type")


@pytest.mark.parametrize("cls, name", [(m.RoundStart, "timeout"), (m.RoundPartial, "weight"), (m.RoundValidate, "timeout")])
def test_ints_accepted_for_floats(cls: type[m.Message], name: str) -> None:
    msg = m.parse(json.dumps(_body(cls, **{name: 7})))
    value = getattr(msg, name)
    assert value == 7.0 and type(value) is float


def test_unexpected_fields_are_named() -> None:
    message = _parse_error(_body(m.Hello, zeta=1, alpha=2))
    assert message == "hello: unexpected field(s) alpha, zeta"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("{'v': 1}", "not valid JSON"),
        (b'{"v":1,"type":"hello","name":"\xff"}', "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('"hello"', "must be a JSON object"),
        ("1", "must be a JSON object"),
        ("null", "must be a JSON object"),
    ],
)
def test_not_a_json_object(text: str | bytes, expected: str) -> None:
    assert expected in _parse_error(text)


@pytest.mark.parametrize("version", [None, 0, 1, 3, "2", [2], {"v": 2}])
def test_wrong_or_missing_version(version: Any) -> None:
    body = _body(m.Hello)
    if version is None:
        del body["v"]
    else:
        body["v"] = version
    message = _parse_error(body)
    assert f"protocol version {version!r} is not supported" in message
    assert f"speaks {m.PROTOCOL_VERSION}" in message


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_one(version: Any) -> None:
    # True == 1 == 1.0 in Python: a plain ``!=`` comparison would let these through.
    assert "protocol version" in _parse_error(_body(m.Hello, v=version))


@pytest.mark.parametrize("kind", [None, "nope", "", "HELLO", 5, ["hello"], {"t": 1}])
def test_unknown_type(kind: Any) -> None:
    body = _body(m.Hello)
    if kind is None:
        del body["type"]
    else:
        body["type"] = kind
    assert _parse_error(body) == f"unknown message type {kind!r}"


def test_oversize_text_is_refused_before_decoding() -> None:
    message = _parse_error("x" * (m.MAX_TEXT_BYTES + 1))
    assert f"{m.MAX_TEXT_BYTES + 1} bytes" in message and f"limit is {m.MAX_TEXT_BYTES}" in message
    assert "limit" in _parse_error(b"x" * (m.MAX_TEXT_BYTES + 1))


def test_text_at_the_limit_is_accepted() -> None:
    base = len(m.serialize(m.Hello(name="")))
    text = m.serialize(m.Hello(name="n" * (m.MAX_TEXT_BYTES - base)))
    assert len(text) == m.MAX_TEXT_BYTES
    assert m.parse(text) == m.Hello(name="n" * (m.MAX_TEXT_BYTES - base))


def test_size_limit_counts_utf8_bytes_of_str_frames() -> None:
    # Under 1 MiB of characters but over 1 MiB of UTF-8: the limit is on bytes.
    text = '{"v":1,"type":"hello","name":"' + "é" * (m.MAX_TEXT_BYTES // 2 + 8) + '"}'
    assert len(text) <= m.MAX_TEXT_BYTES < len(text.encode())
    assert "limit" in _parse_error(text)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_parse_refuses_non_json_numbers(literal: str) -> None:
    # json.loads accepts these extensions by default; a peer must not smuggle in weight=NaN.
    text = m.serialize(_sample(m.RoundPartial)).replace('"weight":2.5', f'"weight":{literal}')
    assert literal in text
    _parse_error(text)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_serialize_refuses_non_finite_floats(value: float) -> None:
    with pytest.raises(ProtocolError):
        m.serialize(m.RoundPartial(session_id="s", round_index=0, count=1, weight=value))
    with pytest.raises(ProtocolError):
        m.serialize(m.Event(kind="round", data={"loss": value}))


def test_split_chunk() -> None:
    transfer = "0123456789abcdef"
    assert len(transfer) == m.TRANSFER_ID_BYTES
    assert m.split_chunk(transfer.encode() + b"\x00\xffdata") == (transfer, b"\x00\xffdata")
    assert m.split_chunk(transfer.encode()) == (transfer, b"")


@pytest.mark.parametrize(
    "frame, expected",
    [
        (b"", "too short"),
        (b"0123456789abcde", "too short"),
        (b"\xff" * 16 + b"data", "malformed transfer id"),
        ("0123456789abcdé".encode() + b"data", "malformed transfer id"),
    ],
)
def test_split_chunk_refuses_bad_frames(frame: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected):
        m.split_chunk(frame)


@pytest.mark.parametrize("name", ["client-1", "a", "site.17@eu:2", "x" * 128])
def test_check_name_accepts(name: str) -> None:
    assert m.check_name(name, "client name") == name


@pytest.mark.parametrize("name", ["", " a", "a b", "-a", "x" * 129, "a/b", "ä", 5, None, "a\n"])
def test_check_name_refuses(name: object) -> None:
    with pytest.raises(ProtocolError, match="client name"):
        m.check_name(name, "client name")


# -- numbers are bounded wherever they are nested (issue 19 #17) ------------------------------

BIG_INTS = [str(2**63), str(-(2**63) - 1), "1" + "0" * 400, "9" * 5000, "-" + "9" * 5000]


def _request(args_json: str) -> str:
    return '{"v": %d, "type": "request", "id": "1", "op": "metric.ls", "args": %s}' % (m.PROTOCOL_VERSION, args_json)


@pytest.mark.parametrize("literal", BIG_INTS)
def test_integers_beyond_int64_are_refused_in_one_line(literal: str) -> None:
    frames = [
        '{"v": %d, "type": "report", "kind": "train", "session_id": "s", "round_index": %s, "client": "c"}' % (m.PROTOCOL_VERSION, literal),
        '{"v": %d, "type": "blob", "transfer": "t", "size": %s, "sha256": "x"}' % (m.PROTOCOL_VERSION, literal),
        _request('{"limit": %s}' % literal),
        _request('{"deep": [{"x": {"y": [%s]}}]}' % literal),  # nested in args
        '{"v": %d, "type": "metric", "task_id": "t", "metrics": {"a": 1}, "step": %s}' % (m.PROTOCOL_VERSION, literal),
    ]
    for frame in frames:
        with pytest.raises(ProtocolError) as info:
            m.parse(frame)
        text = str(info.value)
        assert "outside the signed 64-bit range" in text, text
        assert "\n" not in text and len(text) < 200, text  # one line, not 5000 digits


@pytest.mark.parametrize("literal", ["1e309", "-1e309", "1" + "0" * 400 + ".0", "1.5e99999"])
def test_floats_beyond_the_float_range_are_refused(literal: str) -> None:
    for frame in (
        '{"v": %d, "type": "metric", "task_id": "t", "metrics": {"loss": %s}}' % (m.PROTOCOL_VERSION, literal),
        '{"v": %d, "type": "round.start", "session_id": "s", "round_index": 1, "model_id": "m", "count": 1, "timeout": %s}' % (m.PROTOCOL_VERSION, literal),
        _request('{"data": {"values": [1, 2, %s]}}' % literal),
    ):
        with pytest.raises(ProtocolError, match="beyond the float range: use finite numbers only"):
            m.parse(frame)


def test_numbers_at_the_bounds_are_accepted() -> None:
    top, bottom = 2**63 - 1, -(2**63)
    msg = m.parse(_request('{"a": %d, "b": %d, "c": 1.7976931348623157e308, "d": -0.0, "e": 5e-324, "f": 0}' % (top, bottom)))
    assert isinstance(msg, m.Request)
    assert msg.args["a"] == top and msg.args["b"] == bottom
    assert msg.args["c"] == 1.7976931348623157e308 and msg.args["e"] == 5e-324 and msg.args["f"] == 0
    report = m.parse('{"v": %d, "type": "report", "kind": "train", "session_id": "s", "round_index": %d, "client": "c"}' % (m.PROTOCOL_VERSION, top))
    assert isinstance(report, m.Report) and report.round_index == top


def test_loads_bounds_any_json_a_peer_sends() -> None:
    assert m.loads('{"names": ["a", "b"], "n": 3}', "name list") == {"names": ["a", "b"], "n": 3}
    with pytest.raises(ProtocolError, match="^name list holds the integer"):
        m.loads("[" + "9" * 30 + "]", "name list")
    with pytest.raises(ProtocolError, match="^name list is not valid JSON"):
        m.loads("[NaN]", "name list")


def test_a_refused_request_names_its_id_so_its_sender_is_answered() -> None:
    with pytest.raises(ProtocolError) as info:
        m.parse(_request('{"limit": %s}' % ("9" * 5000)))
    assert info.value.re == "1"
    with pytest.raises(ProtocolError) as info:
        m.parse('{"v": %d, "type": "request", "id": "7", "op": 3}' % m.PROTOCOL_VERSION)
    assert info.value.re == "7"
    for frame in ('{"v": %d, "type": "metric", "id": "8", "task_id": "t", "metrics": {"a": 1e999}}' % m.PROTOCOL_VERSION, "{not json"):
        with pytest.raises(ProtocolError) as info:
            m.parse(frame)
        assert info.value.re is None  # not a request: nobody waits for a reply
