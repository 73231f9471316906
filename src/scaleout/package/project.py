"""The project file (`scaleout.yaml`, or FEDn's `fedn.yaml`) and importing its entry points.

Two forms of entry point are accepted:

    entry_points:
      build: build.py                      # importing: a file defining build()
      startup: startup.py                  # importing: a file defining startup(client)
      train: {command: "python train.py"}  # dispatcher: a shell command
      validate: "python validate.py"       # dispatcher, short form

A dispatcher entry may also say how long its command may run: `{command: ..., timeout: 600}`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeGuard

from scaleout.core.errors import PackageError
from scaleout.core.units import fmt_bytes
from scaleout.runtime import missing_module_hint

PROJECT_FILE = "scaleout.yaml"
# FEDn's project file, read when a package has no scaleout.yaml (FEDn projects run unchanged).
LEGACY_PROJECT_FILE = "fedn.yaml"
PROJECT_FILES = (PROJECT_FILE, LEGACY_PROJECT_FILE)
PROJECT_MAX_BYTES = 32 * 1024  # a project file is a few lines; PyYAML parses about 30 KB a second at worst
# The entry points a dispatcher runs as commands with `IN OUT` arguments.
TASK_ENTRIES = ("train", "validate", "predict")


def project_file(root: Path) -> Path | None:
    """`root/scaleout.yaml`, else `root/fedn.yaml`, else None."""
    for name in PROJECT_FILES:
        if (root / name).is_file():
            return root / name
    return None


@dataclass
class Project:
    """A parsed compute package: its directory and the entry points it declares."""

    root: Path
    entry_points: dict[str, object]
    python_env: str | None
    file: str = PROJECT_FILE  # which project file it was read from

    @property
    def is_dispatcher(self) -> bool:
        """True when its train entry point is a command (a FEDn-style dispatcher package)."""
        return self.entry_command("train") is not None

    def entry_timeout(self, name: str) -> float | None:
        """The `timeout:` (seconds) a dispatcher entry gives its command, or None."""
        value = self.entry_points.get(name)
        timeout = value.get("timeout") if isinstance(value, dict) else None
        return float(timeout) if timeout is not None else None

    def python_env_file(self) -> Path | None:
        """The python_env file the project names, checked to exist inside the package."""
        if not self.python_env:
            return None
        root = self.root.resolve()
        try:
            path = (root / self.python_env).resolve()
            exists = path.is_file()
        except OSError as exc:  # a name too long for the filesystem
            raise PackageError(f"{root / self.file}: python_env {shown(self.python_env)}: {exc.strerror or exc}") from None
        if not path.is_relative_to(root):
            raise PackageError(f"{root / self.file}: python_env ({self.python_env}) points outside the package")
        if not exists:
            raise PackageError(f"{root / self.file} names python_env {self.python_env!r}, but {path} does not exist")
        return path

    def entry_file(self, name: str) -> Path | None:
        """The file of an importing entry point, or None if `name` is absent or a command."""
        value = self.entry_points.get(name)
        if not isinstance(value, str) or not value.strip().endswith(".py") or " " in value.strip():
            return None
        root = self.root.resolve()
        try:
            path = (root / value.strip()).resolve()
            exists = path.is_file()
        except OSError as exc:  # a name too long for the filesystem
            raise PackageError(f"entry point {name!r}: {shown(value)}: {exc.strerror or exc}") from None
        if not path.is_relative_to(root):
            raise PackageError(f"entry point {name!r} ({value}) points outside the package {root}")
        if not exists:
            raise PackageError(f"entry point {name!r}: file {path} does not exist")
        return path

    def entry_command(self, name: str) -> str | None:
        """The shell command of a dispatcher entry point, or None if absent or importing."""
        value = self.entry_points.get(name)
        if isinstance(value, dict):
            return str(value["command"])
        if isinstance(value, str) and self.entry_file(name) is None:
            return value
        return None


MAX_ENTRY_CHARS = 1024  # an entry point's file or command, python_env's file name


def read_yaml(path: Path) -> Any:
    """A package's YAML file (scaleout.yaml, fedn.yaml, python_env.yaml), bounded: at most
    PROJECT_MAX_BYTES (PyYAML is pure Python: a 1 MiB flow list took 30 s and 395 MB), and
    whatever PyYAML raises on it (a date of month 13, a 5000-digit number, nesting) is a
    PackageError that names the file."""
    import yaml

    try:
        size = path.stat().st_size
        if size > PROJECT_MAX_BYTES:
            raise PackageError(f"{path} is {fmt_bytes(size)}; a project file may be at most {fmt_bytes(PROJECT_MAX_BYTES)}")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PackageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PackageError(f"{path} is not UTF-8 text: {exc}") from None
    depth = deepest = 0
    for char in text:  # PyYAML's scanner slows with each open bracket: 1,000 of them took 1.7 s before it gave up
        depth += (char in "[{") - (char in "]}")
        deepest = max(deepest, depth)
    if deepest > YAML_MAX_DEPTH:
        raise PackageError(f"{path} is nested too deeply to read (brackets {deepest} deep; at most {YAML_MAX_DEPTH})")
    try:
        return yaml.load(text, Loader=_bounded_loader())  # noqa: S506 - a SafeLoader that counts what it builds
    except yaml.YAMLError as exc:
        raise PackageError(f"{path} is not valid YAML: {str(exc)[:300]}") from None
    except RecursionError:
        raise PackageError(f"{path} is nested too deeply to read") from None
    except Exception as exc:  # the package edge: PyYAML's constructors raise ValueError, AttributeError...
        raise PackageError(f"{path} is not valid YAML: {type(exc).__name__}: {str(exc)[:200]}") from None


YAML_MAX_ENTRIES = 100_000  # mapping entries and list items one file may build (merge keys copy mappings)
YAML_MAX_DEPTH = 200  # open brackets at once (a project file has a few)


def _bounded_loader() -> Any:
    """PyYAML's SafeLoader, counting the entries it builds: 1,700 merges (``<<: *b``) of a
    2,500-key mapping fit in 32 KiB and took 8.5 s and 180 MB."""
    import yaml

    class Bounded(yaml.SafeLoader):
        built = 0

        def _count(self, n: int) -> None:
            self.built += n
            if self.built > YAML_MAX_ENTRIES:
                raise yaml.YAMLError(f"it builds more than {YAML_MAX_ENTRIES:,} entries (merge keys copying mappings?)")

        def flatten_mapping(self, node: Any) -> None:
            super().flatten_mapping(node)
            self._count(len(node.value))

        def construct_sequence(self, node: Any, deep: bool = False) -> Any:
            self._count(len(node.value))
            return super().construct_sequence(node, deep=deep)

    return Bounded


def shown(value: Any) -> str:
    """A value from a user's YAML in a message, bounded: never the repr of a whole structure
    (an alias tree of 480 bytes has a repr of gigabytes) nor of a 20,000-digit number."""
    if isinstance(value, str):
        return repr(value[:60] + ("..." if len(value) > 60 else ""))
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() < 200 else "a very large number"
    return f"a {type(value).__name__}"


def _plain_text(value: Any, limit: int) -> TypeGuard[str]:
    """Text a path or command can be made of: a str of at most ``limit`` characters,
    without NUL, that encodes to UTF-8 (a lone surrogate does not)."""
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_project(root: Path) -> Project:
    """Read and check `root/scaleout.yaml` (or, when it has none, FEDn's `root/fedn.yaml`).

    The project keeps `root` absolute: its entry points run with the package as the
    working directory, where a relative `root` would point somewhere else.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise PackageError(f"package directory {root} does not exist")
    found = project_file(root)
    if found is None:
        raise PackageError(f"{root} has no {PROJECT_FILE} (nor FEDn's {LEGACY_PROJECT_FILE}); is it a compute package?")
    path = found
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise PackageError(f"{path} must be a mapping with an 'entry_points' key")
    entry_points = doc.get("entry_points")
    if entry_points is None:
        raise PackageError(f"{path} has no 'entry_points'")
    if not isinstance(entry_points, dict):
        raise PackageError(f"{path}: 'entry_points' must be a mapping of name to file or command")
    for name, value in entry_points.items():
        command = value.get("command") if isinstance(value, dict) else value
        if not _plain_text(name, 100) or not _plain_text(command, MAX_ENTRY_CHARS) or not command.strip():
            raise PackageError(
                f"{path}: entry point {shown(name)} must be a file name, a command, or {{command: ...}} "
                f"(text of at most {MAX_ENTRY_CHARS} characters, no NUL)"
            )
        timeout = value.get("timeout") if isinstance(value, dict) else None
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 30 * 86400):
            raise PackageError(f"{path}: entry point {name!r}: timeout must be a number of seconds above 0, got {shown(timeout)}")
    python_env = doc.get("python_env")
    if python_env is not None and not _plain_text(python_env, MAX_ENTRY_CHARS):
        raise PackageError(f"{path}: 'python_env' must be a file name, got {shown(python_env)}")
    return Project(root=root, entry_points=dict(entry_points), python_env=python_env, file=path.name)


@contextmanager
def _inside(root: Path) -> Iterator[None]:
    """Run user code with `root` as cwd and first on sys.path; restore both after."""
    from scaleout.package.interpreter import shim_lib

    entry = str(root)
    cwd = os.getcwd()
    before = set(sys.modules)
    sys.path.insert(0, entry)
    lib = shim_lib()  # FEDn's helper modules, last on the path: a real fedn install wins
    shims = str(lib) if lib is not None and str(lib) not in sys.path else None
    if shims is not None:
        sys.path.append(shims)
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(cwd)
        if entry in sys.path:
            sys.path.remove(entry)
        if shims is not None and shims in sys.path:
            sys.path.remove(shims)
        # Forget the package's own helper modules so the next package (or a new version
        # of this one) imports fresh copies instead of the cached ones.
        for key in set(sys.modules) - before:
            file = getattr(sys.modules[key], "__file__", None)
            if file and Path(file).resolve().is_relative_to(root):
                del sys.modules[key]


def import_entry(project: Project, name: str) -> ModuleType:
    """Import the file of entry point `name` as a fresh module (call inside `_inside`)."""
    file = project.entry_file(name)
    if file is None:
        raise PackageError(f"{project.root / project.file} has no importing entry point {name!r}")
    module_name = f"_scaleout_{name}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise PackageError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # keep the package directory free of __pycache__
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[module_name]
        raise PackageError(f"importing {file} failed: {describe_failure(exc, project.root)}") from exc
    finally:
        sys.dont_write_bytecode = dont_write
    return module


def call_entry(project: Project, name: str, *args: object) -> object:
    """Import entry point `name` and call its function of the same name with `args`."""
    root = project.root.resolve()
    with _inside(root):
        module = import_entry(project, name)
        file = module.__file__
        func = getattr(module, name, None)
        if not callable(func):
            raise PackageError(f"{file} defines no {name}() function")
        try:
            return func(*args)
        except (Exception, SystemExit) as exc:
            raise PackageError(f"{name}() in {file} failed: {describe_failure(exc, root)}") from exc


MAX_REASON_CHARS = 300


def describe_failure(exc: BaseException, root: Path) -> str:
    """One short line for an exception from package code, naming where in the package it
    was raised: ``ValueError: bad shape (startup.py:42)``."""
    message = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    lines = message.strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > MAX_REASON_CHARS or len(lines) > 1:
        first = first[:MAX_REASON_CHARS].rstrip() + " ..."
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    where = user_location(exc, root)
    text = f"{text} ({where})" if where else text
    missing = missing_module(exc, root)
    return f"{text}; the package needs module {missing!r}, which this scaleout cannot import: {missing_module_hint(missing)}" if missing else text


def missing_module(exc: BaseException, root: Path) -> str | None:
    """The module a package's import could not find, when it is a library the package
    needs (torch ...), not a file of the package itself."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    if (root / top).exists() or (root / f"{top}.py").exists():
        return None  # the package's own module: its file and line say more than a hint
    return exc.name


def user_location(exc: BaseException, root: Path) -> str | None:
    """``file:line`` (relative to ``root``) of the last traceback frame inside the package
    at ``root``, or of the line a SyntaxError in it points at; None if it has no such frame.

    The last frame inside the package is the user's line: below it are libraries (numpy
    raising on a bad shape), above it Scaleout calling the callback.
    """
    root = root.resolve()
    inside: dict[str, str | None] = {}

    def relative(filename: str | None) -> str | None:
        if not filename or filename.startswith("<") or not os.path.isabs(filename):
            return None  # <frozen importlib._bootstrap>, <string>: not a file of the package
        if filename not in inside:
            path = Path(filename).resolve()
            inside[filename] = path.relative_to(root).as_posix() if path.is_relative_to(root) else None
        return inside[filename]

    found = None
    tb = exc.__traceback__
    while tb is not None:
        name = relative(tb.tb_frame.f_code.co_filename)
        if name is not None:
            found = f"{name}:{tb.tb_lineno}"
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) and exc.lineno is not None and (name := relative(exc.filename)) is not None:
        found = f"{name}:{exc.lineno}"
    return found
