"""The websocket door to the admin service (roles/admin.py): decode a request (its op names
a method, its args become keyword arguments), check the role (core/permissions.py, the one
table), call the service, encode the answer.

Which operations there are, and what each takes, is read from the service's signatures:
an argument the method does not take, or one of the wrong type, is refused with a
ProtocolError that names it, before anything runs. A parameter named ``data`` takes the
request's payload; one declared ``**config`` takes the arguments it does not name (the
method checks those itself). Deciding all this needs no event loop (``decode``).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

from scaleout.core import permissions
from scaleout.core.errors import ProtocolError
from scaleout.roles.admin import AdminService, Caller
from scaleout.transport.link import Hashed

PAYLOAD = "data"  # the parameter that takes a request's payload

Reply = tuple[dict[str, Any], bytes | Hashed | None]


@dataclass(frozen=True)
class Param:
    name: str
    type: Any
    say: str | Callable[[Any], Any] | None  # what a wrong value is told, or the check that tells it
    required: bool


@dataclass(frozen=True)
class Operation:
    op: str
    method: str
    params: Mapping[str, Param]
    payload: bool  # takes the request's payload (``data``)
    more: bool  # takes arguments it does not name (``**config``)


def operations(service: type = AdminService) -> dict[str, Operation]:
    """Every operation of the table (core/permissions.py) that ``service`` has a method for:
    ``model.set_seed`` is ``model_set_seed``."""
    ops = {}
    for op in permissions.REQUESTS:
        fn = getattr(service, op.replace(".", "_"), None)
        if fn is not None:
            ops[op] = _operation(op, fn)
    return ops


def _operation(op: str, fn: Callable[..., Any]) -> Operation:
    hints = get_type_hints(fn, include_extras=True)
    params: dict[str, Param] = {}
    payload = more = False
    for p in list(inspect.signature(fn).parameters.values())[2:]:  # self, caller
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            more = True
        elif p.name == PAYLOAD:
            payload = True
        else:
            tp, say = hints[p.name], None
            if get_origin(tp) is Annotated:
                tp, say = get_args(tp)[0], get_args(tp)[1]
            params[p.name] = Param(p.name, tp, say, p.default is inspect.Parameter.empty)
    return Operation(op, fn.__name__, types.MappingProxyType(params), payload, more)


def decode(ops: Mapping[str, Operation], role: str, op: str, args: Mapping[str, Any]) -> tuple[Operation, dict[str, Any]]:
    """The operation ``op`` names and its keyword arguments from ``args``, once the role may
    call it; a ProtocolError (an unknown operation or argument, a wrong type) or an AuthError."""
    operation = ops.get(op)
    if operation is None:
        raise ProtocolError(f"unknown operation {op!r}")
    permissions.check_request(role, op)
    kwargs: dict[str, Any] = {}
    for name, value in args.items():
        p = operation.params.get(name)
        if p is None:
            if operation.more and name != PAYLOAD:
                kwargs[name] = value  # the method checks these itself (SessionConfig names the unknown one)
                continue
            takes = ", ".join(operation.params) or "no arguments"
            raise ProtocolError(f"{op}: unknown argument {name!r} (it takes {takes})")
        _check(op, p, value)
        kwargs[name] = value
    for p in operation.params.values():
        if p.required and p.name not in kwargs:
            if callable(p.say):
                p.say(None)  # says what it needs, in its own words
            raise ProtocolError(p.say if isinstance(p.say, str) else f"{op} needs {p.name}")
    return operation, kwargs


class Door:
    """Requests on a link -> calls of the admin service."""

    def __init__(self, service: AdminService) -> None:
        self.service = service
        self.ops = operations(type(service))

    def knows(self, op: str) -> bool:
        return op in self.ops

    async def call(self, caller: Caller, op: str, args: Mapping[str, Any], blob: bytes | None) -> Reply:
        operation, kwargs = decode(self.ops, caller.role, op, args)
        method = getattr(self.service, operation.method)
        result = await (method(caller, blob, **kwargs) if operation.payload else method(caller, **kwargs))
        return result if isinstance(result, tuple) else (result, None)


def _check(op: str, p: Param, value: Any) -> None:
    if value is None and fits(None, p.type):
        return
    if callable(p.say):
        p.say(value)  # raises with the operation's own words
    elif not fits(value, p.type):
        raise ProtocolError(p.say if isinstance(p.say, str) else f"{op}: {p.name} must be {describe(p.type)}")


def fits(value: Any, tp: Any) -> bool:
    """Whether a decoded JSON ``value`` is of type ``tp`` (a bool is not a number here)."""
    origin = get_origin(tp)
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    if origin is Union or origin is types.UnionType:
        return any(fits(value, t) for t in get_args(tp))
    if origin is Annotated:
        return fits(value, get_args(tp)[0])
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        inner = get_args(tp)
        return isinstance(value, list) and (not inner or all(fits(x, inner[0]) for x in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe(t) for t in get_args(tp) if t is not type(None))
    if origin is list:
        inner = get_args(tp)
        return f"a list of {describe(inner[0]) if inner else 'values'}"
    names = {str: "text", int: "a whole number", float: "a number", bool: "true or false", dict: "an object"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))
