"""The session runner's writes go to the store off the event loop (issue 18: on PostgreSQL
each is a round trip, and an outage makes one wait seconds), on one store thread, and a
transaction on SQLite's shared connection never takes in another thread's statements."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from scaleout.core.config import SessionConfig
from scaleout.core.sessions import SessionMachine, Step, StepKind
from scaleout.roles.sessions import RunningSession, SessionService
from scaleout.store.state import State


class RecordingState(State):
    """A State that notes the thread each step is written on."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.step_threads: list[int] = []

    def add_step(self, session_id: str, step: dict[str, Any]) -> None:
        self.step_threads.append(threading.get_ident())
        super().add_step(session_id, step)


def test_a_step_is_written_on_the_store_thread_and_committed_before_it_is_applied(tmp_path: Path) -> None:
    st = RecordingState(tmp_path / "state.db")
    service = SessionService(SimpleNamespace(state=st))  # type: ignore[arg-type]
    seen_in_store: list[int] = []

    async def go() -> int:
        loop_thread = threading.get_ident()
        st.add_session("s-1", {}, "m0")
        s = RunningSession("s-1", SessionConfig.from_mapping({"rounds": 1}), SessionMachine("s-1", validate=False))
        first = Step(StepKind.SESSION_STARTED, model_id="m0", rounds=1, at=time.time())
        original = s.machine.apply

        def apply(step: Step) -> None:  # the step is in the store (committed) when the machine takes it
            seen_in_store.append(len(st.steps("s-1")))
            original(step)

        s.machine.apply = apply  # type: ignore[method-assign]
        await service._persist(s, first, lambda: st.set_meta("active_model", "m0"))
        return loop_thread

    loop_thread = asyncio.run(go())
    service._writer.shutdown()
    assert st.step_threads and loop_thread not in st.step_threads
    assert len(set(st.step_threads)) == 1  # one store thread
    assert seen_in_store == [1] and st.get_meta("active_model") == "m0"


class WatchedLock:
    """An RLock that says when a thread other than its holder starts waiting for it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.holder: int | None = None
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self.holder is not None and self.holder != threading.get_ident():
            self.contended.set()
        got = self.lock.acquire(blocking, timeout)
        if got:
            self.holder = threading.get_ident()
        return got

    def release(self) -> None:
        self.lock.release()
        if not self.lock._is_owned():  # type: ignore[attr-defined]
            self.holder = None

    __enter__ = acquire

    def __exit__(self, *exc: Any) -> None:
        self.release()


def test_a_write_from_another_thread_waits_for_a_transaction_on_the_shared_connection(tmp_path: Path) -> None:
    st = State(tmp_path / "state.db")
    watched = WatchedLock()
    st._lock = watched  # type: ignore[assignment]
    st.db.lock = watched
    opened, done = threading.Event(), threading.Event()

    def other() -> None:
        opened.wait()
        st.set_meta("b", "2")  # not part of the transaction below: it must survive its rollback
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with pytest.raises(RuntimeError), st.transaction():
        st.set_meta("a", "1")
        opened.set()
        # Until the other thread waits for the lock (or, without the lock, has written into
        # this transaction), then roll back.
        watched.contended.wait(10) or done.wait(10)
        raise RuntimeError("rolled back")
    t.join(10)
    assert st.get_meta("a") is None
    assert st.get_meta("b") == "2"
