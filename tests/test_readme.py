"""README.md as a new user follows it, literally, from the repository root."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match[1]


def commands(text: str) -> list[str]:
    """The lines of the fenced code blocks in ``text``."""
    return [line for block in re.findall(r"^```\n(.*?)^```", text, re.M | re.S) for line in block.splitlines()]


HAND_RUN = commands(section("Try it by hand on one machine"))


def test_says_how_scaleout_gets_on_path() -> None:
    intro = README.split("\n## ", 1)[0]
    assert ". .venv/bin/activate" in intro
    first = next(i for i, line in enumerate(HAND_RUN) if line.startswith("scaleout "))
    assert any(line.startswith(". .venv/bin/activate") for line in HAND_RUN[:first]), HAND_RUN[: first + 1]


def test_hand_run_keeps_controller_data_outside_the_repository() -> None:
    data_dirs = re.findall(r"--data-dir (\S+)", "\n".join(HAND_RUN))
    assert data_dirs
    for data_dir in data_dirs:
        assert data_dir.startswith(("/", "~", "$HOME")), f"scaleout serve --data-dir {data_dir} writes into the repository"
    # Everything else it names in the repository is there (relative to the repository root).
    for package in re.findall(r"-p (\S+)", "\n".join(HAND_RUN)):
        assert (ROOT / package / "scaleout.yaml").is_file(), package


def test_tui_section_shows_the_main_screen_and_how_to_open_it() -> None:
    text = section("Watch it live: scaleout tui")
    capture = re.findall(r"^```\n(.*?)^```", text, re.M | re.S)[1]  # the second block: build/tui_capture.py's output
    for shown in ("Combiners", "CLIENT", "ROUND", "validation_accuracy", "q Quit", "^p palette"):
        assert shown in capture, shown
    assert "scaleout dev -p sample_projects/quickstart/client" in text and "scaleout tui --data-dir" in text


def test_hand_run_works_pasted_as_one_block(tmp_path: Path) -> None:
    """The "Try it by hand" block, run as one shell script the way a paste runs it: nothing
    waits between the lines but what the block itself says (`scaleout status --wait`). Only
    the data dir, the port (a free one), the venv and the state dir are this test's own."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys

    block = re.findall(r"^```\n(.*?)^```", section("Try it by hand on one machine"), re.M | re.S)[0]
    assert "scaleout status --wait" in block and "--port 8190" in block and ":8090" not in block
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "sample_projects" / "quickstart" / "client", repo / "sample_projects" / "quickstart" / "client",
                    ignore=shutil.ignore_patterns("*.npz", "*.tgz", "data", "__pycache__"))
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "scaleout"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m scaleout "$@"\n')
    wrapper.chmod(0o755)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "ctl"
    script = block.replace("/tmp/scaleout-ctl", str(data)).replace("8190", str(port))
    script = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEOUT_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    with open(tmp_path / "stderr.log", "wb") as stderr:
        proc = subprocess.Popen(["bash", "-c", script], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = out.decode(errors="replace")
    log = (tmp_path / "stderr.log").read_text(errors="replace")
    assert proc.returncode == 0, f"{text}\n{log}"
    assert re.search(r"^session \S+ finished", text, re.M) and len(re.findall(r"^round \d+\s+succeeded", text, re.M)) == 5, text
    assert "Traceback" not in log, log
