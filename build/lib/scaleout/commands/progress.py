"""A progress bar for a large transfer, for a person watching a terminal.

One line on stderr, redrawn in place with ``\\r``. Not on a pipe, a file or in CI (stderr is
not a TTY): there the link logs its usual progress lines instead, as roles do.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from scaleout.core.units import fmt_bytes
from scaleout.transport.link import PROGRESS_MIN_BYTES

WIDTH = 24


class Bar:
    """Told ``(bytes done, total)`` as a payload moves (a link's ``Progress``); draws when the percentage moves."""

    def __init__(self, label: str, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.stream = stream
        self.clock = clock
        self.started: float | None = None
        self.shown = -1  # the percentage on screen, -1 before the first draw
        self.drawn = 0  # length of the line on screen, 0 when none is open

    def __call__(self, done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:  # the same size from which roles log progress
            return
        if self.started is None or done == 0:
            self.started = self.clock()
            self.shown = -1
        percent = done * 100 // total
        if percent == self.shown:
            return
        self.shown = percent
        filled = WIDTH * done // total
        line = f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {percent:3d}%  {fmt_bytes(done)} of {fmt_bytes(total)}"
        elapsed = self.clock() - self.started
        if done and elapsed > 0:
            line += f"  {fmt_bytes(done / elapsed)}/s"
        self.stream.write("\r" + line.ljust(self.drawn))
        self.drawn = len(line)
        if done >= total:
            self.close()
        else:
            self.stream.flush()

    def close(self) -> None:
        """End the line (if one is open), so what is printed next starts on its own."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = 0


def terminal_bar(label: str, stream: TextIO | None = None) -> Bar | None:
    """A bar on ``stream`` (default stderr) when it is a terminal, else None."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return None
    return Bar(label, stream) if tty else None
