"""Who goes where and who takes part: client-to-combiner assignment and round selection.

Pure bookkeeping with an explicit ``now``: the controller feeds it combiner and client
events (deltas, so each costs O(1)) and asks it where a client should dial and which
clients a round trains and validates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from scaleout.core.errors import NotFoundError


class Assigner:
    """Least-loaded assignment of clients to combiners.

    A combiner's load counts its connected clients (those that proved it: the controller
    feeds only proven joins) plus those assigned to it that have not connected yet, so a
    burst of joins spreads out. An assignment counts until its client is seen connected or
    is assigned again: a combiner that does not report its clients (or says they left while
    they stay) does not look emptier than it is. One name, one combiner: a connected client,
    or one assigned within ``ttl`` seconds, is sent back where it is (a twin must not land
    elsewhere).
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.ready: set[str] = set()  # combiners that clients can dial
        self.members: dict[str, set[str]] = {}  # combiner -> connected clients
        self.where: dict[str, str] = {}  # client -> combiner it is connected to
        self._pending: dict[str, tuple[str, float]] = {}  # client -> (combiner, when) it was last sent to, not yet seen there
        self._pending_load: Counter[str] = Counter()

    # -- events ------------------------------------------------------------------------------

    def combiner_ready(self, combiner: str) -> None:
        self.ready.add(combiner)
        self.members.setdefault(combiner, set())

    def combiner_gone(self, combiner: str) -> list[str]:
        """The combiner left: returns the clients that were connected to it."""
        self.ready.discard(combiner)
        clients = sorted(self.members.pop(combiner, set()))
        for client in clients:
            self.where.pop(client, None)
        for client, (c, _) in list(self._pending.items()):
            if c == combiner:
                self._drop_pending(client)
        return clients

    def client_joined(self, combiner: str, client: str) -> None:
        old = self.where.get(client)
        if old is not None and old != combiner:
            self.members.get(old, set()).discard(client)
        self.members.setdefault(combiner, set()).add(client)
        self.where[client] = combiner
        self._drop_pending(client)

    def client_left(self, combiner: str, client: str) -> None:
        if self.where.get(client) == combiner:
            del self.where[client]
            self.members.get(combiner, set()).discard(client)
            if combiner in self.ready:  # it counts there until it is assigned again (see the class)
                self._pending[client] = (combiner, float("-inf"))
                self._pending_load[combiner] += 1

    # -- questions ---------------------------------------------------------------------------

    def load(self, combiner: str) -> int:
        return len(self.members.get(combiner, ())) + self._pending_load[combiner]

    def assign(self, client: str, now: float, prefer: str | None = None) -> str:
        """The combiner ``client`` should dial; NotFoundError when none is ready."""
        if not self.ready:
            raise NotFoundError("combiner", "online", text="no combiner is connected now (start one with: scaleout combine; clients wait and retry)")
        current = self.where.get(client)
        if current is not None and current in self.ready:
            return current
        pending = self._pending.get(client)
        if pending is not None and now - pending[1] < self.ttl and pending[0] in self.ready:
            return pending[0]
        self._drop_pending(client)  # sent elsewhere now: it counts there instead
        if prefer is not None and prefer in self.ready:  # a reconnecting client goes back where it was
            best = prefer
        else:
            best = min(self.ready, key=lambda c: (self.load(c), c))
        self._pending[client] = (best, now)
        self._pending_load[best] += 1
        return best

    def connected(self) -> int:
        return sum(len(self.members[c]) for c in self.ready if c in self.members)

    # -- internals ---------------------------------------------------------------------------

    def _drop_pending(self, client: str) -> None:
        entry = self._pending.pop(client, None)
        if entry is not None:
            self._pending_load[entry[0]] -= 1
            if self._pending_load[entry[0]] <= 0:
                del self._pending_load[entry[0]]


def select_clients(members: Mapping[str, Iterable[str]], ready: Iterable[str]) -> dict[str, list[str]]:
    """This round's participants per combiner: every client connected to a ready combiner
    (combiners without clients are left out), each list sorted."""
    ready = set(ready)
    return {c: sorted(clients) for c, clients in sorted(members.items()) if c in ready and clients}


def choose_validators(selected: Mapping[str, Iterable[str]], contributors: Iterable[str]) -> dict[str, list[str]]:
    """Validators per combiner: only clients that just delivered an update. One that timed
    out would make the round wait a second full timeout for it."""
    alive = set(contributors)
    chosen = {c: [x for x in clients if x in alive] for c, clients in selected.items()}
    return {c: v for c, v in chosen.items() if v}
