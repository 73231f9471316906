"""Start a package's runtime on the client: import `startup(client)`, which registers the
callbacks, or, for a dispatcher package, register callbacks that run its commands."""

from __future__ import annotations

import logging
from pathlib import Path

from scaleout.package.project import call_entry, load_project

log = logging.getLogger("scaleout.package")


def load_startup(
    root: Path,
    client: object,
    *,
    dispatcher: bool = False,
    managed_env: bool = False,
    command_timeout: float | None = None,
    env_cache: Path | None = None,
) -> None:
    """Make `client` (an EdgeClient) run the package at `root`.

    An importing package's startup entry file is imported and `startup(client)` called. A
    package whose train entry is a command, or any package with `dispatcher`, has its
    commands run as processes (see dispatcher.py). With `managed_env`, the package runs in a
    venv made from its python_env.yaml: commands with that venv's Python, and an importing
    package's callbacks in a process of that Python, one per task.

    Raises PackageError naming the file if it is missing, fails to import, or startup() raises.
    """
    from scaleout.package import interpreter

    project = load_project(root)
    penv = None
    if managed_env:
        from scaleout.package.environment import ensure_managed_env

        venv = ensure_managed_env(project, env_cache)
        if venv is None:
            log.warning("--managed-env: %s names no python_env; running the package with this scaleout's Python", project.file)
        else:
            penv = interpreter.managed(venv)
    if dispatcher or project.is_dispatcher:
        from scaleout.package.dispatcher import Dispatcher

        Dispatcher(project, penv or interpreter.current(), command_timeout).attach(client)  # type: ignore[arg-type]
    elif penv is not None:
        from scaleout.package.host import attach_hosted

        attach_hosted(project, penv, client, command_timeout)  # type: ignore[arg-type]
    else:
        import sys

        lib = interpreter.shim_lib()  # callbacks may import FEDn's helpers later: keep them findable
        if lib is not None and str(lib) not in sys.path:
            sys.path.append(str(lib))
        call_entry(project, "startup", client)
