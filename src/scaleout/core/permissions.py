"""Who may do what: the one table of operations and messages per role, checked before any
handler runs.

    admin     everything an operator does (sessions, models, packages, tokens, audit)
    combiner  register, receive round orders, fetch the round's model, upload its partial,
              relay its clients' reports and membership
    client    be assigned a combiner, fetch the active package, then (at its combiner) say
              hello and answer its own tasks with its own results and metrics

The roles are the authenticated claim of the link (the token's role, checked at the
handshake); a node identity narrows them further (a client answers only tasks sent to its
name), which the combiner checks per task. An operation missing from the table is an
admin's alone: a new operation is never open to a node by accident.
"""

from __future__ import annotations

from scaleout.core import messages as m
from scaleout.core.errors import AuthError

ADMIN = frozenset({"admin"})
COMBINER = frozenset({"admin", "combiner"})  # admin may do everything
CLIENT = frozenset({"admin", "client"})
NODE = frozenset({"admin", "client", "combiner"})

# Requests a link may make of the controller, by operation.
REQUESTS: dict[str, frozenset[str]] = {
    "status": ADMIN,
    "token.create": ADMIN,
    "package.set_active": ADMIN,
    "package.get": CLIENT,
    "model.set_seed": ADMIN,
    "model.ls": ADMIN,
    "model.show": ADMIN,
    "model.get": COMBINER,
    "session.start": ADMIN,
    "session.ls": ADMIN,
    "session.show": ADMIN,
    "session.stop": ADMIN,
    "session.wait": ADMIN,
    "session.continue": ADMIN,
    "model.set_active": ADMIN,
    "client.ls": ADMIN,
    "client.wait": ADMIN,
    "combiner.ls": ADMIN,
    "client.assign": CLIENT,
    "combiner.register": COMBINER,
    "combiner.ready": COMBINER,
    "audit.ls": ADMIN,
    "audit.verify": ADMIN,
    # Node identities: a node enrols with its join token, a combiner renews its certificate.
    "node.enrol": NODE,
    "combiner.renew": COMBINER,
    "token.ls": ADMIN,
    "token.revoke": ADMIN,
    "client.rm": ADMIN,
    "combiner.rm": ADMIN,
    # Watching: the event stream's snapshot, logged metrics; commands and predictions.
    "events.snapshot": ADMIN,
    "metric.ls": ADMIN,
    "validation.ls": ADMIN,
    "telemetry.ls": ADMIN,
    "client.show": ADMIN,
    "client.attributes": ADMIN,
    "package.ls": ADMIN,
    "command.run": ADMIN,
    "command.ls": ADMIN,
    "command.show": ADMIN,
    "command.wait": ADMIN,
}

# Requests that change nothing a second one would change again: safe to send twice (the
# Python client repeats one whose link dropped; any other may have been done already).
# model.get is audited as a download, and a repeated one is audited twice.
READS = frozenset({
    "status", "model.ls", "model.show", "model.get", "session.ls", "session.show", "session.wait", "client.ls", "client.wait",
    "combiner.ls", "audit.ls", "audit.verify", "token.ls", "events.snapshot", "metric.ls", "validation.ls", "telemetry.ls",
    "client.show", "client.attributes", "package.ls", "package.get", "command.ls", "command.show", "command.wait",
})

# Messages (not requests) a link of each role may send, by receiver: a combiner's to the
# controller, a client's to its combiner. Anything else is refused before it is looked at.
# Commands' results, attributes, telemetry and package status travel client -> combiner -> controller.
_RELAYED = (m.CommandResult, m.ClientLog, m.ClientStatus)
_COMBINER_MESSAGES = frozenset(t.type for t in (m.ClientsChanged, m.Report, m.Reports, m.RoundPartial, m.RoundUpdate, m.ValidateDone, *_RELAYED))
_CLIENT_MESSAGES = frozenset(t.type for t in (m.Hello, m.TaskResult, m.Metric, *_RELAYED))
MESSAGES: dict[str, dict[str, frozenset[str]]] = {
    "controller": {"combiner": _COMBINER_MESSAGES},
    "combiner": {"client": _CLIENT_MESSAGES},
}


def request_roles(op: str) -> frozenset[str]:
    """The roles that may request ``op`` (admin alone for an operation not in the table)."""
    return REQUESTS.get(op, ADMIN)


def may_request(role: str, op: str) -> bool:
    return role in request_roles(op)


def check_request(role: str, op: str) -> None:
    """Raise AuthError unless a link of ``role`` may request ``op``."""
    if not may_request(role, op):
        raise AuthError(f"{_article(role)} {role} token may not do {op}")


def may_send(role: str, msg_type: str, to: str) -> bool:
    """Whether a link of ``role`` may send a message of ``msg_type`` (not a request) ``to``
    the controller or a combiner (an admin may send anything: what the receiver does not
    take is refused by its handler, as for any link)."""
    return role == "admin" or msg_type in MESSAGES.get(to, {}).get(role, frozenset())


def check_message(role: str, msg_type: str, to: str) -> None:
    """Raise AuthError unless a link of ``role`` may send ``msg_type`` ``to`` this receiver."""
    if not may_send(role, msg_type, to):
        raise AuthError(f"{_article(role)} {role} may not send {msg_type} to the {to}")


def _article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"
