"""A failed send is logged once per burst, with a count of the ones not shown."""

from __future__ import annotations

import asyncio
import logging

import pytest

from scaleout.roles import common


async def fail() -> None:
    raise ConnectionError("connection closed")


def test_a_burst_of_failed_sends_is_one_line_then_a_count(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_quiet_state", {})
    clock = [100.0]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "time", lambda: clock[0])
        for _ in range(650):
            await common.quietly(fail(), "forwarding a metric")
        await common.quietly(fail(), "telling the controller")  # another kind is its own line
        clock[0] += common.QUIET_EVERY_S
        await common.quietly(fail(), "forwarding a metric")

    with caplog.at_level(logging.WARNING, logger="scaleout"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "forwarding a metric failed: connection closed",
        "telling the controller failed: connection closed",
        "forwarding a metric failed: connection closed (649 more like it not shown)",
    ]
