"""One exception tree for Scaleout.

    ScaleoutError
     ├── ConfigError            a setting is missing, malformed or out of range
     ├── ProtocolError          a wire message is malformed, unknown or of another version
     ├── PayloadError           model bytes are not a valid safetensors payload
     │    ├── IntegrityError    bytes do not match their announced sha256 or size
     │    └── ModelMismatchError  an update's tensors differ from the global model's
     ├── UpdateRejected         an update is well-formed but unusable (NaN, no examples)
     ├── LimitExceeded          a metric, result or text is larger than a peer may send
     ├── RateLimited            too many at once (enrolments with one join token): retry later
     ├── AuthError              a token is missing, malformed, expired, or of the wrong role
     │    └── PermissionDenied  a valid token whose role may not do this (a client token starting a session)
     ├── PackageError           a compute package is missing, broken or unsafe
     │    └── PackageCommandFailed  a dispatcher package's command failed, timed out or wrote bad output
     ├── NotFoundError          a session, model, package, ... does not exist
     ├── ConflictError          the request conflicts with current state (session running, ...)
     ├── StorageError           the controller could not write or read its files (disk full, ...)
     │    ├── CorruptModelError  a stored model file no longer matches its id
     │    └── StoreUnreachable  the store's server could not be reached (a lost or refused link): it may come back
     ├── Superseded             another node took over this node's name
     ├── Standby                this controller is a standby: the active one (named) does the work
     ├── ShuttingDown           the controller is stopping: a session it runs goes on at its next start
     ├── RemoteError            a peer answered a request with an error (``remote_error`` makes it
     │                          the class of its code too: a NotFoundError, a ConflictError...)
     ├── ConnectionFailed       the controller cannot be reached, or its TLS certificate not
     │                          trusted (also a ConnectionError)
     ├── NotSupported           asked for what this release does not do yet (also a NotImplementedError)
     ├── TaskAborted            the running task was aborted (session stopped)
     ├── ServerFunctionsError   a session's server function failed to load, raised, timed out or
     │                          returned the wrong thing (the built-in behaviour is used instead)
     └── CommandFailed          a custom command or prediction failed on a client (raised,
                                timed out, returned no JSON, no such command, ...)

Exceptions carry fields and build their message from them; roles translate them into
error replies, close codes or exit codes at the edge.
"""

from __future__ import annotations

import functools

from scaleout.core.units import fmt_bytes


class ScaleoutError(Exception):
    """Root of every error Scaleout raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ScaleoutError):
    code = "bad_config"

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class ProtocolError(ScaleoutError):
    code = "bad_message"
    re: str | None = None  # the id of the refused message, when it could be read: its sender's request fails at once


class PayloadError(ScaleoutError):
    code = "bad_payload"


class IntegrityError(PayloadError):
    code = "integrity"

    def __init__(self, expected: str, actual: str, what: str = "payload") -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what} is corrupt: sha256 {actual[:12]} does not match the announced {expected[:12]}")


class ModelMismatchError(PayloadError):
    code = "model_mismatch"

    def __init__(self, tensor: str, problem: str) -> None:
        self.tensor = tensor
        self.problem = problem
        super().__init__(f"tensor {tensor!r}: {problem}")


class UpdateRejected(ScaleoutError):
    code = "update_rejected"


class LimitExceeded(ScaleoutError, ValueError):
    """Too large to send or store (also a ValueError: user code calling log_metric may expect one)."""

    code = "limit_exceeded"

    def __init__(self, what: str, size: int, limit: int, hint: str = "") -> None:
        self.what = what
        self.size = size
        self.limit = limit
        super().__init__(f"{what} is {fmt_bytes(size)} as JSON; the limit is {fmt_bytes(limit)}" + (f": {hint}" if hint else ""))


class RateLimited(ScaleoutError):
    """Too many at once (enrolments with one join token): try again later."""

    code = "rate_limited"


class AuthError(ScaleoutError):
    code = "unauthorized"


class PermissionDenied(AuthError):
    """The token is valid, but its role may not do this (core/permissions.py)."""

    code = "forbidden"


class PackageError(ScaleoutError):
    code = "bad_package"


class PackageCommandFailed(PackageError):
    """A package command (``train``: ``python train.py IN OUT``) failed: ``problem`` says how
    (``exited with 1``, ``did not finish within 60s``), ``stderr`` holds its last lines."""

    code = "package_command_failed"

    def __init__(
        self, entry: str, command: str, problem: str, stderr: list[str] | None = None, hint: str = "", exit_code: int | None = None,
    ) -> None:
        self.entry = entry
        self.command = command
        self.problem = problem
        self.stderr = list(stderr or [])
        self.exit_code = exit_code
        tail = " | ".join(line.strip() for line in self.stderr if line.strip())
        super().__init__(
            f"{entry} command `{command}` {problem}" + (f"; its stderr ended: {tail}" if tail else "") + (f"; {hint}" if hint else "")
        )


class Superseded(ScaleoutError):
    """Another node registered under this node's name; the newest one stays."""

    code = "superseded"


class Standby(ScaleoutError):
    """A standby controller's refusal: its message ends with the active controller's address
    (``standby_active`` reads it back), so a node or the CLI goes there."""

    code = "standby"

    def __init__(self, active: str | None) -> None:
        self.active = active
        super().__init__(f"this controller is a standby, active is {active}" if active else "this controller is a standby and no controller is active yet")


class ShuttingDown(ScaleoutError):
    """The controller is stopping: what was asked of it (following a session) cannot go on
    here; the session stays running and the next start resumes it."""

    code = "shutting_down"


def standby_active(message: str) -> str | None:
    """The active controller's address in a standby's refusal (Standby's message), if it names one."""
    import re

    found = re.search(r"active is (wss?://\S+)$", message)
    return found.group(1) if found else None


class NotFoundError(ScaleoutError):
    code = "not_found"

    def __init__(self, kind: str, key: str, hint: str = "", text: str | None = None) -> None:
        self.kind = kind
        self.key = key
        # ``text``: the whole message, where "no KIND 'KEY'" would not read (no combiner is online)
        super().__init__(text or f"no {kind} {key!r}" + (f"; {hint}" if hint else ""))


class ConflictError(ScaleoutError):
    code = "conflict"


class StorageError(ScaleoutError):
    """A file or database write failed: ``problem`` is the system's reason (its strerror)."""

    code = "storage"

    def __init__(self, problem: str, action: str, path: str, errno: int | None = None) -> None:
        self.problem = problem
        self.action = action
        self.path = path
        self.errno = errno
        super().__init__(f"{problem[:1].lower()}{problem[1:]} while {action} {path}")


class StoreUnreachable(StorageError):
    """The store's database server could not be reached (a connection lost, refused, or none
    free in time): unlike a full disk, waiting may cure it."""


class CorruptModelError(StorageError):
    """A stored model file whose bytes no longer match its id (its sha256): says which, where,
    and what to do, rather than failing a session as an internal error."""

    code = "corrupt_model"

    def __init__(self, model_id: str, folder: str, actual: str) -> None:
        self.model_id = model_id
        self.problem = f"model {model_id[:12]} is corrupt (sha256 mismatch: its bytes hash to {actual[:12]})"
        self.action, self.path, self.errno = "reading", folder, None
        ScaleoutError.__init__(
            self,
            f"model {model_id[:12]} in {folder} is corrupt (sha256 mismatch): set a seed model (this one again, or another) "
            f"with `scaleout model set-seed FILE`, or restore {model_id}.safetensors there from a backup",
        )


class RemoteError(ScaleoutError):
    """A peer refused a request; `code` is the peer's error code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class ConnectionFailed(ScaleoutError, ConnectionError):
    """The controller could not be reached or trusted: the message says what to check."""

    code = "connection_failed"


class NotSupported(ScaleoutError, NotImplementedError):
    """Something this release does not do yet; the message says when it comes."""

    code = "not_supported"


class TaskAborted(ScaleoutError):
    """Raised by EdgeClient.check_task_abort() when the session was stopped."""

    code = "aborted"


class ServerFunctionsError(ScaleoutError):
    """A server function failed: ``where`` is the file and line in the user's class, when known."""

    code = "server_functions"

    def __init__(self, problem: str, where: str | None = None) -> None:
        self.problem, self.where = problem, where
        super().__init__(f"{problem} ({where})" if where else problem)


class CommandFailed(ScaleoutError):
    """A custom command or prediction failed on one client; ``reason`` is the stored code
    (``raised``, ``timeout``, ``not_json``, ``no_such_command``, ...)."""

    code = "command_failed"

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)



def remote_error(code: str, message: str) -> ScaleoutError:
    """A peer's refusal as the error class of its ``code`` (``not_found``: a NotFoundError)
    that is a RemoteError too, with the peer's one-line message; a plain RemoteError for a
    code no class has (``internal``)."""
    cls = _remote_class(code)
    if cls is None:
        return RemoteError(code, message)
    exc = cls.__new__(cls, message)
    ScaleoutError.__init__(exc, message)  # the fields its own constructor takes are not on the wire
    exc.code = code
    return exc


@functools.cache
def _remote_class(code: str) -> type[RemoteError] | None:
    base = {cls.code: cls for cls in _classes() if cls.code != "error"}.get(code)
    if base is None:
        return None
    # The same name, so a traceback reads "NotFoundError: no session 's-1'".
    return type(base.__name__, (base, RemoteError), {"__module__": __name__, "__qualname__": base.__qualname__})


def _classes() -> list[type[ScaleoutError]]:
    """Every class of the tree above (not the remote forms made of them)."""
    out: list[type[ScaleoutError]] = []
    todo: list[type[ScaleoutError]] = [ScaleoutError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(c for c in cls.__subclasses__() if c.__module__ == __name__ and not issubclass(c, RemoteError))
    return out
