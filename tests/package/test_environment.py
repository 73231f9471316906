"""python_env.yaml: reading it, `scaleout run install`, and managed venvs (made offline: their
dependencies are ones scaleout's own environment already satisfies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.errors import PackageCommandFailed, PackageError
from scaleout.edge import EdgeClient
from scaleout.package.environment import ensure_managed_env, read_python_env
from scaleout.package.loader import load_startup
from scaleout.package.project import load_project

from .conftest import MakePackage

ENV_YAML = "name: .test-env\nbuild_dependencies:\n  - pip\ndependencies:\n  - fedn\n  - numpy>=1.20\n"
IMPORTING = {
    "scaleout.yaml": "python_env: python_env.yaml\nentry_points:\n  startup: startup.py\n",
    "python_env.yaml": ENV_YAML,
    "startup.py": (
        "import sys\nimport numpy as np\nfrom scaleout import ScaleoutModel\n"
        "def startup(client):\n"
        "    def train(model, settings):\n"
        "        client.log_metric({'loss': 1.0})\n"
        "        params = model.get_model_params()\n"
        "        params = {k: v + 1 for k, v in params.items()} if isinstance(params, dict) else [p + 1 for p in params]\n"
        "        return ScaleoutModel.from_model_params(params), {'training_metadata': {'num_examples': 5, 'prefix': sys.prefix}}\n"
        "    client.set_train_callback(train)\n"
        "    client.set_validate_callback(lambda model: {'prefix': sys.prefix})\n"
        "    client.set_custom_callback('hello', lambda params: {'hi': params['who']})\n"
    ),
}


def scaleout(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scaleout", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_python_env_is_read_and_scaleouts_own_distributions_are_skipped(make_package: MakePackage) -> None:
    root = make_package({"python_env.yaml": ENV_YAML})
    env = read_python_env(root / "python_env.yaml")
    assert env.name == ".test-env"
    assert env.requirements() == ["pip", "numpy>=1.20"]  # fedn: scaleout gives packages its helpers


@pytest.mark.parametrize(
    ("text", "message"),
    [("- numpy\n", "must be a mapping"), ("dependencies: numpy\n", "'dependencies' must be a list"), ("dependencies: [1]\n", "'dependencies' must be a list"), ("a: [\n", "is not valid YAML")],
)
def test_a_malformed_python_env_is_refused(make_package: MakePackage, text: str, message: str) -> None:
    root = make_package({"python_env.yaml": text})
    with pytest.raises(PackageError, match=message):
        read_python_env(root / "python_env.yaml")


def test_a_python_env_named_but_missing_is_a_clear_error(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package({"scaleout.yaml": "python_env: env.yaml\nentry_points:\n  startup: startup.py\n"})
    with pytest.raises(PackageError, match=r"names python_env 'env.yaml', but .* does not exist"):
        ensure_managed_env(load_project(root), tmp_path / "envs")


def test_managed_env_runs_an_importing_package_in_its_venv_and_is_cached(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package(IMPORTING)
    cache = tmp_path / "envs"
    client = EdgeClient("env-1")
    seen: list[dict[str, float]] = []
    client._metric_sink = lambda metrics, step: seen.append(metrics)
    load_startup(root, client, managed_env=True, env_cache=cache)
    assert client.registered() == ["train", "validate", "custom:hello"]
    (venv,) = [p for p in cache.iterdir() if p.is_dir()]
    assert venv.name.startswith("test-env-") and (venv / ".complete").is_file()
    data, meta = client.run_train(payload.encode([np.zeros(3, np.float32)]), {})
    assert payload.decode(data)[0].tolist() == [1, 1, 1] and seen == [{"loss": 1.0}]
    # The callbacks ran in the venv's Python, not in this one.
    assert Path(meta["training_metadata"]["prefix"]).resolve() == venv.resolve()
    assert Path(client.run_validate(data)["prefix"]).resolve() == venv.resolve()
    # A model with named tensors reaches the callback as a dict, in its order, and comes back so.
    named, _ = client.run_train(payload.encode({"w": np.zeros(2, np.float32), "b": np.ones(1, np.float32)}), {})
    assert [(k, v.tolist()) for k, v in payload.decode(named).items()] == [("w", [1, 1]), ("b", [2])]
    assert client.run_custom("hello", {"who": "you"}) == {"hi": "you"}
    # Cached by the file's hash: another client (or a restart) reuses it at once.
    stamp = (venv / ".complete").stat().st_mtime_ns
    load_startup(root, EdgeClient("env-2"), managed_env=True, env_cache=cache)
    assert (venv / ".complete").stat().st_mtime_ns == stamp and len([p for p in cache.iterdir() if p.is_dir()]) == 1
    # The fedn helper shims and scaleout's libraries are there, after the venv's own packages.
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import fedn.utils.helpers.helpers as h, scaleoututil, numpy; print(h.save_metrics.__module__)"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert r.returncode == 0 and r.stdout.strip() == "scaleoututil.helpers.helpers", r.stderr
    # A changed file makes a new venv.
    (root / "python_env.yaml").write_text(ENV_YAML + "  - pip\n")
    load_startup(root, EdgeClient("env-3"), managed_env=True, env_cache=cache)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_a_failing_callback_in_the_managed_env_is_one_line(make_package: MakePackage, tmp_path: Path) -> None:
    files = dict(IMPORTING)
    files["startup.py"] = "def startup(client):\n    client.set_train_callback(lambda m, s: 1 / 0)\n"
    root = make_package(files)
    client = EdgeClient("env-x")
    load_startup(root, client, managed_env=True, env_cache=tmp_path / "envs")
    with pytest.raises(PackageCommandFailed, match=r"train failed: ZeroDivisionError: division by zero \(startup.py:2\)"):
        client.run_train(payload.encode([np.zeros(3, np.float32)]), {})


def test_a_failed_install_is_one_error_with_pips_last_lines(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package({**IMPORTING, "python_env.yaml": "dependencies:\n  - ./no-such-local-dir\n"})
    cache = tmp_path / "envs"
    started = time.monotonic()
    with pytest.raises(PackageError) as info:
        ensure_managed_env(load_project(root), cache)
    message = str(info.value)
    assert "installing the dependencies of python_env.yaml into the managed env" in message
    assert "pip exited with 1" in message and "no-such-local-dir" in message, message
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no half-made venv is left to be reused
    assert time.monotonic() - started < 60


def test_run_install(make_package: MakePackage) -> None:
    root = make_package({**IMPORTING, "python_env.yaml": "dependencies:\n  - fedn\n  - numpy\n"})
    r = scaleout("run", "install", "-p", str(root), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["requirements"] == ["numpy"]
    r = scaleout("run", "install", "-p", str(root), "--json")  # already satisfied: nothing to fetch
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"python": sys.executable, "file": str(root / "python_env.yaml"), "installed": ["numpy"]}
    (root / "python_env.yaml").write_text("dependencies:\n  - ./no-such-local-dir\n")
    r = scaleout("run", "install", "-p", str(root))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("scaleout: error:")]
    assert "installing the dependencies of python_env.yaml failed (pip exited with 1)" in line
    (root / "scaleout.yaml").write_text("entry_points:\n  startup: startup.py\n")
    r = scaleout("run", "install", "-p", str(root))
    assert r.returncode == 0 and "names no python_env: nothing to install" in r.stdout
    r = scaleout("run", "install", "-p", str(root / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_the_single_file_executable_refuses_to_install_or_make_venvs(make_package: MakePackage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scaleout.package.environment import check_can_manage, install_here

    root = make_package(IMPORTING)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    with pytest.raises(PackageError, match="--managed-env needs a Python to make venvs with"):
        check_can_manage()
    with pytest.raises(PackageError, match="single-file executable: it has no pip"):
        install_here(read_python_env(root / "python_env.yaml"))
    with pytest.raises(PackageError, match="--managed-env needs a Python"):
        ensure_managed_env(load_project(root), tmp_path / "envs")
    assert not (tmp_path / "envs").exists()


def test_pip_refusing_a_system_managed_python_says_what_to_do() -> None:
    from scaleout.package.environment import _pip

    lines = "echo 'error: externally-managed-environment'; for i in 1 2 3 4 5 6 7 8 9 10; do echo hint $i; done; exit 1"
    with pytest.raises(PackageError) as info:
        _pip(["/bin/sh", "-c", lines], "installing the dependencies of python_env.yaml")
    message = str(info.value)
    assert "pip refuses to install into /bin/sh, which the system manages (PEP 668)" in message
    assert "python3 -m venv" in message and "--managed-env" in message and "hint 10" not in message


def test_build_in_the_managed_env(make_package: MakePackage, tmp_path: Path) -> None:
    build = "import os, sys\ndef build():\n    open(os.path.join(os.environ['SCALEOUT_BUILD_OUTPUT_DIR'], 'prefix.txt'), 'w').write(sys.prefix)\n"
    root = make_package({**IMPORTING, "scaleout.yaml": IMPORTING["scaleout.yaml"] + "  build: build.py\n", "build.py": build})
    cache = tmp_path / "envs"
    r = scaleout("run", "build", "-p", str(root), "-o", str(tmp_path / "out"), "--managed-env", "--env-cache", str(cache))
    assert r.returncode == 0, r.stderr
    (venv,) = [p for p in cache.iterdir() if p.is_dir()]
    assert Path((tmp_path / "out" / "prefix.txt").read_text()).resolve() == venv.resolve()
    assert f"wrote {tmp_path / 'out' / 'prefix.txt'}" in r.stdout


# Lines as pip 26 prints them for `install --progress-bar raw` (a 3 MiB wheel downloaded, one
# requirement already there), with its other chatter.
PIP_OUTPUT = """\
Looking in indexes: https://pypi.org/simple
Collecting tinylib==1.0 (from -r /tmp/scaleout-pip-x/requirements.txt (line 1))
  Downloading https://files.example/packages/tinylib-1.0-py3-none-any.whl (3.0 MB)
Progress 0 of 3145728
Progress 262144 of 3145728
Progress 1048576 of 3145728
Progress 1310720 of 3145728
Progress 3145728 of 3145728
Requirement already satisfied: numpy>=1.20 in /usr/lib/python3/site-packages (from -r req.txt (line 2)) (2.4.6)
Collecting small==2.0
  Using cached small-2.0-py3-none-any.whl (12 kB)
Installing collected packages: small, tinylib
Successfully installed small-2.0 tinylib-1.0
"""


def test_pip_output_becomes_a_line_per_package_and_download_progress() -> None:
    from scaleout.package.environment import PipProgress

    progress = PipProgress()
    shown = [s for line in PIP_OUTPUT.splitlines() if (s := progress.feed(line)) is not None]
    assert shown == [
        "collecting tinylib==1.0",
        "downloading tinylib-1.0-py3-none-any.whl (3.0 MB)",
        "downloading tinylib-1.0-py3-none-any.whl: 0% of 3.0 MiB",
        "downloading tinylib-1.0-py3-none-any.whl: 30% of 3.0 MiB",
        "downloading tinylib-1.0-py3-none-any.whl: 40% of 3.0 MiB",
        "downloading tinylib-1.0-py3-none-any.whl: 100% of 3.0 MiB",
        "numpy>=1.20: already satisfied",
        "collecting small==2.0",
        "using cached small-2.0-py3-none-any.whl",
        "installing small, tinylib",
        "installed small-2.0 tinylib-1.0",
    ]


def test_making_a_managed_env_names_its_path_and_shows_pip_a_package_at_a_time(
    make_package: MakePackage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_package(IMPORTING)
    with caplog.at_level("INFO", logger="scaleout.package"):
        venv = ensure_managed_env(load_project(root), tmp_path / "envs")
    assert venv is not None
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert any(f"managed env: creating {venv}" in line for line in lines), lines
    assert "pip: numpy>=1.20: already satisfied" in lines, lines  # was: only pip's own lines, after it finished
