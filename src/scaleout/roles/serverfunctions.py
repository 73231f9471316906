"""Server functions at the controller: the user's ``ServerFunctions`` class (Scaleout Edge's
API) run in a worker process of its own, one per session (roles/sfn_worker.py).

- a time limit per call (``--server-functions-timeout``): a call that does not return in
  time has its worker killed and started again from the class's last kept state;
- a memory limit (the worker's address space, ``MEMORY_LIMIT``) and an import guard;
- a call that raises, hangs or returns the wrong thing is logged with the file and line in
  the user's class, recorded on the round (its ``server_functions`` field) and the built-in
  behaviour is used for that call: the round goes on;
- what the class prints goes to the controller's log, one line each, marked with the
  session and round;
- the class's attributes are pickled (in the worker) after each round and committed with
  the round's server state (``STATE_KEY``), so a resumed or continued session gets them back.

The hooks are called from roles/sessions.py: ``select`` (training and validation rounds,
after the built-in selection), ``settings`` (merged over --settings) and ``wrap`` (the
round's strategy: the class's ``aggregate`` where it defines one, and its state kept).
Everything that talks to the worker blocks, so it runs off the event loop, in the session's
own thread (``SessionFunctions.run``): a call that hangs never holds the shared thread pool.
What the worker sends is bounded: a frame longer than the call's answer may be
(``reply_limit``) is refused before it is read, and a call logs at most ``MAX_LINES`` lines
(``MAX_LOG_BYTES`` bytes, each clipped to ``MAX_LINE`` characters) of what it prints.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from scaleout.core import payload
from scaleout.core import serverfunctions as sf
from scaleout.core.aggregators.strategy import ClientUpdate, Strategy, Tensors
from scaleout.core.errors import ConfigError, ServerFunctionsError

log = logging.getLogger("scaleout.controller")
Answer = Callable[[str, list[Any]], Any]
MAX_LINES = 100  # lines of print one call may put in the controller's log
MAX_LOG_BYTES = 64 << 10  # and their characters
MAX_LINE = 300  # characters of one line


class _BadFrame(Exception):
    """What the worker sent is not a frame of this exchange: the worker is started again."""


def worker_command() -> tuple[list[str], dict[str, str]]:
    """How to start a worker with the same scaleout as this one (source, zipapp or frozen)."""
    from scaleout.package.interpreter import AS_PYTHON_ENV, library_homes
    from scaleout.runtime import build_kind

    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    if build_kind() == "frozen":
        env[AS_PYTHON_ENV] = "1"
    else:
        homes = [str(h) for h in library_homes()]
        env["PYTHONPATH"] = os.pathsep.join([*homes, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return [sys.executable, "-m", "scaleout.roles.sfn_worker"], env


class Runner:
    """One worker and the frames to and from it. Synchronous: call from a thread."""

    def __init__(self, source: str, file: str, timeout: float, answer: Answer, on_line: Callable[[str], None],
                 memory: int = sf.MEMORY_LIMIT) -> None:
        self.source, self.file, self.timeout, self.memory = source, file, timeout, memory
        self.answer, self.on_line = answer, on_line
        self.proc: subprocess.Popen[bytes] | None = None
        self.methods: frozenset[str] = frozenset()
        self.saved: bytes | None = None  # the class's state a restarted worker starts from
        self.broken: str | None = None  # the worker could not be started again: every call falls back
        self.lock = threading.Lock()
        self._buf = bytearray()

    # -- the process ----------------------------------------------------------------------------

    def start(self, state: bytes | None = None) -> None:
        """Start the worker and load the class (ServerFunctionsError: it does not load)."""
        self.saved = state
        with self.lock:
            self._spawn()

    def _spawn(self) -> None:
        argv, env = worker_command()
        self._buf.clear()
        self.proc = subprocess.Popen([*argv, str(self.memory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        try:
            info = self._request({"op": "load", "source": self.source, "file": self.file, "state": self.saved}, "loading the class", max(self.timeout, 30.0), restart=False,
                                 limit=sf.MAX_REPLY)
        except ServerFunctionsError:
            self._kill()
            raise
        methods = info.get("methods") if isinstance(info, dict) else None
        if not isinstance(methods, list):
            self._kill()
            raise ServerFunctionsError(f"the worker answered the load with {str(info)[:60]}")
        self.methods = frozenset(m for m in methods if m in sf.METHODS)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def stop(self) -> None:
        """Kill the worker now, even in the middle of a call (that call then fails: the
        session is over or the controller stops), and start no other. Does not block."""
        self.broken = "the session's server functions were closed"
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self) -> None:
        """``stop``, then wait for the worker to be gone."""
        self.stop()
        with self.lock:
            self._kill()

    # -- calls ------------------------------------------------------------------------------------

    def call(self, method: str, *args: Any, limit: int | None = None) -> Any:
        """The method's result; ServerFunctionsError when it raised, timed out, the worker
        died or sent what cannot be read, or its answer is more than ``limit`` bytes
        (default: ``reply_limit(method)``)."""
        limit = sf.reply_limit(method) if limit is None else limit
        with self.lock:
            if self.broken is not None:
                raise ServerFunctionsError(f"not called: {self.broken}")
            if self.proc is None:
                self._restart()
            return self._request({"op": "call", "method": method, "args": list(args), "limit": limit}, method, self.timeout, limit=limit)

    def snapshot(self) -> bytes | None:
        """The class's attributes, pickled; kept as the state a restarted worker resumes from."""
        with self.lock:
            if self.broken is not None or self.proc is None:
                return self.saved
            info = self._request({"op": "state", "limit": sf.reply_limit("state")}, "saving its state", self.timeout, limit=sf.reply_limit("state"))
        if not isinstance(info, dict) or not (info.get("state") is None or isinstance(info["state"], bytes)):
            raise ServerFunctionsError(f"saving its state: the worker answered {str(info)[:60]}")
        if info.get("why"):
            log.warning("server functions: its state is not kept: %s", info["why"])
        elif info.get("dropped"):
            log.warning("server functions: attributes %s cannot be pickled: they are not kept across a restart", ", ".join(info["dropped"]))
        if info.get("state") is not None:
            self.saved = info["state"]
        return self.saved

    def _restart(self) -> None:
        self._kill()
        if self.broken is not None:
            return
        try:
            self._spawn()
        except ServerFunctionsError as exc:
            self.broken = f"the server-functions worker could not be started again: {exc}"
            log.error("%s; the built-in behaviour is used for the rest of the session", self.broken)

    def _request(self, message: dict[str, Any], what: str, timeout: float, restart: bool = True, limit: int = sf.MAX_REPLY) -> Any:
        deadline = time.monotonic() + timeout
        shown = shown_bytes = hidden = 0
        try:
            self._write(sf.encode(message), deadline)
            while True:
                reply = self._read(deadline, limit)
                op = reply.get("op")
                if op == "print":
                    line = str(reply.get("line", ""))[:MAX_LINE]
                    if shown < MAX_LINES and shown_bytes + len(line) <= MAX_LOG_BYTES:
                        shown, shown_bytes = shown + 1, shown_bytes + len(line)
                        self.on_line(line)
                    else:
                        hidden += 1
                elif op == "api":
                    args = reply.get("args")
                    self._write(sf.encode(self._answer(str(reply.get("name"))[:100], args if isinstance(args, list) else [])), deadline)
                elif op == "result":
                    return reply.get("value")
                elif op == "error":
                    where = reply.get("where")
                    raise ServerFunctionsError(str(reply.get("message"))[:2000], where[:300] if isinstance(where, str) else None)
                else:
                    raise _BadFrame(f"a frame of op {str(op)[:40]!r}")
        except TimeoutError:
            problem = f"{what} did not return within {timeout:g} s (--server-functions-timeout)"
        except (EOFError, OSError) as exc:
            try:
                code = self.proc.wait(5) if self.proc is not None else None
            except subprocess.TimeoutExpired:
                code = None
            problem = f"the server-functions worker exited during {what} (code {code}{': out of memory?' if code else ''}; {exc or 'its pipe closed'})"
        except _BadFrame as exc:
            problem = f"the server-functions worker sent what cannot be taken during {what}: {exc}"
        finally:
            if hidden:
                self.on_line(f"... {hidden} more lines not shown")
        if restart:
            self._restart()
            problem += ": the worker was started again"
        raise ServerFunctionsError(problem, self.file)

    def _answer(self, name: str, args: list[Any]) -> dict[str, Any]:
        try:
            return {"op": "answer", "value": self.answer(name, args)}
        except Exception as exc:  # the role edge: a bad question gets an error, the worker goes on
            return {"op": "answer", "error": f"{type(exc).__name__}: {exc}"}

    # -- bytes --------------------------------------------------------------------------------------

    def _write(self, data: bytes, deadline: float) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            _, ready, _ = select.select([], [fd], [], left)
            if ready:
                try:
                    n = os.write(fd, view[: 1 << 20])
                except BlockingIOError:
                    continue
                view = view[n:]

    def _read(self, deadline: float, limit: int) -> dict[str, Any]:
        """The next frame; _BadFrame (nothing more read) when its declared size is over
        ``limit``, or it does not decode."""
        prefix = self._exactly(4, deadline)
        try:
            size = sf.frame_size(prefix, limit)
        except ServerFunctionsError as exc:
            raise _BadFrame(exc.problem) from None
        body = self._exactly(size, deadline)
        try:
            return sf.decode(body)
        except ServerFunctionsError as exc:
            raise _BadFrame(exc.problem) from None

    def _exactly(self, n: int, deadline: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, max(1 << 16, min(n - len(self._buf), 64 << 20)))
                if not chunk:
                    raise EOFError
                self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


# -- one session's server functions --------------------------------------------------------------


class SessionFunctions:
    """A session's server functions: the runner, the round it serves, the round's errors."""

    def __init__(self, session_id: str, runner: Runner) -> None:
        self.session_id = session_id
        self.runner = runner
        self.round_index = 0
        self.errors: list[dict[str, Any]] = []
        # The session's own thread for its worker calls: one that hangs (up to the timeout)
        # never holds a thread of the loop's shared pool; the runner's lock serialises them anyway.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sfn-{session_id}")
        self.closed = False

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the session's thread (after ``close``: in a shared one, where a
        call on the closed runner returns at once)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except RuntimeError:
            if not self.closed:  # only "cannot schedule new futures after shutdown" is this case
                raise
            return await asyncio.to_thread(fn, *args)

    @property
    def methods(self) -> frozenset[str]:
        return self.runner.methods

    def line(self, text: str) -> None:
        log.info("server functions [session %s round %d]: %s", self.session_id, self.round_index, text)

    def failed(self, method: str, exc: ServerFunctionsError) -> None:
        where = f" at {exc.where}" if exc.where else ""
        log.error("server functions [session %s round %d]: %s failed%s: %s; the built-in behaviour is used", self.session_id, self.round_index, method, where, exc.problem)
        self.errors.append({"method": method, "error": exc.problem, "where": exc.where})

    def begin_round(self, index: int) -> None:
        self.round_index, self.errors = index, []

    def record(self) -> dict[str, Any]:
        """What the round record says of the server functions (nothing when all went well)."""
        return {"server_functions": {"errors": list(self.errors)}} if self.errors else {}

    def close(self) -> None:
        self.runner.close()
        self.closed = True
        self.executor.shutdown(wait=False)

    # -- hooks (synchronous: in a thread) --------------------------------------------------------

    def select_sync(self, selected: Mapping[str, list[str]], round_type: str) -> dict[str, list[str]]:
        offered = sorted(c for clients in selected.values() for c in clients)
        try:
            result = self.runner.call("client_selection", offered, round_type)
            if result is None:  # FEDn's form outside training: the built-in selection
                return dict(selected)
            chosen = set(checked(sf.check_selection, result, offered))
        except ServerFunctionsError as exc:
            self.failed("client_selection", exc)
            return dict(selected)
        left = len(offered) - len(chosen)
        if left:
            log.info("round %d: server functions' client_selection left out %d of %d clients (%s round)", self.round_index, left, len(offered), round_type)
        return {k: [c for c in v if c in chosen] for k, v in selected.items() if any(c in chosen for c in v)}

    def settings_sync(self, global_bytes: bytes) -> dict[str, Any]:
        try:
            model = list(payload.read(global_bytes)[0].values())
            return checked(sf.check_settings, self.runner.call("client_settings", model))
        except ServerFunctionsError as exc:
            self.failed("client_settings", exc)
            return {}

    def aggregate_sync(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Tensors:
        """The class's aggregate (incremental where it defines it); ServerFunctionsError when it fails."""
        names = list(model)
        previous = [model[n] for n in names]
        limit = sf.reply_limit("aggregate", sf.model_bytes(model))

        def meta(u: ClientUpdate) -> dict[str, Any]:
            return {**dict(u.metadata), "num_examples": u.num_examples}

        if {"incremental_aggregate", "get_incremental_aggregate_model"} <= self.methods:
            for u in updates:  # one update at a time: the worker never holds them all
                self.runner.call("incremental_aggregate", u.client, [u.tensors[n] for n in names], meta(u), previous)
            result = self.runner.call("get_incremental_aggregate_model", limit=limit)
            return checked(sf.check_model, result, model, "get_incremental_aggregate_model")
        result = self.runner.call("aggregate", previous, {u.client: ([u.tensors[n] for n in names], meta(u)) for u in updates}, limit=limit)
        return checked(sf.check_model, result, model, "aggregate")

    def with_state(self, state: Mapping[str, np.ndarray]) -> Tensors:
        """The strategy's state plus the class's attributes (pickled by the worker)."""
        out = {k: v for k, v in state.items() if k != sf.STATE_KEY}
        try:
            data = self.runner.snapshot()
        except ServerFunctionsError as exc:
            self.failed("saving its state", exc)
            data = self.runner.saved
        if data:
            out[sf.STATE_KEY] = np.frombuffer(data, dtype=np.uint8).copy()
        return out

    # -- the round's strategy -----------------------------------------------------------------------

    def wrap(self, inner: Strategy) -> Strategy:
        """The round's strategy: ``inner`` with the class's state kept, and its aggregate
        (or incremental aggregate) where the class defines one."""
        own = "aggregate" in self.methods or {"incremental_aggregate", "get_incremental_aggregate_model"} <= self.methods
        return (ServerFunctionsAggregate if own else ServerFunctionsStrategy)(inner, self)


def checked(check: Callable[..., Any], result: Any, *args: Any) -> Any:
    """``check(result, *args)``: whatever it raises on what the worker returned is the
    call's failure (a ServerFunctionsError), never the session's."""
    try:
        return check(result, *args)
    except ServerFunctionsError:
        raise
    except Exception as exc:  # the role edge: the user's result may trip any check
        raise ServerFunctionsError(f"{check.__name__.removeprefix('check_')}: its result could not be checked ({type(exc).__name__}: {str(exc)[:200]})") from None


class ServerFunctionsStrategy(Strategy):
    """A built-in strategy whose server state also carries the server functions' state."""

    def __init__(self, inner: Strategy, functions: SessionFunctions) -> None:  # noqa: D107 - kwargs were checked by inner
        self.inner, self.functions = inner, functions
        self.kwargs = inner.kwargs
        self.name = inner.name  # type: ignore[misc]
        self.reducer = inner.reducer  # type: ignore[misc]

    def step(self, model: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        new_model, new_state = self.inner.step(model, mean, _own(state))
        return new_model, self.functions.with_state(new_state)

    def train_settings(self) -> dict[str, Any]:
        return self.inner.train_settings()  # e.g. FedProx's mu

    @property
    def needs_updates(self) -> bool:  # type: ignore[override]  # a robust inner strategy still sees each update
        return self.inner.needs_updates

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        new_model, new_state = self.inner.aggregate(model, updates, _own(state))
        return new_model, self.functions.with_state(new_state)

    def __getattr__(self, name: str) -> Any:  # what the roles ask of some strategies (needs_seed, last_record): the inner's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class ServerFunctionsAggregate(ServerFunctionsStrategy):
    """The class's ``aggregate`` as a strategy that sees every update; when it fails, the
    built-in strategy aggregates this round's updates instead."""

    @property
    def needs_updates(self) -> bool:  # type: ignore[override]
        return True

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        try:
            new_model: Tensors = self.functions.aggregate_sync(model, updates)
            new_state: Tensors = dict(_own(state))
        except ServerFunctionsError as exc:
            self.functions.failed("aggregate", exc)
            new_model, new_state = self._builtin(model, updates, _own(state))
        return new_model, self.functions.with_state(new_state)

    def _builtin(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        if self.inner.needs_updates:
            return self.inner.aggregate(model, updates, state)
        return self.inner.step(model, weighted_mean(model, updates), state)


def weighted_mean(model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Tensors:
    """The example-weighted float64 mean of the updates (FedAvg's), tensor by tensor."""
    total = float(sum(u.num_examples for u in updates))
    if not updates or total <= 0:
        return {n: np.asarray(a, dtype=np.float64) for n, a in model.items()}
    out: Tensors = {}
    for name in model:
        acc = np.zeros(model[name].shape, dtype=np.float64)
        for u in updates:
            acc += np.asarray(u.tensors[name], dtype=np.float64) * (u.num_examples / total)
        out[name] = acc
    return out


def _own(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if k != sf.STATE_KEY}


# -- the controller's side: answers, opening, call sites ------------------------------------------


def answers(host: Any) -> Answer:
    """api_client's answers from the controller's state (called in the runner's thread)."""

    def attributes(st: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
        import json

        out: dict[str, dict[str, Any]] = {c: {} for c in ids}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = st.db.execute(f"SELECT name, attributes FROM clients WHERE name IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            for row in rows:
                out[row[0]] = json.loads(row[1]) if row[1] else {}
        return out

    def answer(name: str, args: list[Any]) -> Any:
        reg = host.registry
        if name == "get_current_attributes":
            ids = args[0] if args else []
            if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
                raise TypeError("get_current_attributes takes a list of client names")
            return reg.query(lambda st: attributes(st, ids))
        if name == "get_clients":
            rows = reg.read("clients")
            n_max = args[0] if args and isinstance(args[0], int) else None
            shown = rows[-n_max:] if n_max else rows
            return {"count": len(rows), "result": shown}
        if name == "get_client":
            return next((r for r in reg.read("clients") if r.get("name") == (args[0] if args else None)), {})
        if name == "get_active_model":
            model = reg.query(lambda st: st.get_meta("active_model"))
            return {"model": model, "model_id": model} if model else {}
        raise AttributeError(f"api_client has no {name} here (it answers get_current_attributes, get_clients, get_client, get_active_model)")

    return answer


async def open_functions(session_id: str, cfg: Any, host: Any, server_state: Mapping[str, np.ndarray] | None = None) -> SessionFunctions:
    """Start a session's worker and load its class (with its kept state, on a resume);
    ConfigError says why the file does not load."""
    holder: list[SessionFunctions] = []
    runner = Runner(cfg.server_functions, cfg.server_functions_file, cfg.server_functions_timeout, answers(host), lambda text: holder[0].line(text))
    functions = SessionFunctions(session_id, runner)
    holder.append(functions)
    saved = (server_state or {}).get(sf.STATE_KEY)
    try:
        await functions.run(runner.start, None if saved is None else np.asarray(saved, dtype=np.uint8).tobytes())
    except ServerFunctionsError as exc:
        functions.executor.shutdown(wait=False)
        raise ConfigError("server_functions", str(exc)) from None
    except BaseException:  # cancelled (the start's request went away): no worker left behind
        runner.stop()
        functions.executor.shutdown(wait=False)
        raise
    log.info("session %s: server functions from %s define %s", session_id, cfg.server_functions_file, ", ".join(sorted(runner.methods)) or "nothing")
    return functions


async def begin_round(s: Any, host: Any, index: int) -> None:
    """A round starts: the session's worker (started here after a restart or a continue)
    serves it. A class that no longer loads means the built-in behaviour this session."""
    if not s.config.server_functions:
        return
    if s.sfn is None:
        try:
            s.sfn = await open_functions(s.id, s.config, host, s.server_state)
        except ConfigError as exc:
            log.error("session %s: server functions not loaded: %s; the built-in behaviour is used", s.id, exc)
            return
    s.sfn.begin_round(index)


LEFT_OUT = "left out by the server functions"  # why a client did not take part (session show)


async def client_selection(
    s: Any, host: Any, selected: dict[str, list[str]], round_type: str, left_out: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """The built-in selection (``selected``: combiner -> clients) narrowed by the class's
    ``client_selection``; unchanged without one, or when it fails. Those it leaves out are
    added to ``left_out`` (client -> why)."""
    f: SessionFunctions | None = s.sfn
    if f is None or "client_selection" not in f.methods or not selected:
        return selected
    await host.registry.flush()
    commands = getattr(host, "commands", None)
    if commands is not None:
        await commands.flush()  # attributes that came in a moment ago are answered too
    kept = await f.run(f.select_sync, selected, round_type)
    if left_out is not None:
        chosen = {c for clients in kept.values() for c in clients}
        left_out.update({c: LEFT_OUT for clients in selected.values() for c in clients if c not in chosen})
    return kept


async def prediction_selection(s: Any, host: Any, chosen: dict[str, str]) -> dict[str, str]:
    """A prediction for every client (``chosen``: client -> combiner) while a session runs:
    its class's ``client_selection`` with ``RoundType.PREDICTION`` narrows it."""
    if s is None or s.sfn is None:
        return chosen
    grouped: dict[str, list[str]] = {}
    for client, combiner in sorted(chosen.items()):
        grouped.setdefault(combiner, []).append(client)
    kept = await client_selection(s, host, grouped, "prediction")
    return {c: chosen[c] for clients in kept.values() for c in clients}


async def client_settings(s: Any, base: dict[str, Any], global_bytes: bytes) -> dict[str, Any]:
    """The round's train settings: --settings with the class's ``client_settings`` over them."""
    f: SessionFunctions | None = s.sfn
    if f is None or "client_settings" not in f.methods:
        return base
    return {**base, **await f.run(f.settings_sync, global_bytes)}


def wrap(s: Any, strategy: Strategy) -> Strategy:
    return strategy if s.sfn is None else s.sfn.wrap(strategy)


def record(s: Any) -> dict[str, Any]:
    return {} if s.sfn is None else s.sfn.record()


async def close(s: Any) -> None:
    f: SessionFunctions | None = s.sfn
    if f is not None:
        s.sfn = None
        f.runner.stop()  # at once (a signal): a call in flight ends, the queued ones are not called
        await f.run(f.close)
