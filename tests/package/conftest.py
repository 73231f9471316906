from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

MakePackage = Callable[..., Path]


@pytest.fixture
def make_package(tmp_path: Path) -> MakePackage:
    """Write a package directory `tmp_path/name` from {relative path: text}."""

    def make(files: dict[str, str], name: str = "client") -> Path:
        root = tmp_path / name
        for rel, text in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return root

    return make


IMPORTING_YAML = "python_env: python_env.yaml\nentry_points:\n  build: build.py\n  startup: startup.py\n"
