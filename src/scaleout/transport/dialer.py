"""The one place that dials a list of controller addresses (``wss://a:8090,wss://b:8090``):
each is tried in turn, the one that answered last first, and a standby's refusal (error code
``standby``, naming the active controller) sends the caller to the active one next.
Combiners, clients, the CLI, the TUI and the Python API all dial through ``Controllers``."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from scaleout.core.errors import ScaleoutError, Standby, standby_active
from scaleout.transport.net import ConnectError, TrustError, connect

T = TypeVar("T")


def controller_urls(text: str | Sequence[str]) -> tuple[str, ...]:
    """The addresses in ``text`` ("wss://a:8090,wss://b:8090", or a list of them), in order, once each."""
    items = text.split(",") if isinstance(text, str) else [u for t in text for u in str(t).split(",")]
    return tuple(dict.fromkeys(u.strip() for u in items if u.strip()))


MAX_LEARNED = 16  # controller addresses a node adds to those it was given (a store has a few controllers)
MAX_URL_CHARS = 256


def refused_by_standby(exc: BaseException) -> tuple[bool, str | None]:
    """Whether ``exc`` is a standby's refusal, and the active address it names."""
    if isinstance(exc, ScaleoutError) and exc.code == Standby.code:  # its remote form has the message only
        return True, getattr(exc, "active", None) or standby_active(exc.message)
    return False, None


RECONNECT_S = 60.0  # how long a follower given several addresses waits for one to be active again
RECONNECT_ONE_S = 5.0  # ... given one: its quick restart, not a minute's wait for one that has gone


def reconnect_s(urls: tuple[str, ...]) -> float:
    """How long a follower of a session that lost its controller dials ``urls`` again before it gives up."""
    return RECONNECT_S if len(urls) > 1 else RECONNECT_ONE_S


class Controllers:
    """A controller's addresses and which of them is active, as far as this caller knows."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls = controller_urls(urls)
        self.given = len(self.urls)  # the first ones: those the user gave, always tried before any learned
        if not self.urls:
            raise ConnectError("no controller address given")
        self.current = self.urls[0]

    def __str__(self) -> str:
        return self.current

    def add(self, urls: object) -> list[str]:
        """Add controller addresses the active controller told of (every controller on its
        store), after the ones given; returns those that are new. Never removed while running.

        Safe to take from the controller (or, for a client, its combiner): a learned address
        is dialled with the same CA and token checks as a given one (its certificate must be
        a controller's of this CA before the token is sent: transport/net.py connect), so an
        entry naming a machine that is not one of this CA's controllers only fails to
        connect, and is passed over like an unreachable one (dial); it cannot make this node
        trust anyone new. Only addresses of the scheme this node was given (no ws:// for a
        wss:// node), and at most MAX_LEARNED of them."""
        if not isinstance(urls, (list, tuple)):
            return []
        scheme = self.urls[0].split("://", 1)[0]
        new: list[str] = []
        for url in urls:
            if not isinstance(url, str) or len(url) > MAX_URL_CHARS or url in self.urls or "," in url or not url.isprintable() or " " in url:
                continue
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018  # raises ValueError for a port that is not a number
            except ValueError:
                continue
            if parts.scheme != scheme or not parts.hostname or len(self.urls) - self.given >= MAX_LEARNED:
                continue
            self.urls = (*self.urls, url)
            new.append(url)
        return new

    @property
    def learned(self) -> list[str]:
        """The addresses added to those given (Controllers.add), in the order learned."""
        return list(self.urls[self.given :])

    async def dial(self, attempt: Callable[[str], Awaitable[T]]) -> T:
        """``attempt(url)`` on each address until one succeeds; remembered as the current one.

        An unreachable address (ConnectError) or a standby moves on to the next address (a
        standby's named active one first, if it is one of ours: an address nobody gave or told us
        is only reported); any other error is raised at once (a refused token, an untrusted
        certificate). None answering as active: ConnectError naming each refusal (and so the
        active address a standby named), so callers retry with their backoff."""
        queue = deque([self.current, *(u for u in self.urls if u != self.current)])
        tried: set[str] = set()
        failures: list[str] = []
        errors: list[ScaleoutError] = []
        while queue:
            url = queue.popleft()
            if url in tried:
                continue
            tried.add(url)
            try:
                result = await attempt(url)
            except TrustError as exc:
                if url in self.urls[: self.given]:
                    raise  # an impostor or the wrong CA: not a reason to try elsewhere quietly
                failures.append(str(exc))  # a learned address (say, a machine since put to other use): the others are tried
                errors.append(exc)
                continue
            except ConnectError as exc:
                failures.append(str(exc))
                errors.append(exc)
                continue
            except ScaleoutError as exc:
                standby, active = refused_by_standby(exc)
                if not standby:
                    raise
                failures.append(f"{url}: {exc}")
                if active and active in self.urls and active not in tried:  # only where we were told to go
                    queue.appendleft(active)
                continue
            self.current = url
            return result
        if len(errors) == 1 and len(failures) == 1:
            raise errors[0]  # the one address given did not answer: its own error
        raise ConnectError("no controller answered as the active one: " + "; ".join(failures))

    async def request(
        self, link: Any, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None, **kwargs: Any,
    ) -> tuple[dict[str, Any], bytes | None]:
        """``link.request(op, args, blob, **kwargs)`` on a link dialled through these addresses.
        With a payload and several addresses, the controller is asked its status first, and a
        standby's refusal (Standby, naming the active one) raised before the payload is sent,
        so a package or a model is not sent in full to a controller that will refuse it."""
        if blob is not None and len(self.urls) > 1:
            status, _ = await link.request("status", {}, timeout=30)
            if status.get("role") == "standby":
                raise Standby(status.get("active"))
        return await link.request(op, args, blob, **kwargs)  # type: ignore[no-any-return]

    async def ask(
        self, token: str, ctx: ssl.SSLContext | None, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None, *,
        max_payload: int, timeout: float | None = 30, on_message: Callable[[Any], Awaitable[None]] | None = None,
    ) -> tuple[dict[str, Any], bytes | None]:
        """One request on a fresh link to the active controller (what a node or the CLI asks once)."""

        async def attempt(url: str) -> tuple[dict[str, Any], bytes | None]:
            link = await connect(url, token, ctx, max_payload=max_payload)
            reader = asyncio.create_task(link.run(on_message=on_message))
            try:
                return await self.request(link, op, args, blob, timeout=timeout)
            finally:
                await link.ws.close()
                reader.cancel()

        return await self.dial(attempt)


__all__ = ["Controllers", "controller_urls", "refused_by_standby", "reconnect_s"]
