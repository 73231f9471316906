"""Large models moved by the CLI show a progress bar on a terminal and log lines otherwise.

`model set-seed` and `model download` run as real processes against a real controller,
once with stderr on a pseudo-terminal and once on a pipe, with a model above the 16 MiB
from which progress is shown.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Federation, federation, scaleout

from scaleout.core.payload import encode
from scaleout.transport.link import PROGRESS_MIN_BYTES

RUN_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with federation(tmp_path_factory.mktemp("ctl")) as f:
        f.controller()
        yield f


def on_terminal(*args: str) -> tuple[int, str]:
    """Run one scaleout command with stderr on a pseudo-terminal: (exit code, what it drew there)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "scaleout", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    finally:
        os.close(slave)
    out = b""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(master, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(left):
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the command exited and closed its side
                    break
                if not chunk:
                    break
                out += chunk
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode(errors="replace").replace("\r\n", "\n")


def test_a_large_model_shows_a_bar_on_a_terminal_and_log_lines_on_a_pipe(ctl: Federation, tmp_path: Path) -> None:
    n = (PROGRESS_MIN_BYTES + (4 << 20)) // 4
    model = tmp_path / "big.safetensors"
    data = encode({"w": np.arange(n, dtype=np.float32)})
    model.write_bytes(data)
    conn = ["--data-dir", str(ctl.data)]

    code, drawn = on_terminal("model", "set-seed", str(model), *conn)
    assert code == 0, drawn
    draws = [d for d in drawn.split("\r") if d.startswith("sending model [")]
    assert len(draws) > 10 and "  0%" in draws[0] and " 100%  20.0 MiB of 20.0 MiB" in draws[-1], drawn
    assert "Traceback" not in drawn and "sending payload" not in drawn

    out = tmp_path / "copy.safetensors"
    code, drawn = on_terminal("model", "download", "active", "-o", str(out), *conn)
    assert code == 0, drawn
    draws = [d for d in drawn.split("\r") if d.startswith("receiving model [")]
    assert len(draws) > 10 and " 100%  20.0 MiB of 20.0 MiB" in draws[-1], drawn
    assert "receiving payload" not in drawn  # the bar replaces the log lines
    assert out.read_bytes() == data

    piped = scaleout("model", "download", "active", "-o", str(tmp_path / "piped.safetensors"), *conn)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "receiving model" not in piped.stderr
    assert "receiving payload from wss://127.0.0.1:" in piped.stderr  # what roles log, at 25 % steps
