"""The transfer progress bar: drawn on a terminal only, redrawn in place, one line per transfer."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

from scaleout.commands.progress import Bar, terminal_bar
from scaleout.transport.link import PROGRESS_MIN_BYTES

MIB = 1 << 20


@pytest.fixture
def pty() -> Iterator[tuple[io.TextIOWrapper, int]]:
    """A real pseudo-terminal: (the terminal side as a text stream, the master fd to read it from)."""
    master, slave = os.openpty()
    stream = open(slave, "w", encoding="utf-8", closefd=True)
    try:
        yield stream, master
    finally:
        stream.close()
        os.close(master)


def read_all(stream: io.TextIOWrapper, master: int) -> str:
    """Everything written to the terminal side: closed first, so the master reads to the end."""
    stream.close()
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal side is closed and all of it was read
            break
        if not chunk:
            break
        out += chunk
    return out.decode().replace("\r\n", "\n")  # undo the terminal's own newline translation


def test_a_terminal_gets_a_bar_a_pipe_or_file_does_not(pty: tuple[io.TextIOWrapper, int], tmp_path: os.PathLike[str]) -> None:
    stream, _ = pty
    assert isinstance(terminal_bar("receiving model", stream), Bar)
    read_end, write_end = os.pipe()
    with open(write_end, "w") as pipe, open(os.path.join(tmp_path, "log"), "w") as file:
        assert terminal_bar("receiving model", pipe) is None
        assert terminal_bar("receiving model", file) is None
    os.close(read_end)
    assert terminal_bar("receiving model", io.StringIO()) is None
    closed = io.StringIO()
    closed.close()
    assert terminal_bar("receiving model", closed) is None  # isatty() raises ValueError


def test_the_bar_redraws_one_line_in_place_and_ends_it(pty: tuple[io.TextIOWrapper, int]) -> None:
    stream, master = pty
    now = [100.0]
    bar = Bar("sending model", stream, clock=lambda: now[0])
    total = 64 * MIB
    bar(0, total)
    for done in range(MIB, total + 1, MIB):
        now[0] += 0.5
        bar(done, total)
    out = read_all(stream, master)
    draws = out.split("\r")[1:]
    assert draws[0].startswith("sending model [") and "  0%  0 B of 64.0 MiB" in draws[0]
    # One draw per percentage that moved (64 chunks give 64 distinct ones), the start included.
    assert len(draws) == 65, draws
    assert " 50%  32.0 MiB of 64.0 MiB  2.0 MiB/s" in draws[32]
    assert draws[-1].startswith("sending model [########################] 100%  64.0 MiB of 64.0 MiB")
    assert out.endswith("\n") and out.count("\n") == 1


def test_the_bar_skips_small_transfers_and_repeats(pty: tuple[io.TextIOWrapper, int]) -> None:
    stream, master = pty
    bar = Bar("receiving model", stream)
    bar(0, PROGRESS_MIN_BYTES - 1)
    bar(PROGRESS_MIN_BYTES - 1, PROGRESS_MIN_BYTES - 1)
    total = 1000 * MIB
    bar(0, total)
    bar(MIB, total)  # still 0 %: not redrawn
    bar(11 * MIB, total)
    bar.close()  # interrupted: the line is ended so an error message starts on its own
    bar.close()  # and only once
    out = read_all(stream, master)
    assert out.count("\r") == 2 and out.endswith("\n") and out.count("\n") == 1, repr(out)
    assert "  1%  11.0 MiB of 1000.0 MiB" in out


def test_a_shorter_line_clears_what_the_longer_one_left(pty: tuple[io.TextIOWrapper, int]) -> None:
    stream, master = pty
    now = [0.0]
    bar = Bar("receiving model", stream, clock=lambda: now[0])
    total = 100 * MIB
    bar(0, total)
    now[0] = 1.0
    bar(50 * MIB, total)  # with a rate
    bar(0, total)  # starting over: no rate yet, a shorter line padded over the old one
    draws = read_all(stream, master).split("\r")[1:]
    assert draws[1].endswith("  50.0 MiB/s")
    assert draws[2].rstrip().endswith("0 B of 100.0 MiB") and len(draws[2]) == len(draws[1])
