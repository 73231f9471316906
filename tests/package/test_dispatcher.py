"""Dispatcher packages: entry points run as real processes, and every way a command can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.errors import PackageCommandFailed, PackageError, TaskAborted
from scaleout.edge import EdgeClient
from scaleout.package import interpreter
from scaleout.package.dispatcher import Dispatcher, run_command
from scaleout.package.loader import load_startup
from scaleout.package.project import load_project

from .conftest import MakePackage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SEED = [np.zeros((10, 3), np.float32), np.zeros(3, np.float32)]


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def attached(root: Path, **kw: object) -> EdgeClient:
    client = EdgeClient("disp-1")
    load_startup(root, client, **kw)  # type: ignore[arg-type]
    return client


def test_dispatcher_package_trains_validates_and_predicts(tmp_path: Path) -> None:
    client = attached(copy_fixture("dispatch_client", tmp_path))
    assert client.registered() == ["train", "validate", "predict"]
    before = client.run_validate(payload.encode(SEED))["test_accuracy"]
    data, meta = client.run_train(payload.encode(SEED), {"epochs": 10, "learning_rate": 0.5})
    # OUT-metadata held FEDn's bare training metadata: it is what training_metadata becomes.
    assert meta == {"training_metadata": {"num_examples": 300, "lr": 0.5}}
    trained = payload.decode(data)
    assert [a.shape for a in trained] == [(10, 3), (3,)] and trained[0].dtype == np.float32
    after = client.run_validate(data)["test_accuracy"]
    assert before < 0.5 < after, (before, after)
    assert len(client.run_predict(data, {"n": 4})["predicted_class"]) == 4


def test_a_named_model_keeps_its_names_when_the_command_saves_a_list(tmp_path: Path) -> None:
    client = attached(copy_fixture("dispatch_client", tmp_path))
    named = {"weight": SEED[0], "bias": SEED[1]}
    data, _ = client.run_train(payload.encode(named), {})
    assert list(payload.decode(data)) == ["weight", "bias"]


def test_fedn_project_runs_its_startup_command_and_fedn_helpers(tmp_path: Path) -> None:
    root = copy_fixture("fedn_client", tmp_path)
    client = attached(root)
    assert (root / "data" / "train.npz").is_file()  # `startup: python data.py` ran in the package folder
    seed = [np.zeros((8, 3), np.float32), np.zeros(3, np.float32)]
    data, meta = client.run_train(payload.encode(seed), {})
    assert meta["training_metadata"]["num_examples"] == 400
    assert client.run_validate(data)["test_accuracy"] > 0.5


def test_fedn_helpers_are_only_on_the_path_of_package_code(make_package: MakePackage, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_package({
        "scaleout.yaml": "entry_points:\n  startup: startup.py\n",
        "startup.py": (
            "from fedn.utils.helpers.helpers import get_helper, save_metrics\n"
            "def startup(client):\n    client.set_validate_callback(lambda m: {'helper': get_helper('numpyhelper').name})\n"
        ),
    })
    client = attached(root)
    assert client.run_validate(payload.encode(SEED)) == {"helper": "numpyhelper"}
    lib = interpreter.shim_lib()
    assert lib is not None and sys.path[-1] == str(lib)  # after everything: a real install wins
    # In a client, Python processes the package code starts find them too.
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    interpreter.export_shims()
    r = subprocess.run([sys.executable, "-c", "import fedn.utils.helpers.helpers"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    monkeypatch.undo()
    # Not installed: a Python that does not run package code cannot import them.
    r = subprocess.run([sys.executable, "-c", "import fedn"], capture_output=True, text=True)
    assert "No module named 'fedn'" in r.stderr


def test_a_real_fedn_is_not_shadowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "site" / "fedn"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [n for n in sys.modules if n == "fedn" or n.startswith("fedn.")]:
        monkeypatch.delitem(sys.modules, name)  # the shims another test imported
    assert interpreter.real_fedn_installed() and interpreter.shim_lib() is None


def failing(make_package: MakePackage, files: dict[str, str], train: str = "python train.py") -> tuple[EdgeClient, Path]:
    root = make_package({"scaleout.yaml": f"entry_points:\n  train:\n    command: {train}\n    timeout: 20\n", **files})
    return attached(root), root


def train_error(client: EdgeClient) -> str:
    with pytest.raises(PackageCommandFailed) as info:
        client.run_train(payload.encode(SEED), {})
    return str(info.value)


def test_a_command_that_exits_non_zero_names_its_code_and_stderr(make_package: MakePackage) -> None:
    client, _ = failing(make_package, {"train.py": "import sys\nprint('loading data', file=sys.stderr)\nsys.exit('no data in /data/x')\n"})
    message = train_error(client)
    assert message.startswith("train command `python train.py` exited with 1"), message
    assert "its stderr ended: loading data | no data in /data/x" in message


def test_a_missing_or_not_executable_program_is_named(make_package: MakePackage) -> None:
    client, root = failing(make_package, {"train.sh": "#!/bin/sh\nexit 0\n"}, train="./train.sh")
    assert "./train.sh is not executable (chmod +x ./train.sh)" in train_error(client)
    (root / "train.sh").unlink()
    assert "./train.sh does not exist in" in train_error(client)
    client, _ = failing(make_package, {}, train="no-such-program-here")
    message = train_error(client)
    assert "exited with 127 (command not found)" in message and "no-such-program-here" in message


SAVE_TWO = "import numpy as np\nnp.savez(sys.argv[2], np.zeros((10, 3)), np.zeros(3))\n"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("pass\n", "exited 0 but wrote no model to OUT"),
        ("open(sys.argv[2], 'w').write('junk')\n", "wrote a model file that is not an .npz in numpyhelper's format"),
        ("import numpy as np\nnp.savez(sys.argv[2], np.zeros(3))\n", "wrote a model of 1 arrays to OUT; the global model has 2"),
        (SAVE_TWO, "wrote no OUT-metadata file"),
        (
            SAVE_TWO +
            "open(sys.argv[2] + '-metadata', 'w').write('{not json')\n",
            "wrote OUT-metadata that is not JSON",
        ),
    ],
)
def test_a_train_command_without_usable_output_fails_clearly(make_package: MakePackage, script: str, expected: str) -> None:
    client, _ = failing(make_package, {"train.py": "import sys\n" + script})
    assert expected in train_error(client)


def test_validate_output_must_be_a_json_object(make_package: MakePackage) -> None:
    root = make_package({
        "scaleout.yaml": "entry_points:\n  train: python train.py\n  validate: python validate.py\n",
        "train.py": "", "validate.py": "import sys\nopen(sys.argv[2], 'w').write('[1, 2]')\n",
    })
    with pytest.raises(PackageCommandFailed, match="wrote OUT that is not a JSON object but list"):
        attached(root).run_validate(payload.encode(SEED))


def test_a_huge_report_is_refused_unread_and_a_huge_line_is_cut(make_package: MakePackage, caplog: pytest.LogCaptureFixture) -> None:
    root = make_package({
        "scaleout.yaml": "entry_points:\n  train: python train.py\n  validate: python validate.py\n",
        "train.py": "",
        "validate.py": "import sys\nprint('x' * 200_000)\nopen(sys.argv[2], 'w').write('[' + '0,' * 9_000_000 + '0]')\n",
    })
    with caplog.at_level("INFO", logger="scaleout.package"), pytest.raises(PackageCommandFailed, match=r"wrote 18,000,003 bytes of OUT: a result is a few numbers"):
        attached(root).run_validate(payload.encode(SEED))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validate stdout | x")]
    assert lines and all(len(line) < 5000 for line in lines)


def test_a_command_past_its_time_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(PackageCommandFailed, match=r"did not finish within 0.5s and was killed") as info:
        run_command("train", f"sleep 60 & echo $! > {pidfile}; wait", [], tmp_path, interpreter.current(), 0.5)
    assert time.monotonic() - started < 10
    assert "--command-timeout" in str(info.value)
    child = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # the shell's child went with the process group
        for _ in range(100):
            os.kill(child, 0)
            time.sleep(0.05)


def test_a_command_leaves_nothing_running(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    run_command("train", f"sleep 60 & echo $! > {pidfile}", [], tmp_path, interpreter.current(), 30)
    child = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(child, 0)
            time.sleep(0.05)


def test_an_abort_stops_the_command(tmp_path: Path) -> None:
    abort = threading.Event()
    threading.Timer(0.3, abort.set).start()
    with pytest.raises(TaskAborted, match="the session stopped here"):
        run_command("train", "sleep 60", [], tmp_path, interpreter.current(), 60, abort=abort, abort_reason=lambda: "the session stopped here")


def test_a_missing_module_names_the_pip_distribution_and_managed_env(make_package: MakePackage) -> None:
    client, _ = failing(make_package, {"train.py": "import cv2.data\n"})
    message = train_error(client)
    assert "No module named 'cv2'" in message
    assert "the package needs module 'cv2' (pip install opencv-python)" in message and "--managed-env" in message


def test_python_means_the_python_running_scaleout(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    run_command("train", f"python -c 'import sys, numpy, scaleoututil; print(sys.executable)' > {out}", [], tmp_path, interpreter.current(), 30)
    assert Path(out.read_text().strip()).resolve() == Path(sys.executable).resolve()


def test_metrics_printed_by_a_package_process_are_logged(make_package: MakePackage) -> None:
    root = make_package({
        "scaleout.yaml": "entry_points:\n  train: python train.py\n",
        "train.py": "print('##scaleout-metric ' + '{\"metrics\": {\"loss\": 0.5}, \"step\": 2}')\nprint('##scaleout-metric {bad')\n",
    })
    client = EdgeClient("m")
    seen: list[tuple[dict[str, float], int | None]] = []
    client._metric_sink = lambda metrics, step: seen.append((metrics, step))
    load_startup(root, client)
    with pytest.raises(PackageCommandFailed):
        client.run_train(payload.encode(SEED), {})
    assert seen == [({"loss": 0.5}, 2)]


def test_dispatcher_flag_on_an_importing_package_says_what_is_missing(make_package: MakePackage) -> None:
    root = make_package({"scaleout.yaml": "entry_points:\n  startup: startup.py\n", "startup.py": "def startup(c): pass\n"})
    with pytest.raises(PackageError, match="has no train command"):
        attached(root, dispatcher=True)
    # `train: train.py` in dispatcher mode is `python train.py`.
    root = make_package({"scaleout.yaml": "entry_points:\n  train: train.py\n", "train.py": "import sys; sys.exit(3)\n"}, name="file-entry")
    with pytest.raises(PackageCommandFailed, match=r"train command `python train.py` exited with 3"):
        attached(root, dispatcher=True).run_train(payload.encode(SEED), {})


def test_a_bad_timeout_in_the_project_file_is_refused(make_package: MakePackage) -> None:
    root = make_package({"scaleout.yaml": "entry_points:\n  train:\n    command: python t.py\n    timeout: -1\n"})
    with pytest.raises(PackageError, match="timeout must be a number of seconds above 0"):
        load_project(root)


def test_dispatcher_predict_takes_model_bytes(tmp_path: Path) -> None:
    root = copy_fixture("dispatch_client", tmp_path)
    dispatcher = Dispatcher(load_project(root), interpreter.current())
    assert len(dispatcher.predict(payload.encode(SEED), {"n": 2})["predicted_class"]) == 2


def test_the_single_file_executable_acts_as_python(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("import sys, scaleoututil\nprint(sys.argv[1:], __name__)\nsys.exit(4)\n")
    env = {**os.environ, "SCALEOUT_AS_PYTHON": "1"}
    r = subprocess.run([sys.executable, "-m", "scaleout", "-u", str(script), "a", "b"], capture_output=True, text=True, env=env)
    assert r.returncode == 4 and r.stdout.strip() == "['a', 'b'] __main__", r
    r = subprocess.run([sys.executable, "-m", "scaleout", "-c", "raise ValueError('x')"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "ValueError: x" in r.stderr


def test_a_build_command_gets_the_output_dir_or_writes_beside_the_package(make_package: MakePackage, tmp_path: Path) -> None:
    from scaleout.package.build import run_build

    root = make_package({
        "scaleout.yaml": "entry_points:\n  build:\n    command: python model.py\n  train: python train.py\n",
        "model.py": "import os, numpy as np\nnp.savez(os.path.join(os.environ['SCALEOUT_BUILD_OUTPUT_DIR'], 'seed.npz'), np.zeros(2))\n",
    })
    assert run_build(root, tmp_path / "out") == [(tmp_path / "out" / "seed.npz").resolve()]
    # FEDn's mnist-pytorch: init_seed("../seed.npz"), whatever the output folder.
    (root / "model.py").write_text("import numpy as np\nnp.savez('../seed.npz', np.zeros(2))\n")
    assert run_build(root, tmp_path / "out2") == [(root.parent / "seed.npz").resolve()]
    (root / "model.py").write_text("import sys\nsys.exit('no torch here')\n")
    with pytest.raises(PackageCommandFailed, match=r"build command `python model.py` exited with 1; its stderr ended: no torch here"):
        run_build(root, tmp_path / "out3")
