"""Run a package's `build()` entry point (e.g. to write the seed model)."""

from __future__ import annotations

import os
from pathlib import Path

from scaleout.package.project import call_entry, load_project

OUTPUT_DIR_ENV = "SCALEOUT_BUILD_OUTPUT_DIR"


def _snapshot(directory: Path) -> dict[Path, tuple[int, int]]:
    """(mtime_ns, size) of every file under `directory`, skipping caches and .git."""
    seen: dict[Path, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".git")]
        for filename in filenames:
            path = Path(dirpath, filename)
            try:
                st = path.stat()
            except OSError:
                continue
            seen[path] = (st.st_mtime_ns, st.st_size)
    return seen


def _models_beside(root: Path) -> dict[Path, tuple[int, int]]:
    """(mtime_ns, size) of the model files directly in the package's parent folder."""
    seen: dict[Path, tuple[int, int]] = {}
    for path in root.resolve().parent.glob("*"):
        if path.suffix in (".npz", ".safetensors") and path.is_file():
            st = path.stat()
            seen[path] = (st.st_mtime_ns, st.st_size)
    return seen


def run_build(root: Path, output_dir: Path | None = None, managed_env: bool = False, env_cache: Path | None = None) -> list[Path]:
    """Call `build()` from the package at `root`; return the files it created or changed.

    The output directory (default: `root`) is passed to build() in $SCALEOUT_BUILD_OUTPUT_DIR.
    With `managed_env`, the build runs with the Python of the venv made from the package's
    python_env file (the one `join --managed-env` uses).
    """
    from scaleout.package import interpreter

    project = load_project(root)
    out = (output_dir if output_dir is not None else root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    before = _snapshot(out)
    command = project.entry_command("build")
    penv = interpreter.current()
    if managed_env:
        from scaleout.package.environment import ensure_managed_env
        from scaleout.package.host import HOST

        venv = ensure_managed_env(project, env_cache)
        if venv is not None:
            penv = interpreter.managed(venv)
            if command is None and project.entry_file("build") is not None:
                command = f"{HOST} build"  # an importing build(), called in the venv's Python
    if command is not None:  # a dispatcher package: `build: {command: python model.py}`
        from scaleout.package.dispatcher import DEFAULT_TIMEOUT_S, run_command

        timeout = project.entry_timeout("build") or DEFAULT_TIMEOUT_S
        # FEDn's examples write ../seed.npz whatever the output folder: look beside the package too.
        beside = _models_beside(project.root)
        run_command("build", command, [], project.root, penv, timeout, extra_env={OUTPUT_DIR_ENV: str(out)})
        written = sorted(path for path, stamp in _snapshot(out).items() if before.get(path) != stamp)
        return written or sorted(path for path, stamp in _models_beside(project.root).items() if beside.get(path) != stamp)
    previous = os.environ.get(OUTPUT_DIR_ENV)
    os.environ[OUTPUT_DIR_ENV] = str(out)
    try:
        call_entry(project, "build")
    finally:
        if previous is None:
            os.environ.pop(OUTPUT_DIR_ENV, None)
        else:
            os.environ[OUTPUT_DIR_ENV] = previous
    after = _snapshot(out)
    return sorted(path for path, stamp in after.items() if before.get(path) != stamp)
