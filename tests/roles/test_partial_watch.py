"""The controller's watch over a combiner's partial (roles/sessions.py ``_watched_request``)
sleeps until the reply or the next moment a limit could be reached: it used to wake every
second to look. Counted from outside: each time the watching coroutine resumes, over a real
link to a combiner that never answers."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest

from scaleout.core import messages as m
from scaleout.core.errors import PayloadError
from scaleout.roles import sessions
from scaleout.transport.link import Link
from scaleout.transport.net import connect, serve

STALL_S = 2.1  # PULL_STALL_S here: past two whole seconds, so a once-a-second look would wake twice first


class Resumed:
    """An awaitable that runs ``coro`` and counts the times it is resumed (its first step
    included): what its task does each time the loop wakes it."""

    def __init__(self, coro: Any) -> None:
        self.inner = coro.__await__()
        self.count = 0

    def __await__(self) -> Generator[Any, Any, Any]:
        return self  # type: ignore[return-value]

    def __iter__(self) -> Resumed:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        self.count += 1
        return self.inner.send(value)

    def throw(self, *exc: Any) -> Any:
        self.count += 1
        return self.inner.throw(*exc)


def test_a_stalled_partial_is_given_up_when_the_stall_is_due_without_waking_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "PULL_STALL_S", STALL_S)
    async def go() -> int:
        done = asyncio.Event()

        async def silent(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
            await done.wait()  # a combiner that never sends its partial
            return {}, None

        async def on_link(link: Link) -> None:
            await link.run(on_request=silent)

        server, port = await serve(on_link, lambda token: None, "127.0.0.1", 0, None, max_payload=1 << 20)
        link = await connect(f"ws://127.0.0.1:{port}", "token", None, max_payload=1 << 20)
        reader = asyncio.create_task(link.run())
        loop = asyncio.get_running_loop()
        watch = Resumed(sessions._watched_request(link, "partial.get", {}, 1000, loop.time() + 60, "partial"))
        try:
            with pytest.raises(PayloadError, match=f"sent nothing of its partial for {STALL_S:g} s"):
                await watch
        finally:
            done.set()
            await link.ws.close()
            await reader
            server.close()
            await server.wait_closed()
        return watch.count

    resumed = asyncio.run(go())
    # Its first step, and the wake when the stall is due (one more if the timer fired a hair
    # early): a look each second would have been two more.
    assert 2 <= resumed <= 3, resumed
