"""Large models and packages moved by the CLI show a progress bar on a terminal, and
nothing about the transfer on a pipe or with --json.

`model set-seed`, `model download` and `package set-active` run as real processes against
a real controller, with stderr on a pseudo-terminal or a pipe, with payloads above the
16 MiB from which progress is shown.
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

    # Not on a terminal, or with --json on one: nothing about the transfer (roles log it; commands do not).
    piped = scaleout("model", "download", "active", "-o", str(tmp_path / "piped.safetensors"), *conn)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == "" and piped.stdout.startswith("saved model "), piped
    code, drawn = on_terminal("model", "download", "active", "-o", str(tmp_path / "json.safetensors"), "--json", *conn)
    assert code == 0 and drawn == "", drawn
    code, drawn = on_terminal("model", "set-seed", str(model), "--json", *conn)
    assert code == 0 and drawn == "", drawn


def test_a_large_package_upload_shows_a_bar_on_a_terminal_only(ctl: Federation, tmp_path: Path) -> None:
    from scaleout.package.archive import create_archive

    package = tmp_path / "big"
    package.mkdir()
    (package / "scaleout.yaml").write_text("entry_points:\n  startup: startup.py\n")
    (package / "startup.py").write_text("def startup(client):\n    pass\n")
    (package / "blob.bin").write_bytes(np.random.default_rng(0).bytes(PROGRESS_MIN_BYTES + (1 << 20)))  # does not compress
    archive = create_archive(package, tmp_path / "big.tgz")
    conn = ["--data-dir", str(ctl.data)]

    code, drawn = on_terminal("package", "set-active", str(archive), *conn)
    assert code == 0, drawn
    draws = [d for d in drawn.split("\r") if d.startswith("sending package [")]
    assert len(draws) > 10 and "  0%" in draws[0] and " 100%  " in draws[-1], drawn

    piped = scaleout("package", "set-active", str(archive), *conn)
    assert piped.returncode == 0 and piped.stderr == "", piped
    code, drawn = on_terminal("package", "set-active", str(archive), "--json", *conn)
    assert code == 0 and drawn == "", drawn
