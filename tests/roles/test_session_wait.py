"""A follower that asks to follow a session while the controller shuts down is told so, not
handed the session as it stands ("running"): that answer made `session start --wait` end as
if the session had failed (exit 1) instead of saying how to follow it again (exit 3)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from scaleout.core.errors import ShuttingDown
from scaleout.roles.sessions import SessionService
from scaleout.store.state import State


def test_session_wait_during_shutdown_is_refused_not_answered_with_a_running_session(tmp_path: Path) -> None:
    st = State(tmp_path / "state.db")
    st.add_session("s-1", {"rounds": 1}, "m0")
    service = SessionService(SimpleNamespace(state=st))  # type: ignore[arg-type]

    async def go() -> None:
        await service.shutdown()
        with pytest.raises(ShuttingDown, match="shutting down"):
            await service.wait(None, {"id": "s-1"})  # type: ignore[arg-type]

    asyncio.run(go())
    st.close()
