"""The one place that dials a list of controller addresses (``wss://a:8090,wss://b:8090``):
each is tried in turn, the one that answered last first, and a standby's refusal (error code
``standby``, naming the active controller) sends the caller to the active one at once.
Combiners, clients, the CLI, the TUI and the Python API all dial through ``Controllers``."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from scaleout.core.errors import ScaleoutError, Standby, standby_active
from scaleout.transport.net import ConnectError

T = TypeVar("T")


def controller_urls(text: str | Sequence[str]) -> tuple[str, ...]:
    """The addresses in ``text`` ("wss://a:8090,wss://b:8090", or a list of them), in order, once each."""
    items = text.split(",") if isinstance(text, str) else [u for t in text for u in str(t).split(",")]
    return tuple(dict.fromkeys(u.strip() for u in items if u.strip()))


def refused_by_standby(exc: BaseException) -> tuple[bool, str | None]:
    """Whether ``exc`` is a standby's refusal, and the active address it names."""
    if isinstance(exc, Standby):
        return True, exc.active
    if isinstance(exc, ScaleoutError) and exc.code == "standby":
        return True, standby_active(exc.message)
    return False, None


class Controllers:
    """A controller's addresses and which of them is active, as far as this caller knows."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls = controller_urls(urls)
        if not self.urls:
            raise ConnectError("no controller address given")
        self.current = self.urls[0]

    def __str__(self) -> str:
        return self.current

    async def dial(self, attempt: Callable[[str], Awaitable[T]]) -> T:
        """``attempt(url)`` on each address until one succeeds; remembered as the current one.

        An unreachable address (ConnectError) or a standby moves on to the next address (a
        standby's named active one first); any other error is raised at once (a refused
        token, an untrusted certificate). None answering as active: ConnectError, so callers
        retry with their backoff."""
        queue = deque([self.current, *(u for u in self.urls if u != self.current)])
        tried: set[str] = set()
        failures: list[str] = []
        while queue:
            url = queue.popleft()
            if url in tried:
                continue
            tried.add(url)
            try:
                result = await attempt(url)
            except ConnectError as exc:
                failures.append(str(exc))
                continue
            except ScaleoutError as exc:
                standby, active = refused_by_standby(exc)
                if not standby:
                    raise
                failures.append(f"{url}: {exc}")
                if active and active not in tried:
                    queue.appendleft(active)
                continue
            self.current = url
            return result
        if len(failures) == 1:
            raise ConnectError(failures[0])
        raise ConnectError("no controller answered as the active one: " + "; ".join(failures))


__all__ = ["Controllers", "controller_urls", "refused_by_standby"]
