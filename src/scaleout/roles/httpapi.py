"""The HTTP door to the admin service: ``/api/v1`` on the controller's own port and TLS.

A second thin door beside the websocket one (roles/door.py), over the same operations: a
route names an operation; its path, query and JSON body become the operation's keyword
arguments (a query value is read as the type the service's signature declares); then the
websocket door's ``Door.call`` checks the role (core/permissions.py) and the types and calls
the service. The same tokens (``Authorization: Bearer``). Answers are the service's own
dicts as JSON, errors ``{"error": {"code", "message"}}`` with the HTTP status the error's
class stands for. ``/api/v1/openapi.json`` is generated from the route table and the
service's parameter types (door.operations), not written by hand.

This module never imports the controller: it is given what it needs (``HttpDoor``'s arguments).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import shutil
import tempfile
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import unquote

from scaleout.core import errors, permissions
from scaleout.core.config import SessionConfig
from scaleout.roles.admin import AdminService, Caller
from scaleout.roles.common import audit_actor
from scaleout.roles.door import Door, Operation, Reply
from scaleout.transport.httpd import BodyTooLarge, Request, Response, error_response, json_response
from scaleout.transport.link import Hashed, Pieces

log = logging.getLogger("scaleout.controller.http")

PREFIX = "/api/v1"
MAX_JSON = 1 << 20  # a JSON request body (session settings); uploads are bounded by --max-payload

# What each error class stands for; the first match wins, anything else a ScaleoutError is 500.
STATUS: tuple[tuple[type[errors.ScaleoutError], int], ...] = (
    (errors.LimitExceeded, 413),
    (errors.AuthError, 403),  # authenticated, but the role (or a join token) may not
    (errors.NotFoundError, 404),
    (errors.ConflictError, 409),
    (errors.RateLimited, 429),
    (errors.StorageError, 500),  # the controller's disk, not the request
    (errors.ProtocolError, 400),
    (errors.ConfigError, 400),
    (errors.PayloadError, 400),
    (errors.PackageError, 400),
    (errors.UpdateRejected, 400),
)


@dataclass(frozen=True)
class Route:
    """``METHOD /api/v1PATH`` calls the service operation ``op``.

    ``body``: None (arguments from the path and query), "json" (and a JSON object), or
    "package"/"model" (the body is the file, streamed to disk; arguments from the query).
    ``rename``: route argument -> the operation's. ``hide``: the operation's arguments this
    route does not offer. ``listing``: the key of the list an ``n_max`` query cuts.
    ``view``: what is answered instead of the operation's result (given a ``call`` that goes
    through the door, and the arguments). ``extra``: a dataclass whose fields document the
    JSON arguments an operation taking ``**config`` accepts.
    """

    method: str
    path: str
    op: str
    summary: str
    body: str | None = None
    rename: Mapping[str, str] = field(default_factory=dict)
    hide: tuple[str, ...] = ()
    listing: str | None = None
    view: Callable[[Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]], dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
    extra: type | None = None
    download: bool = False

    @property
    def path_names(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    def arg(self, name: str) -> str:
        return self.rename.get(name, name)

    def offered(self, operation: Operation) -> dict[str, Any]:
        """The route's argument names (path ones excluded) -> the operation's Param."""
        back = {v: k for k, v in self.rename.items()}
        return {back.get(p.name, p.name): p for p in operation.params.values() if p.name not in self.hide and back.get(p.name, p.name) not in self.path_names}


async def _rounds(call: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]], args: dict[str, Any]) -> dict[str, Any]:
    session = (await call("session.show", args))["session"]
    return {"session_id": session["id"], "rounds": session["rounds"]}


ROUTES: tuple[Route, ...] = (
    Route("GET", "/status", "status", "The controller: its address, the global model, the active package, the running session"),
    Route("GET", "/clients", "client.ls", "The clients, online or not", listing="clients"),
    Route("GET", "/combiners", "combiner.ls", "The combiners, online or not", listing="combiners"),
    Route("GET", "/models", "model.ls", "The model trail (of one session with session_id)", listing="models"),
    Route("GET", "/models/{id}", "model.show", "One model and its tensors (id: a unique prefix, or active)"),
    Route("GET", "/models/{id}/download", "model.get", "A model's safetensors bytes (id: a unique prefix, or active)", download=True),
    Route("GET", "/sessions", "session.ls", "Every session, oldest first", listing="sessions"),
    Route("GET", "/sessions/{id}", "session.show", "One session and its rounds"),
    Route("GET", "/sessions/{id}/rounds", "session.show", "A session's rounds", view=_rounds),
    Route("GET", "/metrics", "metric.ls", "What clients logged with log_metric, oldest first"),
    Route("GET", "/validations", "validation.ls", "Each client's validation of each round's model, oldest first (n_max: the latest N)",
          rename={"n_max": "limit"}),
    Route("POST", "/sessions", "session.start", "Start a session (the body: its settings)", body="json", extra=SessionConfig),
    Route("POST", "/sessions/{id}/stop", "session.stop", "Stop a running session", body="json"),
    Route("POST", "/sessions/{id}/continue", "session.continue", "Run more rounds of a finished or stopped session", body="json"),
    Route("POST", "/packages", "package.set_active", "Upload a compute package (the body: a .tgz) and make it the active one", body="package"),
    Route("POST", "/models", "model.set_seed", "Upload a seed model (the body: a .npz or .safetensors file)", body="model"),
)


class HttpDoor:
    """HTTP requests -> calls of the admin service, through the websocket door's ``Door``.

    ``authenticate(token)`` returns a token's claims or raises AuthError (the controller's,
    as at a websocket handshake); ``authorize(claims, op)`` refuses what a link of those
    claims could not do either beyond the roles table (a join token, an unregistered
    combiner); ``call`` is the door's call (with the controller's accounting around it).
    """

    def __init__(
        self, door: Door, authenticate: Callable[[str | None], Any], authorize: Callable[[Any, str], None], *,
        max_payload: int, upload_dir: Path, call: Callable[[Caller, str, Mapping[str, Any], bytes | None], Awaitable[Reply]] | None = None,
    ) -> None:
        self.door, self.authenticate, self.authorize = door, authenticate, authorize
        self.call = call or door.call
        self.max_payload = max_payload
        self.upload_dir = upload_dir
        self._openapi: bytes | None = None
        for stale in upload_dir.glob(".upload-*"):  # left by a controller killed during an upload (one holds the data dir)
            shutil.rmtree(stale, ignore_errors=True)

    async def handle(self, request: Request) -> Response:
        what = f"{request.method} {request.path}"
        try:
            response = await self._handle(request)
        except errors.ScaleoutError as exc:
            status = next((s for cls, s in STATUS if isinstance(exc, cls)), 500)
            if status == 500:
                log.error("%s from %s: %s", what, request.peer, exc)
            response = error_response(status, exc.code, str(exc))
        log.debug("%s from %s: %d", what, request.peer, response.status)
        return response

    async def _handle(self, request: Request) -> Response:
        if request.path in (f"{PREFIX}/openapi.json", f"{PREFIX}/openapi.json/"):
            if request.method != "GET":
                return error_response(405, "method_not_allowed", f"{request.path} takes GET", {"Allow": "GET"})
            if self._openapi is None:
                self._openapi = json.dumps(openapi(self.door.ops, type(self.door.service))).encode()
            return Response(200, self._openapi)
        route, path_args, allowed = match(request.method, request.path)
        if route is None:
            if allowed:
                return error_response(405, "method_not_allowed", f"{request.path} takes {', '.join(allowed)}, not {request.method}", {"Allow": ", ".join(allowed)})
            return error_response(404, "not_found", f"no route {request.method} {request.path}; the routes are listed at {PREFIX}/openapi.json")
        token = _bearer(request.headers.get("authorization", ""))
        if token is None:
            return _unauthorized("no token given: send the header Authorization: Bearer TOKEN (an admin's is in the controller's data directory, admin.token)")
        try:
            claims = self.authenticate(token)
        except errors.AuthError as exc:
            return _unauthorized(str(exc))
        permissions.check_request(claims.role, route.op)  # before a body is read: the one table
        self.authorize(claims, route.op)
        caller = Caller(claims.role, audit_actor(Claimed(claims)), request.peer)
        operation = self.door.ops[route.op]
        args = _query_args(route, operation, request.query)
        for name, value in path_args.items():
            args[route.arg(name)] = None if route.download and value == "active" else value
        if route.body == "json":
            for name, value in (await _json_body(request)).items():
                if route.arg(name) in args:
                    raise errors.ProtocolError(f"{name} is given twice (in the path or query, and in the body)")
                args[route.arg(name)] = value
        n_max = args.pop("n_max", None)
        if route.body in ("package", "model"):
            return await self._upload(request, route, caller, args)

        async def call(op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
            return (await self.call(caller, op, kwargs, None))[0]

        if route.view is not None:
            return json_response(200, await route.view(call, args))
        result, blob = await self.call(caller, route.op, args, None)
        if route.download:
            assert isinstance(blob, Hashed)
            headers = {"Content-Disposition": f'attachment; filename="{result["id"]}.safetensors"', "ETag": f'"{result["id"]}"'}
            body = b"".join(blob.data.parts) if isinstance(blob.data, Pieces) else blob.data  # a model from the store: bytes, or its file mapped
            return Response(200, body, "application/octet-stream", headers)
        if route.listing and n_max is not None:
            result = {**result, route.listing: result[route.listing][:n_max]}
        return json_response(200, result)

    async def _upload(self, request: Request, route: Route, caller: Caller, args: dict[str, Any]) -> Response:
        """The body to a file in the data directory (streamed), then the service called with its bytes
        (read in a worker thread: the service takes bytes)."""
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".upload-", dir=self.upload_dir))
        try:
            path = tmp / "body"
            if not await request.save(path, self.max_payload):
                raise errors.ProtocolError(f"{route.op} needs the file as the request body")
            if route.body == "model":
                data = await asyncio.to_thread(_model_file, path, self.max_payload)
            else:
                data = await asyncio.to_thread(path.read_bytes)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
        result, _ = await self.call(caller, route.op, args, data)
        return json_response(200, result)


@dataclass(frozen=True)
class Claimed:
    """What audit_actor and the desk read of a link, for a request over HTTP: its token's claims."""

    claims: Any


def _model_file(path: Path, limit: int) -> bytes:
    """The safetensors bytes of an uploaded .npz or .safetensors file (told apart by their
    first bytes); an .npz whose arrays unpack to more than ``limit`` bytes is refused unread."""
    import zipfile

    from scaleout.package.seed import read_model_file

    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    named = path.rename(path.with_suffix(".npz" if zipped else ".safetensors"))
    try:
        if zipped:
            with zipfile.ZipFile(named) as z:  # each member is read up to its declared size, no further
                size = sum(i.file_size for i in z.infolist())
            if size > limit:
                raise BodyTooLarge(size, limit, "the model's arrays, unpacked,")
        return read_model_file(named)
    except (errors.PackageError, zipfile.BadZipFile) as exc:
        raise errors.PayloadError(f"the body is not a .npz or .safetensors model: {exc.__cause__ or exc}") from None


def _bearer(value: str) -> str | None:
    """The token of an ``Authorization: Bearer`` header; a join token as ``token create``
    prints it (SCALEOUT-1.<...>) gives the credential inside it."""
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    from scaleout.security import jointoken

    if jointoken.is_join_token(token):
        try:
            return jointoken.parse(token).token
        except errors.AuthError:
            return token  # refused below, in the words of the token check
    return token


def _unauthorized(message: str) -> Response:
    return error_response(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="scaleout"'})


def match(method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
    """The route for ``method`` and ``path`` with its path arguments; else the methods the path takes."""
    if not path.startswith(PREFIX + "/"):
        return None, {}, []
    parts = path[len(PREFIX) :].rstrip("/").split("/")
    allowed: list[str] = []
    for route in ROUTES:
        pattern = route.path.split("/")
        if len(pattern) != len(parts):
            continue
        got = {}
        for want, part in zip(pattern, parts):
            if want.startswith("{"):
                if not part:
                    break
                got[want[1:-1]] = unquote(part)
            elif want != part:
                break
        else:
            if route.method == method:
                return route, got, []
            allowed.append(route.method)
    return None, {}, allowed


def _query_args(route: Route, operation: Operation, query: Mapping[str, list[str]]) -> dict[str, Any]:
    """Query parameters as the operation's keyword arguments, each read as the type its
    signature declares (a value that reads as none of them is passed as text, and the door
    refuses it in the operation's own words)."""
    offered = route.offered(operation)
    args: dict[str, Any] = {}
    for name, values in query.items():
        if route.listing and name == "n_max":
            if len(values) != 1 or not re.fullmatch(r"[0-9]{1,9}", values[0]):
                raise errors.ProtocolError(f"n_max must be a whole number >= 0, got {values[-1][:40]!r}")
            args["n_max"] = int(values[0])
            continue
        p = offered.get(name)
        if p is None:
            takes = ", ".join(list(offered) + (["n_max"] if route.listing else [])) or "no query parameters"
            raise errors.ProtocolError(f"{route.method} {PREFIX}{route.path}: unknown query parameter {name!r} (it takes {takes})")
        if _list_of(p.type) is not None:
            args[route.arg(name)] = [_from_text(v, _list_of(p.type)) for v in values]
        elif len(values) > 1:
            raise errors.ProtocolError(f"query parameter {name!r} is given {len(values)} times")
        else:
            args[route.arg(name)] = _from_text(values[0], p.type)
    return args


def _alternatives(tp: Any) -> list[Any]:
    if get_origin(tp) is Annotated:
        return _alternatives(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return [t for a in get_args(tp) for t in _alternatives(a)]
    return [tp]


def _list_of(tp: Any) -> Any:
    for t in _alternatives(tp):
        if get_origin(t) is list:
            return (get_args(t) or (str,))[0]
    return None


def _from_text(text: str, tp: Any) -> Any:
    kinds = _alternatives(tp)
    if bool in kinds and text.lower() in ("true", "false", "1", "0"):
        return text.lower() in ("true", "1")
    if int in kinds and re.fullmatch(r"-?[0-9]{1,18}", text):
        return int(text)
    if float in kinds:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    return text


async def _json_body(request: Request) -> dict[str, Any]:
    data = await request.read(MAX_JSON)
    if not data.strip():
        return {}
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise errors.ProtocolError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise errors.ProtocolError(f"the body must be a JSON object, got {type(value).__name__}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# -- the OpenAPI document ---------------------------------------------------------------------------


def schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of a parameter type of the service."""
    if get_origin(tp) is Annotated:
        return schema(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        parts = [schema(t) for t in get_args(tp)]
        simple = [p.get("type") for p in parts]
        if all(isinstance(t, str) for t in simple) and all(len(p) == 1 for p in parts):
            return {"type": simple}
        return {"anyOf": parts}
    if tp is type(None) or tp is None:
        return {"type": "null"}
    if get_origin(tp) is list:
        inner = get_args(tp)
        return {"type": "array", "items": schema(inner[0]) if inner else {}}
    named = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object"}
    key = get_origin(tp) or tp
    return {"type": named[key]} if key in named else {}


def _not_null(s: dict[str, Any]) -> dict[str, Any]:
    """A query or path parameter's schema: absent is its null."""
    t = s.get("type")
    if isinstance(t, list):
        rest = [x for x in t if x != "null"]
        return {"type": rest[0] if len(rest) == 1 else rest}
    if "anyOf" in s:
        rest = [x for x in s["anyOf"] if x != {"type": "null"}]
        return rest[0] if len(rest) == 1 else {"anyOf": rest}
    return s


def _described(s: dict[str, Any], say: Any) -> dict[str, Any]:
    return {**s, "description": say} if isinstance(say, str) else s


def _json_value(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


ERRORS = {
    "400": "Bad input: a malformed request, an unknown argument or one of the wrong type",
    "401": "No token, or one the controller does not accept",
    "403": "The token's role may not do this",
    "404": "No such session, model, ...",
    "409": "Conflicts with the controller's state (a session is running, ...)",
    "413": "The request body is larger than this request takes",
    "429": "Too many connections from this address: retry after Retry-After seconds",
}


def openapi(ops: Mapping[str, Operation], service: type = AdminService, routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document of /api/v1: each route's parameters and their types are
    read from the operation it calls (door.operations), as the door reads them."""
    from scaleout import __version__

    paths: dict[str, Any] = {}
    for route in routes:
        operation = ops[route.op]
        doc = _doc(service, operation)
        params: list[dict[str, Any]] = []
        for name in route.path_names:
            p = operation.params[route.arg(name)]
            params.append(_described({"name": name, "in": "path", "required": True, "schema": _not_null(schema(p.type))}, p.say))
        offered = route.offered(operation)
        item: dict[str, Any] = {
            "operationId": f"{route.method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', route.path).rstrip('_')}",
            "summary": route.summary,
            "tags": [route.path.split("/")[1]],
            "x-scaleout-operation": route.op,
        }
        if doc:
            item["description"] = doc
        if route.body == "json":
            properties: dict[str, Any] = {}
            required = []
            if route.extra is not None:
                hints = get_type_hints(route.extra)
                for f in dataclasses.fields(route.extra):
                    prop = schema(hints[f.name])
                    if f.default is not dataclasses.MISSING and _json_value(f.default):
                        prop["default"] = f.default
                    properties[f.name] = prop
            for name, p in offered.items():
                properties[name] = _described(schema(p.type), p.say)
                if p.required:
                    required.append(name)
            body_schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": operation.more and route.extra is None}
            if required:
                body_schema["required"] = required
            item["requestBody"] = {"required": False, "content": {"application/json": {"schema": body_schema}}}
        else:
            for name, p in offered.items():
                params.append(_described({"name": name, "in": "query", "required": p.required, "schema": _not_null(schema(p.type))}, p.say))
            if route.body is not None:
                media = {"package": "application/gzip", "model": "application/octet-stream"}[route.body]
                item["requestBody"] = {"required": True, "content": {media: {"schema": {"type": "string", "contentMediaType": media}}}}
        if route.listing:
            params.append({"name": "n_max", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
                           "description": f"at most this many {route.listing}, the first ones"})
        if params:
            item["parameters"] = params
        ok = ({"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}} if route.download
              else {"application/json": {"schema": {"type": "object"}}})
        item["responses"] = {"200": {"description": "OK", "content": ok}, **{code: {"$ref": f"#/components/responses/{code}"} for code in ERRORS}}
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = item
    paths[f"{PREFIX}/openapi.json"] = {"get": {
        "operationId": "get_openapi", "summary": "This document", "tags": ["openapi"], "security": [],
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}},
    }}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    }}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Scaleout controller", "version": __version__,
                 "description": "The admin operations of a Scaleout controller, on its own port and TLS. "
                                "Send the same tokens as the websocket link: Authorization: Bearer TOKEN."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": error},
            "responses": {code: {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                          for code, text in ERRORS.items()},
        },
    }


def _doc(service: type, operation: Operation) -> str | None:
    """The first paragraph of the service method's docstring."""
    doc = getattr(getattr(service, operation.method, None), "__doc__", None)
    return " ".join(doc.split("\n\n")[0].split()) if doc else None


__all__ = ["ROUTES", "Claimed", "HttpDoor", "Route", "openapi"]
