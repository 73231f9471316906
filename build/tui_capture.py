"""Print a text capture of `scaleout tui`'s main screen, for the README.

Starts a real federation on loopback (controller, one combiner, three quickstart clients),
runs a five-round session, opens the app on it (App.run_test at 120 x 40) and prints the
screen as plain text, as the compositor drew it.

    PYTHONPATH=src .venv/bin/python build/tui_capture.py
"""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from conftest import QUICKSTART, federation  # noqa: E402

from scaleout.tui.app import ScaleoutApp  # noqa: E402


async def capture(app: ScaleoutApp, rounds: int) -> str:
    from rich.console import Console

    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 60
        while not (app.view.loaded and sum(r.status == "succeeded" for r in app.view.rounds.values()) == rounds and app.metric):
            assert time.monotonic() < deadline, "the session did not show up"
            await pilot.pause(0.1)
        await pilot.pause(1.2)  # one slow redraw: the tables and the plot are drawn at most once a second
        console = Console(width=120, height=40, file=io.StringIO(), force_terminal=True, record=True, legacy_windows=False, safe_box=False)
        console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
        text = console.export_text()
        await pilot.press("q")
    return "\n".join(line.rstrip() for line in text.splitlines())


def main() -> None:
    rounds = 5
    with tempfile.TemporaryDirectory(prefix="scaleout-capture-") as tmp, federation(Path(tmp)) as fed:
        fed.controller()
        fed.activate(QUICKSTART)
        fed.seed_from(QUICKSTART)
        fed.combiner("combiner-1")
        for i in range(1, 4):
            fed.client(f"client-{i}")
        fed.wait_clients(3)
        fed.run_session(rounds=rounds, min_clients=3, settings={"epochs": 2})
        assert fed.conn is not None
        print(asyncio.run(capture(ScaleoutApp(fed.conn), rounds)))


if __name__ == "__main__":
    main()
