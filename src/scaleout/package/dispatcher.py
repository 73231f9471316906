"""Dispatcher packages: entry points that are shell commands, run as separate processes.

As in FEDn and Scaleout Edge's ``--dispatcher`` mode:

- ``build``: the command, with ``SCALEOUT_BUILD_OUTPUT_DIR`` set;
- ``startup`` (optional): once when the client starts (e.g. to fetch or split data);
- ``train``: ``<command> IN OUT``: IN is the global model as an .npz in numpyhelper's format,
  a list of arrays (``IN-metadata`` holds the session's training settings as JSON); the command writes the new
  model to OUT and its metadata (``{"num_examples": N, ...}``) as JSON to ``OUT-metadata``
  (``save_metadata(metadata, OUT)`` does that);
- ``validate`` and ``predict``: ``<command> IN OUT``, the command writes a JSON object to OUT
  (``save_metrics(report, OUT)``); a prediction's parameters are in ``IN-metadata``.

Each command runs through ``/bin/sh -c`` in the package folder, in its own process group,
with the package's Python first on PATH (see ``interpreter``), for at most its time limit;
its stdout and stderr go to the client log line by line. Whatever goes wrong (not found, not
executable, a non-zero exit, no output, output that is not what was asked for, too slow)
is one ``PackageCommandFailed`` naming the command, what happened and the last lines of stderr.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaleout.core.errors import PackageCommandFailed, PackageError, TaskAborted
from scaleout.package.interpreter import ProcessEnv
from scaleout.package.project import TASK_ENTRIES, Project

if TYPE_CHECKING:
    from scaleout.edge import EdgeClient, ScaleoutModel

log = logging.getLogger("scaleout.package")

DEFAULT_TIMEOUT_S = 3600.0  # per command; `timeout:` in the project file or join --command-timeout
KILL_GRACE_S = 1.5  # SIGTERM, then SIGKILL to the command's process group (within the client's 2 s exit grace)
STDERR_TAIL = 5  # lines of stderr quoted in a failure (the client log has them all)
METRIC_MARK = "##scaleout-metric "  # a line a package process prints to log metrics (JSON)
MAX_LINE = 64 * 1024  # bytes of one output line read at a time
MAX_JSON_FILE = 16 << 20  # a report or metadata file larger than this is not read (results are 64 KiB at most)
NO_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")


def dispatcher_command(project: Project, name: str) -> str | None:
    """The command of entry point ``name`` in dispatcher mode: its command, or ``python FILE``
    for an entry naming a .py file (``train: train.py``)."""
    command = project.entry_command(name)
    if command is not None:
        return command
    value = project.entry_points.get(name)
    if isinstance(value, str) and project.entry_file(name) is not None:
        return f"python {shlex.quote(value.strip())}"
    return None


def run_command(
    entry: str,
    command: str,
    args: list[str],
    cwd: Path,
    penv: ProcessEnv,
    timeout: float,
    abort: threading.Event | None = None,
    abort_reason: Callable[[], str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    on_metric: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run ``command ARGS...`` to completion; raise PackageCommandFailed unless it exits 0, or
    TaskAborted when ``abort`` is set while it runs (the process group is killed either way)."""
    _check_program(entry, command, cwd, penv)
    line = " ".join([command, *(shlex.quote(a) for a in args)])
    env = penv.environ()
    env.update(extra_env or {})
    log.info("%s: running `%s` in %s", entry, line, cwd)
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", line], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
    except OSError as exc:
        raise PackageCommandFailed(entry, command, f"could not start: {exc.strerror or exc}") from exc
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout, f"{entry} stdout", None, on_metric), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, f"{entry} stderr", tail, None), daemon=True),
    ]
    for t in readers:
        t.start()
    started = time.monotonic()
    stopped: str | None = None
    while True:
        try:
            code = proc.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        if abort is not None and abort.is_set():
            stopped = "aborted"
        elif time.monotonic() - started > timeout:
            stopped = "timeout"
        if stopped:
            code = _kill(proc)
            break
    try:  # what the command left running in the background (dataloader workers ...) goes with it
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for t in readers:
        t.join(timeout=2)  # a grandchild that left the group may hold the pipes: do not wait for it
    if stopped == "aborted":
        raise TaskAborted(f"task aborted: {abort_reason() if abort_reason else 'the session was stopped'}")
    if stopped == "timeout":
        raise PackageCommandFailed(
            entry, command, f"did not finish within {timeout:g}s and was killed", list(tail),
            "raise its limit with `timeout:` on the entry point in the project file or `scaleout join --command-timeout`",
        )
    if code != 0:
        raise PackageCommandFailed(entry, command, _exit_text(code), list(tail), _hint(list(tail)), exit_code=code)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == 127:
        return "exited with 127 (command not found)"
    if code == 126:
        return "exited with 126 (not executable)"
    return f"exited with {code}"


def _hint(tail: list[str]) -> str:
    from scaleout.runtime import missing_module_hint, pip_name

    for line in reversed(tail):
        found = NO_MODULE.search(line)
        if found:
            module = found.group(1)
            return f"the package needs module {module!r} (pip install {pip_name(module)}): {missing_module_hint(module)}"
    return ""


def _check_program(entry: str, command: str, cwd: Path, penv: ProcessEnv) -> None:
    """A clear failure for a program named by path that is missing or not executable
    (``./train.sh``); other names are left to the shell (builtins, PATH)."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise PackageCommandFailed(entry, command, f"is not a valid shell command ({exc})") from None
    if not words or "/" not in words[0] or "=" in words[0]:
        return
    program = Path(cwd, words[0])
    if not program.exists():
        raise PackageCommandFailed(entry, command, f"cannot run: {words[0]} does not exist in {cwd}")
    if program.is_dir() or not os.access(program, os.X_OK):
        raise PackageCommandFailed(entry, command, f"cannot run: {words[0]} is not executable (chmod +x {words[0]})")


def _pump(stream: Any, entry: str, tail: collections.deque[str] | None, on_metric: Callable[[dict[str, Any]], None] | None) -> None:
    """Copy a command's output to the log a line at a time (keeping stderr's last lines)."""
    with stream:
        for raw in iter(lambda: stream.readline(MAX_LINE), b""):  # a line without end is cut, not held
            text = raw.decode(errors="replace").rstrip("\r\n")
            if on_metric is not None and text.startswith(METRIC_MARK):
                try:
                    on_metric(json.loads(text[len(METRIC_MARK):]))
                except (ValueError, TypeError) as exc:
                    log.warning("%s: ignoring a malformed metric line: %s", entry, exc)
                continue
            if tail is not None:
                tail.append(text[:500])
            log.info("%s | %s", entry, text[:4096])


def _kill(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the process group, SIGKILL it after KILL_GRACE_S; return the exit status."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


class Dispatcher:
    """Runs a package's entry points as commands for an EdgeClient (``attach``)."""

    def __init__(
        self, project: Project, penv: ProcessEnv, timeout: float | None = None, commands: Mapping[str, str] | None = None, as_list: bool = True,
    ) -> None:
        self.project = project
        self.as_list = as_list  # FEDn commands get a list of arrays; scaleout's host the model as it is
        self.penv = penv
        self.timeout = timeout or DEFAULT_TIMEOUT_S
        self.commands: dict[str, str] = dict(commands) if commands is not None else {}
        if commands is None:
            for name in ("startup", *TASK_ENTRIES):
                command = dispatcher_command(project, name)
                if command is not None:
                    self.commands[name] = command
        self.client: EdgeClient | None = None

    def limit(self, entry: str) -> float:
        return self.project.entry_timeout(entry) or self.timeout

    def run(self, entry: str, args: list[str], extra_env: Mapping[str, str] | None = None) -> None:
        command = self.commands.get(entry)
        if command is None:
            raise PackageError(f"{self.project.root / self.project.file} has no {entry} command")
        client = self.client
        run_command(
            entry, command, args, self.project.root, self.penv, self.limit(entry),
            abort=client._abort if client is not None else None,
            abort_reason=(lambda: client._abort_reason) if client is not None else None,
            extra_env=extra_env, on_metric=self._metric if client is not None else None,
        )

    def _metric(self, body: dict[str, Any]) -> None:
        if self.client is not None and isinstance(body, dict) and isinstance(body.get("metrics"), dict):
            self.client.log_metric(body["metrics"], body.get("step"), bool(body.get("commit", True)))

    def attach(self, client: EdgeClient) -> None:
        """Run the startup command (if any), then register train/validate/predict callbacks."""
        self.client = client
        if "train" not in self.commands:
            raise PackageError(
                f"{self.project.root / self.project.file} has no train command: a dispatcher package runs "
                "`train: {command: python train.py}` (and validate, predict) as commands"
            )
        if "startup" in self.commands:
            self.run("startup", [])
        client.set_train_callback(self.train)
        if "validate" in self.commands:
            client.set_validate_callback(self.validate)
        if "predict" in self.commands:
            client.set_predict_callback(self.predict_model)
        log.info("dispatcher: %s", ", ".join(f"{k}: `{v}`" for k, v in self.commands.items()))

    # -- tasks --------------------------------------------------------------------------

    def train(self, model: ScaleoutModel, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from scaleoututil.helpers.numpyhelper import Helper

        params = model.get_model_params()
        with tempfile.TemporaryDirectory(prefix="scaleout-task-") as tmp:
            inp, out = Path(tmp, "in.npz"), Path(tmp, "out.npz")
            Helper().save(_as_list(params) if self.as_list else params, inp)
            _write_json(Path(f"{inp}-metadata"), settings)
            self.run("train", [str(inp), str(out)])
            new = self._read_model(out, params)
            meta_file = Path(f"{out}-metadata")
            if not meta_file.is_file():
                raise PackageCommandFailed(
                    "train", self.commands["train"],
                    "wrote no OUT-metadata file (write {\"num_examples\": N} as JSON with save_metadata(metadata, OUT))",
                )
            metadata = self._read_json(meta_file, "train", "OUT-metadata")
        if isinstance(metadata.get("training_metadata"), dict):
            return new, metadata
        return new, {"training_metadata": metadata}

    def _read_model(self, out: Path, params: Any) -> Any:
        from scaleoututil.helpers.numpyhelper import Helper

        command = self.commands["train"]
        if not out.is_file():
            raise PackageCommandFailed("train", command, "exited 0 but wrote no model to OUT (save it with helper.save(params, OUT))")
        try:
            new = Helper().load(out)
        except Exception as exc:  # numpy raises many kinds on a file that is not an .npz
            raise PackageCommandFailed("train", command, f"wrote a model file that is not an .npz in numpyhelper's format ({type(exc).__name__}: {exc})") from None
        if len(new) != len(params):
            raise PackageCommandFailed("train", command, f"wrote a model of {len(new)} arrays to OUT; the global model has {len(params)}")
        if isinstance(params, dict) and isinstance(new, list):
            return dict(zip(params, new))  # saved as a list: keep the global model's tensor names
        return new

    def _read_json(self, path: Path, entry: str, what: str) -> dict[str, Any]:
        command = self.commands[entry]
        size = path.stat().st_size
        if size > MAX_JSON_FILE:
            raise PackageCommandFailed(entry, command, f"wrote {size:,} bytes of {what}: a result is a few numbers, not data (at most 64 KiB as JSON)")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise PackageCommandFailed(entry, command, f"wrote {what} that is not JSON ({exc})") from None
        if not isinstance(value, dict):
            raise PackageCommandFailed(entry, command, f"wrote {what} that is not a JSON object but {type(value).__name__}")
        return value

    def _report(self, entry: str, model: ScaleoutModel, params: dict[str, Any] | None) -> dict[str, Any]:
        from scaleoututil.helpers.numpyhelper import Helper

        with tempfile.TemporaryDirectory(prefix="scaleout-task-") as tmp:
            inp, out = Path(tmp, "in.npz"), Path(tmp, "out.json")
            arrays = model.get_model_params()
            Helper().save(_as_list(arrays) if self.as_list else arrays, inp)
            if params is not None:
                _write_json(Path(f"{inp}-metadata"), params)
            self.run(entry, [str(inp), str(out)])
            if not out.is_file():
                raise PackageCommandFailed(entry, self.commands[entry], "exited 0 but wrote nothing to OUT (write a JSON object with save_metrics(report, OUT))")
            return self._read_json(out, entry, "OUT")

    def validate(self, model: ScaleoutModel) -> dict[str, Any]:
        return self._report("validate", model, None)

    def predict_model(self, model: ScaleoutModel, params: dict[str, Any]) -> dict[str, Any]:
        return self._report("predict", model, params)

    def predict(self, model_bytes: bytes, params: dict[str, Any]) -> dict[str, Any]:
        """Run the predict command on a model given as safetensors bytes."""
        from scaleout.edge import ScaleoutModel

        return self.predict_model(ScaleoutModel(model_bytes), params)


def _as_list(params: Any) -> Any:
    """Commands get a list of arrays, as FEDn gave them (a named model in its order; the names
    come back when the command saves a list)."""
    return list(params.values()) if isinstance(params, Mapping) else params


def _write_json(path: Path, value: Any) -> None:
    from scaleout.edge import json_safe

    path.write_text(json.dumps(json_safe(value)), encoding="utf-8")
