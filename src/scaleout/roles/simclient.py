"""Simulated clients: many lightweight clients as asyncio tasks in one process.

Each has its own name and its own TLS websocket to its combiner and speaks the real client
protocol (hello, tasks, announced results, update pulls, reconnects), but runs no compute
package: after ``train_time`` seconds it returns a cheap synthetic update (the global
model plus a small shift, computed once per model and process and shared by its clients)
weighted by a number of examples that follows from its index. `scaleout simulate` starts
a few of these processes to put thousands of clients on one machine.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.core.errors import AuthError, NotFoundError, ProtocolError, ScaleoutError
from scaleout.roles.common import announce
from scaleout.security import tls
from scaleout.transport.link import Hashed, Incoming, Link
from scaleout.transport.net import RECONNECT_SPREAD_S, TrustError, backoff, connect

log = logging.getLogger("scaleout.simulate")

SHIFT = 1e-3  # what a simulated round adds to every float weight
CONNECTS_AT_ONCE = 64  # TLS handshakes in flight per process


@dataclass
class SimSettings:
    controller: str
    token: str
    ca: Path | None
    prefix: str = "sim"
    start: int = 0
    count: int = 1
    train_time: float = 0.0
    insecure: bool = False


class SimHost:
    """``count`` simulated clients named PREFIX-00001 ... sharing one process."""

    def __init__(self, settings: SimSettings) -> None:
        self.s = settings
        self.ctx = None if settings.insecure else tls.client_context(settings.ca)
        self.updates: dict[str, asyncio.Future[Hashed]] = {}  # model id -> synthetic update and its sha256
        self.connecting = asyncio.Semaphore(CONNECTS_AT_ONCE)
        self._ctl: tuple[Link, asyncio.Task[None]] | None = None
        self._ctl_lock = asyncio.Lock()

    async def run(self, stop: asyncio.Event) -> None:
        clients = [
            asyncio.create_task(self._client(i, f"{self.s.prefix}-{i:05d}", stop))
            for i in range(self.s.start, self.s.start + self.s.count)
        ]
        announce(f"{self.s.count} simulated clients started")
        try:
            await stop.wait()
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            if self._ctl is not None:
                await self._ctl[0].ws.close()
                self._ctl[1].cancel()

    async def _controller(self) -> Link:
        """One controller link per process for every client's assignment (reopened if lost)."""
        async with self._ctl_lock:
            if self._ctl is None or self._ctl[0].closed:
                link = await connect(self.s.controller, self.s.token, self.ctx, max_payload=1 << 20)
                self._ctl = (link, asyncio.create_task(link.run()))
            return self._ctl[0]

    async def _update(self, model_id: str, model: bytes) -> Hashed:
        """The synthetic update for ``model``: computed once per process (off the loop)."""
        if model_id not in self.updates:
            self.updates = {model_id: asyncio.ensure_future(asyncio.to_thread(_shifted, model))}
        return await self.updates[model_id]

    async def _client(self, index: int, name: str, stop: asyncio.Event) -> None:
        delays = backoff()
        holding: tuple[str, Hashed, m.TaskResult] | None = None
        identity: str | None = None
        # Its own secret for the enrolment: a reply lost with the link, it finishes it again
        # (without one, its name is taken by its own first try and it never gets in).
        secret = secrets.token_hex(16)
        while not stop.is_set():
            try:
                async with self.connecting:
                    ctl = await self._controller()
                    if identity is None:  # enrolled once, kept in memory: a simulated client has no state dir
                        identity = str((await ctl.request("node.enrol", {"name": name, "key": secret}, timeout=60))[0]["token"])
                    info, _ = await ctl.request("client.assign", {"name": name, "identity": identity}, timeout=60)
                    link = await connect(str(info["url"]), str(info["ticket"]), self.ctx, max_payload=1 << 40, peer_role="combiner")
                tasks: asyncio.Queue[Incoming] = asyncio.Queue()

                async def on_message(inc: Incoming) -> None:
                    if isinstance(inc.msg, m.Task):
                        await tasks.put(inc)

                async def on_request(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], Hashed]:
                    if req.op != "update.get":
                        raise ProtocolError(f"unknown operation {req.op!r}")
                    if holding is None or holding[0] != req.args.get("task_id"):
                        raise NotFoundError("update", str(req.args.get("task_id")), "not held")
                    return {}, holding[1]

                run = asyncio.create_task(link.run(on_message=on_message, on_request=on_request))
                await link.send(m.Hello(name=name, task_id=holding[0] if holding else None))
                if holding is not None:
                    await link.send(holding[2])
                delays = backoff(spread=RECONNECT_SPREAD_S)  # its link worked: its neighbours lose theirs with it
                while not run.done():
                    getter = asyncio.ensure_future(tasks.get())
                    await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    inc = getter.result()
                    task = inc.msg
                    assert isinstance(task, m.Task)
                    model = inc.take_blob()
                    if self.s.train_time > 0:
                        await asyncio.sleep(self.s.train_time)  # simulated training, not a synchronisation
                    if task.kind == "train" and model is not None:
                        update = await self._update(task.model_id, model)
                        n = 1 + index % 10
                        result = m.TaskResult(task_id=task.task_id, ok=True, size=len(update.data), data={"metadata": {"training_metadata": {"num_examples": n}}})
                        holding = (task.task_id, update, result)
                    else:
                        result = m.TaskResult(task_id=task.task_id, ok=True, data={"score": (index % 100) / 100})
                    await link.send(result)
                run.cancel()
                await link.ws.close()
            except asyncio.CancelledError:
                raise
            except (AuthError, TrustError):
                raise
            except (ScaleoutError, OSError) as exc:
                log.debug("%s: %s", name, exc)
            try:
                await asyncio.wait_for(stop.wait(), next(delays))
            except asyncio.TimeoutError:
                pass


def _shifted(model: bytes) -> Hashed:
    """The model with SHIFT added to every float tensor, in the same layout, and its sha256."""
    import hashlib

    named, layout, _ = payload.read(model)
    shifted = {k: (v + v.dtype.type(SHIFT)) if v.dtype.kind == "f" else v for k, v in named.items()}
    data = payload.encode_named({k: np.ascontiguousarray(v) for k, v in shifted.items()}, layout)
    return Hashed(data, hashlib.sha256(data).hexdigest())
