"""Who goes where and who takes part: client-to-combiner assignment and round selection.

Pure bookkeeping with an explicit ``now``: the controller feeds it combiner and client
events (deltas, so each costs O(1)) and asks it where a client should dial and which
clients a round trains and validates.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scaleout.core.errors import ConfigError, NotFoundError, ProtocolError
from scaleout.core.messages import check_name

MAX_SEED = 2**63 - 1  # a seed is stored as JSON and in SQLite: a signed 64-bit integer
MAX_CLIENTS_PER_ROUND = 1_000_000
# Why a client was left out of a round (the round's ``selection.not_selected``).
NOT_SAMPLED = "not sampled"
NOT_CONNECTED = "not connected"
NOT_LISTED = "not in --clients"


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


# -- client sampling (session start --clients-per-round, --seed, --clients) ------------------


def check_sampling(per_round: Any, seed: Any, clients: Any, min_clients: int) -> list[str] | None:
    """Validate a session's sampling settings; returns ``clients`` as a list (or None).
    A round that can never have ``min_clients`` updates is refused here, not at its timeout."""
    if per_round is not None:
        if isinstance(per_round, bool) or not isinstance(per_round, (int, float)):
            raise ConfigError("clients_per_round", f"must be a whole number >= 1 or a fraction in (0, 1], got {per_round!r:.40}")
        if isinstance(per_round, int):
            if not 1 <= per_round <= MAX_CLIENTS_PER_ROUND:
                raise ConfigError("clients_per_round", f"must be a whole number from 1 to {MAX_CLIENTS_PER_ROUND:,} or a fraction in (0, 1], got {per_round}")
            if per_round < min_clients:
                raise ConfigError("clients_per_round", f"{per_round} is fewer than min_clients ({min_clients}): no round could have enough updates")
        elif not (math.isfinite(per_round) and 0 < per_round <= 1):
            raise ConfigError("clients_per_round", f"a fraction must lie in (0, 1] (a count is a whole number: 2, not 2.0), got {per_round!r:.40}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ConfigError("seed", f"must be a whole number from 0 to 2**63-1, got {seed!r:.40}")
    if clients is None:
        return None
    if isinstance(clients, str) or not isinstance(clients, Sequence):
        raise ConfigError("clients", f"must be a list of client names, got {clients!r:.60}")
    if not clients:
        raise ConfigError("clients", "must name at least one client")
    if len(clients) > MAX_CLIENTS_PER_ROUND:
        raise ConfigError("clients", f"at most {MAX_CLIENTS_PER_ROUND:,} names")
    names: list[str] = []
    for name in clients:
        try:
            names.append(check_name(name, "a client name"))
        except ProtocolError as exc:
            raise ConfigError("clients", str(exc)) from None
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise ConfigError("clients", f"names {', '.join(twice[:5])} more than once")
    if len(names) < min_clients:
        raise ConfigError("clients", f"names {len(names)} clients, fewer than min_clients ({min_clients}): no round could have enough updates")
    return names


def round_quota(per_round: int | float | None, eligible: int) -> int:
    """How many of ``eligible`` connected clients a round draws: all (None), N (at most all),
    or a fraction of them rounded down, at least 1."""
    if per_round is None or eligible == 0:
        return eligible
    if isinstance(per_round, int):
        return min(per_round, eligible)
    return min(eligible, max(1, math.floor(per_round * eligible + 1e-9)))


def clients_to_wait_for(per_round: int | float | None, fixed: Sequence[str] | None, min_clients: int) -> int:
    """How many eligible clients a round waits for (up to its timeout) before it draws:
    min_clients, or N of --clients-per-round N, or every name of --clients (N of them)."""
    want = min_clients
    if isinstance(per_round, int):
        want = max(want, per_round if fixed is None else min(per_round, len(fixed)))
    elif fixed is not None:
        want = max(want, len(fixed))
    return want


def eligible_count(members: Mapping[str, Sequence[str]], fixed: Sequence[str] | None) -> int:
    if fixed is None:
        return sum(map(len, members.values()))
    allowed = set(fixed)
    return sum(1 for clients in members.values() for c in clients if c in allowed)


def sample_clients(
    members: Mapping[str, Sequence[str]], index: int, seed: int, per_round: int | float | None, fixed: Sequence[str] | None,
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """This round's participants per combiner and why each other client is left out
    (``NOT_LISTED``, ``NOT_SAMPLED``; ``NOT_CONNECTED`` for a name of --clients that is not
    connected). The draw depends only on ``seed``, the round ``index`` and the sorted
    eligible names, so a restarted controller draws the same clients for the same round."""
    allowed = None if fixed is None else set(fixed)
    left_out: dict[str, str] = {}
    eligible: list[str] = []
    for clients in members.values():
        for c in clients:
            if allowed is not None and c not in allowed:
                left_out[c] = NOT_LISTED
            else:
                eligible.append(c)
    eligible.sort()
    k = round_quota(per_round, len(eligible))
    chosen = set(eligible) if k >= len(eligible) else set(random.Random(f"{seed}/{index}").sample(eligible, k))
    for c in eligible:
        if c not in chosen:
            left_out[c] = NOT_SAMPLED
    if allowed is not None:
        for c in allowed - chosen - set(left_out):
            left_out[c] = NOT_CONNECTED
    selected = {name: sorted(c for c in clients if c in chosen) for name, clients in members.items()}
    return {name: clients for name, clients in selected.items() if clients}, dict(sorted(left_out.items()))
