"""Load a package's `startup(client)` entry point, which registers the client's callbacks."""

from __future__ import annotations

from pathlib import Path

from scaleout.package.project import call_entry, load_project


def load_startup(root: Path, client: object) -> None:
    """Import the startup entry file of the package at `root` and call `startup(client)`.

    Raises PackageError naming the file if it is missing, fails to import, or startup() raises.
    """
    call_entry(load_project(root), "startup", client)
