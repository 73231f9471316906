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
