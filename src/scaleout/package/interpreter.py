"""Which Python runs a package's processes, and what they can import.

A dispatcher command such as ``python train.py IN OUT`` runs in a shell with a directory
first on PATH whose ``python`` and ``python3`` start the right interpreter:

- a source install or the zipapp: the Python that runs this scaleout (``sys.executable``),
  which also sees scaleout's own libraries (numpy, safetensors, PyYAML, scaleoututil);
- the single-file executable: the executable itself, acting as its bundled Python 3
  (SCALEOUT_AS_PYTHON=1, see ``act_as_python``): it has scaleout's libraries and the
  standard library, nothing else;
- a managed environment (``join --managed-env``): that venv's Python.

Package code (imported in-process or run as a command) can also import FEDn's helpers,
``fedn.utils.helpers.helpers`` and ``fedn.utils.helpers.plugins.numpyhelper``, backed by
``scaleoututil``. They are shim modules written into a private directory that only package
code gets on its path, appended after everything else in-process and left out entirely when
a real ``fedn`` is installed, so they never shadow it.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

AS_PYTHON_ENV = "SCALEOUT_AS_PYTHON"

# The FEDn modules FEDn projects import, each a thin alias of scaleoututil.
FEDN_SHIMS = {
    "fedn/__init__.py": '"""Scaleout\'s stand-in for FEDn\'s helper modules (only what compute packages import)."""\n',
    "fedn/utils/__init__.py": "",
    "fedn/utils/helpers/__init__.py": "",
    "fedn/utils/helpers/helpers.py": (
        '"""FEDn\'s helpers: get_helper, save_metadata, load_metadata, save_metrics (backed by scaleoututil)."""\n'
        "from scaleoututil.helpers.helpers import get_helper, load_metadata, save_metadata, save_metrics  # noqa: F401\n"
    ),
    "fedn/utils/helpers/plugins/__init__.py": "",
    "fedn/utils/helpers/plugins/numpyhelper.py": "from scaleoututil.helpers.numpyhelper import Helper  # noqa: F401\n",
}


def real_fedn_installed() -> bool:
    """True when this Python can import a real ``fedn`` (then it is used, not the shims)."""
    spec = importlib.util.find_spec("fedn")
    return spec is not None and "scaleout-shims-" not in (spec.origin or "")


@functools.lru_cache(maxsize=1)
def shim_dir() -> Path:
    """A private directory (mode 0700, removed at exit) holding the fedn shims in ``lib/``."""
    base = Path(tempfile.mkdtemp(prefix="scaleout-shims-"))
    atexit.register(shutil.rmtree, base, True)
    for rel, text in FEDN_SHIMS.items():
        path = base / "lib" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (base / "bin").mkdir()
    return base


def shim_lib() -> Path | None:
    """Where the fedn shims are, or None when a real fedn is installed."""
    return None if real_fedn_installed() else shim_dir() / "lib"


def export_shims() -> None:
    """Let Python processes that package code in this process starts import FEDn's helpers
    (for the client, whose process is the package's: never call it elsewhere)."""
    lib = shim_lib()
    if lib is not None and str(lib) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(lib)) if p)


def library_homes(modules: tuple[str, ...] = ("scaleoututil", "scaleout", "numpy", "safetensors", "yaml")) -> list[Path]:
    """The directories (site-packages, src/) holding scaleout's own modules and the libraries
    it runs packages with, in that order, each once: what another Python needs on its path to
    run package code the way scaleout does."""
    homes: list[Path] = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            home = Path(list(spec.submodule_search_locations)[0]).parent
        elif spec.origin:
            home = Path(spec.origin).parent
        else:
            continue
        if home not in homes:
            homes.append(home)
    return homes


@dataclass
class ProcessEnv:
    """How to start a package's processes: PATH and PYTHONPATH additions, extra variables."""

    python: str  # what `python` means for the package's commands
    bin_dirs: list[str] = field(default_factory=list)  # first on PATH
    pythonpath: list[str] = field(default_factory=list)  # first on PYTHONPATH
    extra: dict[str, str] = field(default_factory=dict)

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.pop(AS_PYTHON_ENV, None)
        env["PATH"] = os.pathsep.join([*self.bin_dirs, env.get("PATH", os.defpath)])
        paths = [*self.pythonpath, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env.setdefault("PYTHONUNBUFFERED", "1")  # output reaches the client log line by line
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")  # keep the package folder free of __pycache__
        env.update(self.extra)
        return env


def _launcher(directory: Path, target: list[str], env: dict[str, str] | None = None) -> None:
    """Write ``python`` and ``python3`` scripts in ``directory`` that exec ``target``."""
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    script = f"#!/bin/sh\n{prefix}exec {' '.join(shlex.quote(t) for t in target)} \"$@\"\n"
    for name in ("python", "python3"):
        path = directory / name
        path.write_text(script)
        path.chmod(0o755)


@functools.lru_cache(maxsize=1)
def current() -> ProcessEnv:
    """Package processes run by the Python that runs this scaleout (see the module docstring)."""
    from scaleout.runtime import build_kind

    bin_dir = shim_dir() / "bin"
    lib = shim_lib()
    pythonpath = [str(lib)] if lib is not None else []
    kind = build_kind()
    if kind == "frozen":
        _launcher(bin_dir, [sys.executable], {AS_PYTHON_ENV: "1"})
    else:
        _launcher(bin_dir, [sys.executable])
    if kind == "zipapp":
        # The zipapp's own libraries are not on its Python's path (a source install's are,
        # and are kept off PYTHONPATH so that another Python a command names is not handed them).
        pythonpath.extend(str(home) for home in library_homes())
    return ProcessEnv(python=str(bin_dir / "python"), bin_dirs=[str(bin_dir)], pythonpath=pythonpath)


def managed(venv: Path) -> ProcessEnv:
    """Package processes run by the venv's Python (which finds the shims through a .pth file)."""
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    return ProcessEnv(python=str(bin_dir / "python"), bin_dirs=[str(bin_dir)], extra={"VIRTUAL_ENV": str(venv)})


def act_as_python(argv: list[str]) -> int:
    """Run ``python [-u -B -E -s -I] (SCRIPT | -m MODULE | -c CODE) ARGS...`` in this process:
    how the single-file executable serves as the Python of package commands."""
    import runpy

    os.environ.pop(AS_PYTHON_ENV, None)
    for entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    args = list(argv)
    while args and args[0] in ("-u", "-B", "-E", "-s", "-I", "-O", "-OO", "-q"):
        args.pop(0)
    if args[:1] in (["-V"], ["--version"]):
        print(f"Python {sys.version.split()[0]}")
        return 0
    if not args or args[0] == "-":
        print("scaleout: the single-file executable runs Python scripts (python SCRIPT, -m MODULE, -c CODE), "
              "not an interactive interpreter", file=sys.stderr)
        return 2
    try:
        if args[0] == "-c" and len(args) > 1:
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        elif args[0] == "-m" and len(args) > 1:
            sys.argv = [args[1], *args[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0].startswith("-"):
            print(f"scaleout: option {args[0]} is not supported by the single-file executable's python", file=sys.stderr)
            return 2
        else:
            sys.argv = list(args)
            sys.path.insert(0, str(Path(args[0]).resolve().parent))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # as python does: the traceback on stderr, exit status 1
        import traceback

        traceback.print_exc()
        return 1
    return 0
