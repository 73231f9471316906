"""`scaleout dev` stops its children in parallel: one timeout for all, not one per child."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from scaleout.commands.dev import Child, stop_children

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"


async def stubborn_children(n: int, logs: Path) -> list[Child]:
    children = []
    for i in range(n):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", STUBBORN, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        children.append(Child(f"child{i}", proc, logs / f"child{i}.log"))
    for child in children:  # each has ignored SIGTERM before we send it
        assert child.proc.stdout is not None
        assert await asyncio.wait_for(child.proc.stdout.readline(), 30) == b"ready\n"
    return children


def test_children_that_ignore_sigterm_are_killed_after_one_timeout_in_all(tmp_path: Path) -> None:
    async def go() -> tuple[list[int | None], float]:
        children = await stubborn_children(3, tmp_path)
        started = time.monotonic()
        await stop_children(children, timeout=2.0)
        return [c.proc.returncode for c in children], time.monotonic() - started

    codes, elapsed = asyncio.run(go())
    assert codes == [-9, -9, -9]
    # One after the other this took 3 x 2 s; in parallel it is one timeout (and a kill).
    assert elapsed < 4.0, elapsed
