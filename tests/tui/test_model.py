"""FedView and the plot: events applied to plain state, without a terminal."""

from __future__ import annotations

from scaleout.core import messages as m
from scaleout.core.metrics import Spread
from scaleout.tui.model import FedView
from scaleout.tui.plot import render_plot

SNAPSHOT = {
    "seq": 5, "url": "wss://x", "active_model": "m0", "active_package": {"id": "p" * 64, "name": "client.tgz"},
    "combiners": [{"name": "c1", "status": "online", "url": "wss://c1", "clients": 1}],
    "clients": [{"name": "a", "status": "online", "combiner": "c1", "last_seen": 1.0, "last_round": ["s-old", 3]}],
    "sessions": [{"id": "s-1", "status": "running", "config": {"rounds": 3}, "created": 1.0}],
    "session": {"id": "s-1", "status": "running", "config": {"rounds": 3}, "created": 1.0, "rounds": [
        {"idx": 1, "status": "succeeded", "participants": ["a"], "validation": {"acc": 0.5}, "duration_s": 1.0, "model_id": "m1"},
    ]},
    "reports": [
        {"kind": "validate", "round_index": 1, "client": "a", "error": None, "values": {"acc": 0.5}},
        {"kind": "metric", "round_index": 1, "client": "a", "error": None, "values": {"loss": 2.0}, "step": 0},
    ],
    "round": {"session_id": "s-1", "round_index": 2, "received": 0, "refused": 0, "expected": 2, "bytes_in": 0, "bytes_out": 8, "deadline": 99.0},
    "models": [{"id": "m1", "parent": "m0", "session_id": "s-1", "round_index": 1, "aggregator": "fedavg", "contributors": ["a"], "size": 4, "created": 2.0}],
}


def test_snapshot_then_events_give_the_live_picture() -> None:
    v = FedView()
    assert v.load(SNAPSHOT).everything
    assert v.running_round is not None and v.running_round.index == 2 and v.running_round.expected == 2
    ch = v.apply(m.ClientJoined(client="b", combiner="c1"))
    assert ch.clients == {"b"} and v.combiners["c1"].clients == 2
    v.apply(m.ClientReported(session_id="s-1", round_index=2, client="a", task="train"))
    v.apply(m.ClientReported(session_id="s-1", round_index=2, client="b", task="train", error="update refused: NaN in tensor 0"))
    v.apply(m.RoundProgress(session_id="s-1", round_index=2, received=1, refused=1, expected=2, bytes_in=4, bytes_out=8))
    r = v.rounds[2]
    assert (r.received, r.refused, r.failures) == (1, 1, {"b": "train: update refused: NaN in tensor 0"})
    assert v.clients["a"].last_round == ("s-1", 2)
    v.apply(m.ClientReported(session_id="s-1", round_index=2, client="a", task="validate", values={"acc": 0.7}))
    v.apply(m.ClientReported(session_id="s-1", round_index=2, client="b", task="validate", values={"acc": 0.9}))
    v.apply(m.RoundEnded(session_id="s-1", round_index=2, status="succeeded", participants=1, validation={"acc": 0.8}))
    assert v.running_round is None
    points, _ = v.series("validation:acc")
    assert [x for x, _ in points] == [1.0, 2.0]
    assert points[1][1].min == 0.7 and points[1][1].max == 0.9 and abs(points[1][1].mean - 0.8) < 1e-12
    v.apply(m.ClientLeft(client="b", combiner="c1"))
    assert v.clients["b"].status == "offline" and v.combiners["c1"].clients == 1
    v.apply(m.CombinerLeft(combiner="c1", clients=1))
    assert v.clients["a"].status == "offline"
    assert any("refused" in line.text and line.level == "warning" for line in v.log)


def test_events_are_idempotent_upserts() -> None:
    v = FedView()
    v.load(SNAPSHOT)
    ev = m.MetricLogged(session_id="s-1", round_index=1, client="a", step=0, values={"loss": 2.0})
    v.apply(ev)
    v.apply(ev)
    assert v.training["loss"] == {(1, 0, "a"): 2.0}
    assert v.metric_names() == ["validation:acc", "training:loss"]


def test_a_new_session_starts_a_clean_view_of_rounds_and_metrics() -> None:
    v = FedView()
    v.load(SNAPSHOT)
    v.apply(m.SessionStarted(session_id="s-2", config={"rounds": 2}))
    assert v.session_id == "s-2" and v.rounds == {} and v.validation == {}


def test_plot_draws_mean_and_spread_with_labels() -> None:
    pts = [(1.0, Spread(0.5, 0.1, 0.4, 0.6, 3)), (2.0, Spread(0.7, 0.1, 0.6, 0.8, 3)), (3.0, Spread(0.8, 0.0, 0.8, 0.8, 3))]
    text = render_plot(40, 10, pts).plain.splitlines()
    assert len(text) == 10
    assert text[0].lstrip().startswith("0.8") and "┤" in text[0]  # the max label on top
    assert text[-1].split() == ["round", "1", "2", "3"]  # a label under each round
    assert text[-1].index("3") - text[-1].index("2") == text[-1].index("2") - text[-1].index("1") > 5  # under their places
    ten = render_plot(60, 6, [(float(i), Spread(i, 0.0, i, i, 1)) for i in range(1, 11)]).plain.splitlines()[-1]
    assert ten.split() == ["round", *map(str, range(1, 11))], ten
    many = render_plot(60, 6, [(float(i), Spread(i, 0.0, i, i, 1)) for i in range(1, 101)]).plain.splitlines()[-1]
    assert many.split()[1:] == [str(i) for i in range(10, 101, 10)], many  # as many as fit, evenly
    one = render_plot(40, 6, [(1.0, Spread(0.5, 0.0, 0.5, 0.5, 1))]).plain.splitlines()[-1]
    assert one.split() == ["round", "1"], one  # one round: no 0.5 and 1.5
    steps = render_plot(60, 6, [(i / 4, Spread(i, 0.0, i, i, 1)) for i in range(12)], None, "round.step").plain.splitlines()[-1]
    assert steps.split() == ["round", "1", "2", "3"], steps  # training steps of rounds 1-3
    assert any(ch != " " and 0x2800 <= ord(ch) <= 0x28FF for line in text for ch in line)
    assert "no values yet" in render_plot(40, 10, []).plain


def test_a_malformed_snapshot_is_refused_in_words_and_changes_nothing() -> None:
    import pytest

    v = FedView()
    v.load(SNAPSHOT)
    with pytest.raises(ValueError, match="snapshot is malformed"):
        v.load({**SNAPSHOT, "clients": [{"status": "online"}]})  # a client without a name
    with pytest.raises(ValueError, match="snapshot is malformed"):
        v.load({**SNAPSHOT, "session": {"id": "s-1", "status": "running", "rounds": [{"idx": "x", "status": 3}]}})
    assert set(v.clients) == {"a"} and v.session_id == "s-1" and v.running_round is not None


def test_seen_is_a_clients_last_activity() -> None:
    v = FedView()
    v.load(SNAPSHOT)
    v.apply(m.ClientJoined(client="b", combiner="c1", time=100.0))
    assert v.clients["b"].last_seen == 100.0
    ch = v.apply(m.MetricLogged(session_id="s-1", round_index=2, client="b", step=0, values={"loss": 1.0}, time=150.0))
    assert v.clients["b"].last_seen == 150.0 and "b" in ch.clients
    ch = v.apply(m.ClientReported(session_id="s-1", round_index=2, client="b", task="train", time=400.0))
    assert v.clients["b"].last_seen == 400.0 and "b" in ch.clients
    v.apply(m.ClientReported(session_id="s-0", round_index=9, client="b", task="validate", time=300.0))  # late and out of order
    assert v.clients["b"].last_seen == 400.0


def test_the_clipboard_sequence_never_reaches_the_page() -> None:
    from scaleout.tui.web import Osc52Filter

    stream = b"before\x1b]52;c;c2NvMS5zZWNyZXQ=\x07middle\x1b]52;c;c2Nv\x1b\\after\x1b[0m"
    for cut in range(1, len(stream)):  # however the stream is split into chunks
        f = Osc52Filter()
        assert f(stream[:cut]) + f(stream[cut:]) == b"beforemiddleafter\x1b[0m", cut
    f = Osc52Filter()
    assert b"".join(f(bytes([b])) for b in stream) == b"beforemiddleafter\x1b[0m"
