"""The server-functions worker: ``python -m scaleout.roles.sfn_worker MEMORY_BYTES``.

One per session, started by the controller (roles/serverfunctions.py), talking frames
(core/serverfunctions.py) over its stdin and stdout. It runs the user's ``ServerFunctions``
class: the file's source is compiled here, never in the controller; the user's imports go
through a guard that lets only the allowed modules in; what the class prints (and logs)
goes back to the controller line by line; its address space is capped (RLIMIT_AS).

Requests: ``load`` (source, file, state), ``call`` (method, args), ``state`` (the pickled
attributes). Answers: ``ready``, ``result``, ``error`` (message, where), and on the way
``print`` (a line) and ``api`` (a question for the controller, answered by ``answer``).
"""

from __future__ import annotations

import builtins
import inspect
import io
import logging
import os
import pickle
import sys
import traceback
import types
from typing import Any, BinaryIO

from scaleout.core import serverfunctions as sf
from scaleout.core.errors import ServerFunctionsError


class _Lines(io.TextIOBase):
    """sys.stdout/sys.stderr of the user's code: each line goes to the controller."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buf = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.worker.send({"op": "print", "line": line[:4000]})
        return len(text)

    def flush(self) -> None:
        if self.buf:
            line, self.buf = self.buf, ""
            self.worker.send({"op": "print", "line": line[:4000]})


class _Refused(ImportError):
    """An import the guard refused (its message says which and what is allowed)."""


class _Unpickler(pickle.Unpickler):
    """The class's saved attributes: plain data and numpy arrays only."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in ("builtins", "numpy", "collections", "copyreg", "_codecs", "datetime", "fractions", "decimal"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not restored")


class Worker:
    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        self.inp, self.out = inp, out
        self.instance: Any = None
        self.file = "server_functions.py"
        self.selection_takes_round = True

    # -- frames ---------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(sf.encode(message))
        self.out.flush()

    def receive(self) -> dict[str, Any] | None:
        prefix = self.inp.read(4)
        if len(prefix) < 4:
            return None
        size = sf.frame_size(prefix)
        body = self.inp.read(size)
        if len(body) < size:
            return None
        return sf.decode(body)

    def ask(self, name: str, args: list[Any]) -> Any:
        """api_client's question to the controller; its answer (or its error, raised)."""
        self.send({"op": "api", "name": name, "args": args})
        reply = self.receive()
        if reply is None:
            raise SystemExit(0)
        if reply.get("error"):
            raise RuntimeError(f"api_client.{name}: {reply['error']}")
        return reply.get("value")

    # -- the user's file --------------------------------------------------------------------

    def _import(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level == 0 and sf.allowed(name):
            return builtins.__import__(name, globals, locals, fromlist, level)
        what = name if level == 0 else "." * level + name
        raise _Refused(f"server functions may not import {what}; they may import numpy, random, math, typing, collections, "
                       "scaleoututil.serverfunctions.allowed_import and serverfunctionsbase (see the README)")

    def load(self, source: str, file: str, state: bytes | None) -> dict[str, Any]:
        self.file = file
        guarded = dict(vars(builtins))
        guarded["__import__"] = self._import
        namespace: dict[str, Any] = {"__name__": "server_functions", "__file__": file, "__builtins__": guarded}
        code = compile(source, file, "exec")
        module = types.ModuleType("server_functions")
        module.__file__ = file
        sys.modules["server_functions"] = module
        exec(code, namespace)
        module.__dict__.update(namespace)
        cls = namespace.get(sf.CLASS_NAME)
        if not inspect.isclass(cls):
            raise ServerFunctionsError(f"{file} defines no class named {sf.CLASS_NAME} (class ServerFunctions(ServerFunctionsBase): ...)")
        self.instance = cls()
        if state:
            saved = _Unpickler(io.BytesIO(state)).load()
            if isinstance(saved, dict):
                self.instance.__dict__.update(saved)
        methods = [m for m in sf.METHODS if self._defined(cls, m)]
        if "client_selection" in methods:
            params = [p for p in inspect.signature(getattr(self.instance, "client_selection")).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            self.selection_takes_round = len(params) >= 2
        return {"methods": methods, "round_type": self.selection_takes_round}

    def _defined(self, cls: type, name: str) -> bool:
        fn = getattr(cls, name, None)
        code = getattr(fn, "__code__", None)
        return code is not None and code.co_filename == self.file

    def call(self, method: str, args: list[Any]) -> Any:
        from scaleoututil.serverfunctions.serverfunctionsbase import RoundType

        fn = getattr(self.instance, method)
        if method == "client_selection":
            ids, kind = args
            if not self.selection_takes_round:  # FEDn's form: training rounds only
                return fn(ids) if kind == "training" else None
            return fn(ids, RoundType(kind))
        if method == "aggregate":
            previous, updates = args
            return fn(previous, {name: (params, meta) for name, (params, meta) in updates.items()})
        return fn(*args)

    def state(self) -> dict[str, Any]:
        """The instance's attributes, pickled (those that cannot be are left out and named)."""
        attrs = dict(vars(self.instance)) if self.instance is not None else {}
        dropped: list[str] = []
        try:
            data = pickle.dumps(attrs, protocol=4)
        except Exception:  # noqa: BLE001 - some attribute is not picklable: keep the others
            keep = {}
            for k, v in attrs.items():
                try:
                    pickle.dumps(v, protocol=4)
                    keep[k] = v
                except Exception:  # noqa: BLE001
                    dropped.append(k)
            data = pickle.dumps(keep, protocol=4)
        if len(data) > sf.MAX_STATE:
            return {"state": None, "dropped": sorted(attrs), "why": f"its attributes pickle to {len(data)} bytes, more than {sf.MAX_STATE} are kept"}
        return {"state": data, "dropped": dropped}

    def where(self, exc: BaseException) -> str | None:
        """The last line of the user's file in ``exc``'s traceback: ``file:line in method``."""
        found = None
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename == self.file:
                found = f"{frame.filename}:{frame.lineno} in {frame.name}"
        if found is None and isinstance(exc, SyntaxError) and exc.filename == self.file:
            found = f"{exc.filename}:{exc.lineno}"
        return found

    # -- the loop -------------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            msg = self.receive()
            if msg is None:
                return
            op = msg.get("op")
            try:
                if op == "load":
                    value: Any = self.load(msg["source"], msg["file"], msg.get("state"))
                elif op == "call":
                    value = self.call(msg["method"], msg["args"])
                elif op == "state":
                    value = self.state()
                else:
                    raise ServerFunctionsError(f"unknown request {op!r}")
                sys.stdout.flush()
                try:
                    reply = sf.encode({"op": "result", "value": value})
                except ServerFunctionsError as exc:
                    raise ServerFunctionsError(f"{msg.get('method', op)} returned what cannot be used: {exc}") from None
                limit = msg.get("limit")
                if isinstance(limit, int) and len(reply) > limit:  # the controller would refuse it unread: say so, serve on
                    raise ServerFunctionsError(f"{msg.get('method', op)} returned {len(reply)} bytes; at most {limit} are taken")
                self.out.write(reply)
                self.out.flush()
            except BaseException as exc:  # noqa: BLE001 - the user's code: everything is reported, nothing kills the worker
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                sys.stdout.flush()
                text = exc.problem if isinstance(exc, ServerFunctionsError) else str(exc) if isinstance(exc, _Refused) else f"{type(exc).__name__}: {exc}"
                self.send({"op": "error", "message": text[:2000], "where": self.where(exc)})


def _fedn_modules() -> None:
    """FEDn's module names for its form of server functions (only in this process)."""
    from scaleoututil.serverfunctions import allowed_import, fedn_hooks

    log_config = types.ModuleType("fedn.common.log_config")
    log_config.logger = allowed_import.logger  # type: ignore[attr-defined]
    hooks_allowed = types.ModuleType("fedn.network.combiner.hooks.allowed_import")
    for name in ("Dict", "List", "Tuple", "Optional", "np", "random", "api_client"):
        setattr(hooks_allowed, name, getattr(allowed_import, name))
    hooks_allowed.ServerFunctionsBase = fedn_hooks.ServerFunctionsBase  # type: ignore[attr-defined]
    hooks_allowed.logger = allowed_import.logger  # type: ignore[attr-defined]
    modules = {
        "fedn.network.combiner.hooks.serverfunctionsbase": fedn_hooks,
        "fedn.network.combiner.hooks.allowed_import": hooks_allowed,
        "fedn.common.log_config": log_config,
    }
    packages = {".".join(full.split(".")[:i]) for full in modules for i in range(1, full.count(".") + 1)}
    for name in sorted(packages):
        pkg = types.ModuleType(name)
        pkg.__path__ = []  # type: ignore[attr-defined]  # a package whose children are the ones set here
        sys.modules[name] = pkg
    sys.modules.update(modules)
    for full in sorted(packages | set(modules)):
        parent, _, child = full.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[full])


def main(argv: list[str]) -> int:
    memory = int(argv[0]) if argv else sf.MEMORY_LIMIT
    if memory > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    inp = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # stray writes to fd 1 must not break the frames
    worker = Worker(inp, out)
    sys.stdout = _Lines(worker)
    sys.stderr = _Lines(worker)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    from scaleoututil.serverfunctions import _channel

    _channel._ask = worker.ask
    _fedn_modules()
    try:
        worker.serve()
    except (KeyboardInterrupt, SystemExit, BrokenPipeError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
