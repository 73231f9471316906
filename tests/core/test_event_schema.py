"""The typed admin event stream's schema: envelope round trips, validation, numbers."""

from __future__ import annotations

import pytest

from scaleout.core import messages as m
from scaleout.core.errors import ProtocolError


def test_every_event_round_trips_through_its_wire_envelope() -> None:
    ev = m.RoundProgress(seq=7, time=1.5, session_id="s-1", round_index=2, received=3, refused=1, expected=5, bytes_in=10, bytes_out=20, deadline=9.0)
    wire = m.parse(m.serialize(m.encode_event(ev)))
    assert isinstance(wire, m.Event) and wire.kind == "round.progress"
    assert m.decode_event(wire) == ev


def test_decode_checks_types_and_required_fields() -> None:
    with pytest.raises(ProtocolError, match="missing field 'client'"):
        m.decode_event(m.Event(kind="client.joined", data={"combiner": "c1"}))
    with pytest.raises(ProtocolError, match="'round_index' has the wrong type"):
        m.decode_event(m.Event(kind="round.ended", data={"session_id": "s", "round_index": "2", "status": "succeeded"}))
    with pytest.raises(ProtocolError, match="unknown event kind"):
        m.decode_event(m.Event(kind="nope", data={}))


def test_decode_ignores_fields_it_does_not_know() -> None:
    """A newer controller may add fields: an older watcher still reads the event."""
    ev = m.decode_event(m.Event(kind="client.left", data={"client": "a", "combiner": "c", "extra": 1}))
    assert ev == m.ClientLeft(client="a", combiner="c")


def test_subscribe_message_parses_with_defaults() -> None:
    msg = m.parse('{"v": %d, "type": "subscribe", "id": "1"}' % m.PROTOCOL_VERSION)
    assert isinstance(msg, m.Subscribe) and msg.kinds == [] and msg.buffer == 4096
    with pytest.raises(ProtocolError, match="'buffer' has the wrong type"):
        m.parse('{"v": %d, "type": "subscribe", "buffer": "many"}' % m.PROTOCOL_VERSION)


def test_numeric_values_keeps_finite_numbers_and_flattens_metadata() -> None:
    data = {"acc": 0.5, "n": 3, "ok": True, "name": "x", "nan": float("nan"), "big": 10**400, "metadata": {"training_metadata": {"num_examples": 60}}}
    assert m.numeric_values(data) == {"acc": 0.5, "n": 3.0, "num_examples": 60.0}
    assert m.numeric_values(["not", "a", "dict"]) == {}
