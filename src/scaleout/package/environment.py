"""A package's Python environment (``python_env.yaml``), as in FEDn and Scaleout Edge::

    name: mnist-pytorch          # optional
    build_dependencies: [pip, setuptools, wheel]
    dependencies: [torch==2.4.1, scikit-learn]

``install_here`` pip-installs the dependencies into the Python running scaleout
(``scaleout run install``). ``ensure_managed_env`` makes a venv for them (``scaleout join
--managed-env``), kept in a cache folder keyed by the sha256 of the file (with the Python
version and where scaleout lives), so clients on one machine, restarts and new package
versions with the same file share one venv. The venv sees scaleout's own libraries after
its own (a .pth file), as with --system-site-packages: what scaleout already has (numpy ...)
is not installed again unless the file asks for another version. ``fedn`` and scaleout's own
distributions are skipped: scaleout gives packages FEDn's helper modules itself.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scaleout.core.errors import PackageError
from scaleout.package.project import Project

log = logging.getLogger("scaleout.package")

PROVIDED = {"fedn", "scaleout", "scaleoututil", "scaleout-edge", "scaleout-util"}
PIP_TAIL = 8  # lines of pip's output quoted when it fails
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass
class PythonEnv:
    file: Path
    name: str = ""
    build_dependencies: list[str] = field(default_factory=list)
    dependencies: list[str] = field(default_factory=list)

    def requirements(self) -> list[str]:
        """Build dependencies then dependencies, without those scaleout provides."""
        kept = []
        for req in [*self.build_dependencies, *self.dependencies]:
            match = _NAME.match(req)
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""
            if name in PROVIDED:
                log.info("python_env: skipping %r: scaleout provides fedn.utils.helpers and scaleoututil to packages", req)
                continue
            kept.append(req)
        return kept


def read_python_env(path: Path) -> PythonEnv:
    from scaleout.package.project import read_yaml, shown

    doc = read_yaml(path)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PackageError(f"{path} must be a mapping with 'dependencies' (a list of pip requirements)")
    name = doc.get("name")
    env = PythonEnv(file=path, name=name[:200] if isinstance(name, str) else "")
    for key in ("build_dependencies", "dependencies"):
        value = doc.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise PackageError(f"{path}: '{key}' must be a list of pip requirements such as 'numpy>=1.24', got {shown(value)}")
        setattr(env, key, [v.strip() for v in value])
    return env


def project_env(project: Project) -> PythonEnv | None:
    path = project.python_env_file()
    return read_python_env(path) if path is not None else None


# -- pip ------------------------------------------------------------------------------------


def _pip_install(pip: list[str], reqs: list[str], what: str, cwd: Path) -> None:
    """``pip install -r`` a requirements file of ``reqs``: option lines such as
    ``--extra-index-url URL`` work as in FEDn's python_env.yaml."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scaleout-pip-") as tmp:
        req_file = Path(tmp, "requirements.txt")
        req_file.write_text("\n".join(reqs) + "\n")
        log.info("%s: %s", what, ", ".join(reqs))
        _pip([*pip, "install", *_progress_flags(pip), "-r", str(req_file)], what, _pip_env(), cwd)


RAW_PROGRESS_PIP = (24, 1)  # the first pip with --progress-bar raw ("Progress DONE of TOTAL" lines)


def _progress_flags(pip: list[str]) -> list[str]:
    """``--progress-bar raw`` where this pip has it: download progress as lines, even in a pipe."""
    try:
        out = subprocess.run([*pip, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=_pip_env(), timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = re.match(r"pip (\d+)\.(\d+)", out)
    return ["--progress-bar", "raw"] if found and (int(found[1]), int(found[2])) >= RAW_PROGRESS_PIP else []


class PipProgress:
    """pip's output as short lines a user can follow: one per package (collected, already
    there, downloading with its size, installing) and a download's progress every 10%.
    ``feed(line)`` returns the line to show, or None for pip's other chatter."""

    def __init__(self) -> None:
        self.downloading = ""
        self.shown = -1  # the last tenth of the current download shown

    def feed(self, line: str) -> str | None:
        from scaleout.core.units import fmt_bytes

        text = line.strip()
        if m := re.match(r"Progress (\d+) of (\d+)$", text):
            done, total = int(m[1]), int(m[2])
            tenth = done * 10 // total if total else 10
            if tenth == self.shown or total < (1 << 20):  # small files: their download line is enough
                return None
            self.shown = tenth
            return f"downloading {self.downloading or 'a file'}: {tenth * 10}% of {fmt_bytes(total)}"
        if m := re.match(r"Collecting (\S+)", text):
            return f"collecting {m[1]}"
        if m := re.match(r"Requirement already satisfied: (\S+)", text):
            return f"{m[1]}: already satisfied"
        if m := re.match(r"(?:Downloading|Processing) (\S+)(?: \((.+)\))?", text):
            self.downloading, self.shown = m[1].rsplit("/", 1)[-1], -1
            verb = "downloading" if text.startswith("Downloading") else "using"
            return f"{verb} {self.downloading}" + (f" ({m[2]})" if m[2] else "")
        if m := re.match(r"Using cached (\S+)", text):
            return f"using cached {m[1].rsplit('/', 1)[-1]}"
        if m := re.match(r"(?:Building wheels? for|Building wheel for) (\S+)", text):
            return f"building {m[1]}"
        if m := re.match(r"Installing collected packages: (.+)", text):
            return f"installing {m[1]}"
        if text.startswith("Successfully installed "):
            return text.replace("Successfully installed", "installed", 1)
        return None


def _pip(argv: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run pip, its output to the log a line at a time; one PackageError with its last lines."""
    log.info("%s: %s", what, " ".join(argv))
    tail: collections.deque[str] = collections.deque(maxlen=PIP_TAIL)
    try:
        # In the package folder: a requirement such as ./libs/mylib is the package's own.
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    except OSError as exc:
        raise PackageError(f"{what} failed: cannot run {argv[0]}: {exc.strerror}") from None
    assert proc.stdout is not None
    system_managed = no_pip = False
    progress = PipProgress()
    with proc.stdout:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if line:
                if not line.startswith("Progress "):
                    tail.append(line[:300])
                shown = progress.feed(line)
                if shown is not None:
                    log.info("pip: %s", shown)
                log.log(logging.DEBUG if shown is not None or line.startswith("Progress ") else logging.INFO, "pip | %s", line)
                system_managed = system_managed or "externally-managed-environment" in line
                no_pip = no_pip or "No module named pip" in line
    code = proc.wait()
    if code == 0:
        return
    if system_managed:
        raise PackageError(
            f"{what} failed: pip refuses to install into {argv[0]}, which the system manages (PEP 668): "
            "install scaleout in a venv (python3 -m venv .venv; .venv/bin/pip install ...) and run it from there, "
            "or start the client with --managed-env"
        )
    if no_pip:
        raise PackageError(f"{what} failed: {argv[0]} has no pip: install it (python3 -m ensurepip, or the python3-pip package)")
    raise PackageError(f"{what} failed (pip exited with {code}): " + " | ".join(tail))


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"})  # its lines as they come
    env.pop("PYTHONPATH", None)  # install into the target Python's own site-packages
    return env


def check_can_install() -> None:
    """Refuse `run install` where there is no pip (the single-file executable)."""
    from scaleout.runtime import build_kind

    if build_kind() == "frozen":
        raise PackageError(
            "this scaleout is a single-file executable: it has no pip and cannot install packages; "
            "use the zipapp with a Python that has them, a venv install (pip install scaleout), or join --managed-env there"
        )


def install_here(env: PythonEnv) -> list[str]:
    """pip install ``env``'s requirements into the Python running scaleout; returns them."""
    check_can_install()
    reqs = env.requirements()
    if reqs:
        _pip_install([sys.executable, "-m", "pip"], reqs, f"installing the dependencies of {env.file.name}", env.file.parent)
    return reqs


# -- managed venvs --------------------------------------------------------------------------


def check_can_manage() -> None:
    """Refuse --managed-env where no venv can be made (the single-file executable)."""
    from scaleout.runtime import build_kind

    if build_kind() == "frozen":
        raise PackageError(
            "--managed-env needs a Python to make venvs with, and this is the single-file executable: "
            "use the zipapp (python3 scaleout.pyz join --managed-env ...) or a venv install of scaleout"
        )


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scaleout" / "envs"


def env_key(env: PythonEnv) -> str:
    from scaleout import __version__
    from scaleout.package.interpreter import library_homes

    h = hashlib.sha256(env.file.read_bytes())
    h.update(f"\0{sys.version_info[0]}.{sys.version_info[1]}\0{sys.executable}\0{library_homes()}\0{__version__}".encode())
    return h.hexdigest()[:16]


def ensure_managed_env(project: Project, cache: Path | None = None) -> Path | None:
    """The venv for the project's python_env file, made on first use (None: it names none)."""
    import fcntl

    env = project_env(project)
    if env is None:
        return None
    check_can_manage()
    base = (cache or default_cache()).absolute()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", env.name.strip(".")) or "env"
    venv = base / f"{name}-{env_key(env)}"
    with open(base / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # clients on one machine share the venv: one makes it
        if (venv / ".complete").is_file():
            log.info("managed env: using %s (cached for %s)", venv, env.file.name)
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # left half-made by an interrupted client
        log.info("managed env: creating %s for %s (pip's progress follows; large dependencies take minutes)", venv, env.file.name)
        reqs = env.requirements()
        try:
            _make_venv(venv, env, reqs)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        (venv / ".complete").write_text(json.dumps({"file": str(env.file), "requirements": reqs}))
    return venv


def _make_venv(venv: Path, env: PythonEnv, reqs: list[str]) -> None:
    from scaleout.package.interpreter import FEDN_SHIMS, library_homes

    have_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    cmd = [sys.executable, "-m", "venv", *(["--without-pip"] if have_pip else []), str(venv)]
    made = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if made.returncode != 0:
        tail = " | ".join(made.stderr.strip().splitlines()[-PIP_TAIL:])
        raise PackageError(f"could not create a venv in {venv} with {sys.executable} -m venv: {tail} (on Debian/Ubuntu: apt install python3-venv)")
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, env=_pip_env(),
    ).stdout.strip()
    if not site:
        raise PackageError(f"the venv in {venv} does not run ({python})")
    shims = venv / "scaleout-shims"
    for rel, text in FEDN_SHIMS.items():
        path = shims / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # After the venv's own packages: FEDn's helper modules, then scaleout's libraries.
    lines = [str(shims), *(str(home) for home in library_homes())]
    Path(site, "scaleout.pth").write_text("\n".join(lines) + "\n")
    if not reqs:
        return
    pip = [sys.executable, "-m", "pip", "--python", str(python)] if have_pip else [str(python), "-m", "pip"]
    _pip_install(pip, reqs, f"installing the dependencies of {env.file.name} into the managed env {venv.name}", env.file.parent)
