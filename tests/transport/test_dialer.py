"""The one dialer of a controller address list: in turn, the last good one first, a standby's
refusal sends the caller to the active one it names (if it is one of ours)."""

from __future__ import annotations

import asyncio

import pytest

from scaleout.core.errors import AuthError, RemoteError, Standby, remote_error
from scaleout.transport.dialer import Controllers, controller_urls
from scaleout.transport.net import ConnectError, TrustError


def test_addresses_are_split_in_order_once_each() -> None:
    assert controller_urls("wss://a:1, wss://b:2,,wss://a:1") == ("wss://a:1", "wss://b:2")
    assert controller_urls(["wss://a:1,wss://b:2", "wss://c:3"]) == ("wss://a:1", "wss://b:2", "wss://c:3")


def _run(ctl: Controllers, answers: dict[str, BaseException | str]) -> tuple[str, list[str]]:
    tried: list[str] = []

    async def attempt(url: str) -> str:
        tried.append(url)
        out = answers[url]
        if isinstance(out, BaseException):
            raise out
        return out

    return asyncio.run(ctl.dial(attempt)), tried


def test_an_unreachable_address_moves_on_and_the_good_one_is_remembered() -> None:
    ctl = Controllers("wss://a:1,wss://b:2,wss://c:3")
    got, tried = _run(ctl, {"wss://a:1": ConnectError("down"), "wss://b:2": "B", "wss://c:3": "C"})
    assert (got, tried, ctl.current) == ("B", ["wss://a:1", "wss://b:2"], "wss://b:2")
    got, tried = _run(ctl, {"wss://a:1": "A", "wss://b:2": "B", "wss://c:3": "C"})
    assert (got, tried) == ("B", ["wss://b:2"])  # the one that answered last, first


def test_a_standby_sends_the_caller_to_the_active_one_it_names() -> None:
    ctl = Controllers("wss://a:1,wss://b:2,wss://c:3")
    refusal = remote_error("standby", str(Standby("wss://c:3")))  # as it arrives over a link
    got, tried = _run(ctl, {"wss://a:1": refusal, "wss://b:2": "B", "wss://c:3": "C"})
    assert (got, tried) == ("C", ["wss://a:1", "wss://c:3"])
    plain = RemoteError("standby", str(Standby("wss://a:1")))
    ctl = Controllers("wss://c:3,wss://a:1")
    got, tried = _run(ctl, {"wss://a:1": "A", "wss://c:3": plain})
    assert (got, tried) == ("A", ["wss://c:3", "wss://a:1"])


def test_only_standbys_or_unreachable_is_a_connect_error_naming_the_active_one() -> None:
    ctl = Controllers("wss://a:1")
    with pytest.raises(ConnectError, match=r"active is wss://elsewhere:9$"):
        _run(ctl, {"wss://a:1": Standby("wss://elsewhere:9")})  # not ours: reported, not dialled
    ctl = Controllers("wss://a:1,wss://b:2")
    with pytest.raises(ConnectError, match="no controller answered as the active one: .*down.*no controller is active yet"):
        _run(ctl, {"wss://a:1": ConnectError("down"), "wss://b:2": Standby(None)})


def test_other_refusals_are_raised_at_once() -> None:
    ctl = Controllers("wss://a:1,wss://b:2")
    with pytest.raises(AuthError):
        _run(ctl, {"wss://a:1": AuthError("refused"), "wss://b:2": "B"})
    with pytest.raises(TrustError):  # the wrong CA, or someone in between: not a reason to go elsewhere quietly
        _run(ctl, {"wss://a:1": TrustError("untrusted"), "wss://b:2": "B"})
    one = ConnectError("cannot reach wss://a:1")
    with pytest.raises(ConnectError) as info:
        _run(Controllers("wss://a:1"), {"wss://a:1": one})
    assert info.value is one  # one address: its own error, as before there were several


def test_learned_addresses_come_after_the_given_ones_and_are_checked() -> None:
    ctl = Controllers("wss://a:1,wss://b:2")
    told = ["wss://b:2", "wss://c:3", "ws://d:4", "https://e:5", "wss://f:x", "wss://", 7, "wss://g:7,wss://h:8", "wss://i 9", "wss://" + "j" * 300, "wss://c:3"]
    assert ctl.add(told) == ["wss://c:3"]  # the given ones first, a downgrade to ws:// or anything malformed left out
    assert ctl.urls == ("wss://a:1", "wss://b:2", "wss://c:3") and ctl.learned == ["wss://c:3"]
    assert ctl.add("wss://z:1") == [] and ctl.add(None) == []  # a list, or nothing
    ctl.add([f"wss://n{i}:1" for i in range(40)])
    assert len(ctl.learned) == 16  # bounded (MAX_LEARNED): a controller's list is a handful
    assert Controllers("ws://a:1").add(["wss://b:2", "ws://c:3"]) == ["ws://c:3"]  # the scheme a node was given


def test_a_learned_address_is_dialled_after_the_given_ones_and_one_that_fails_trust_is_passed_over() -> None:
    ctl = Controllers("wss://a:1")
    ctl.add(["wss://a:1", "wss://b:2", "wss://c:3"])
    got, tried = _run(ctl, {"wss://a:1": ConnectError("down"), "wss://b:2": TrustError("a combiner's certificate"), "wss://c:3": "C"})
    assert (got, tried, ctl.current) == ("C", ["wss://a:1", "wss://b:2", "wss://c:3"], "wss://c:3")
    # A standby may name a learned address as the active one: it is one of ours now.
    ctl = Controllers("wss://a:1")
    ctl.add(["wss://c:3"])
    got, tried = _run(ctl, {"wss://a:1": Standby("wss://c:3"), "wss://c:3": "C"})
    assert (got, tried) == ("C", ["wss://a:1", "wss://c:3"])
