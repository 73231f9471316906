from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from scaleout.core.errors import PackageError
from scaleout.package.build import run_build
from scaleout.package.loader import load_startup

from .conftest import IMPORTING_YAML, MakePackage

BUILD = """\
import os
import numpy as np

def build():
    out = os.environ["SCALEOUT_BUILD_OUTPUT_DIR"]
    np.savez_compressed(os.path.join(out, "seed.npz"), **{"0": np.arange(10, dtype=np.float32)})
    with open("cwd.txt", "w") as f:  # relative: lands in the package root
        f.write(os.getcwd())
"""


def test_build_writes_seed_to_output_dir(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "build.py": BUILD, "untouched.txt": "x"})
    out = tmp_path / "out"
    cwd, path = os.getcwd(), list(sys.path)
    os.environ.pop("SCALEOUT_BUILD_OUTPUT_DIR", None)

    assert run_build(root, out) == [out.resolve() / "seed.npz"]
    np.testing.assert_array_equal(np.load(out / "seed.npz")["0"], np.arange(10))
    assert (root / "cwd.txt").read_text() == str(root.resolve())
    assert not (root / "__pycache__").exists()
    assert os.getcwd() == cwd and sys.path == path
    assert "SCALEOUT_BUILD_OUTPUT_DIR" not in os.environ


def test_build_defaults_to_root(make_package: MakePackage) -> None:
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "build.py": BUILD, "untouched.txt": "x"})
    assert run_build(root) == sorted([root.resolve() / "seed.npz", root.resolve() / "cwd.txt"])


def test_build_failure_is_a_package_error(make_package: MakePackage) -> None:
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "build.py": "def build():\n    raise ValueError('boom')\n"})
    with pytest.raises(PackageError, match=r"build\(\) in .*build.py failed: ValueError: boom") as info:
        run_build(root)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"scaleout.yaml": "entry_points:\n  startup: startup.py\n"}, "no importing entry point 'build'"),
        ({"scaleout.yaml": IMPORTING_YAML}, "does not exist"),
        ({"scaleout.yaml": IMPORTING_YAML, "build.py": "x = 1\n"}, r"defines no build\(\)"),
        ({"scaleout.yaml": IMPORTING_YAML, "build.py": "def build(:\n"}, "importing .*build.py failed: SyntaxError"),
        ({"scaleout.yaml": IMPORTING_YAML, "build.py": "import sys\nsys.exit(3)\n"}, "SystemExit"),
    ],
)
def test_broken_build_entry(make_package: MakePackage, files: dict[str, str], message: str) -> None:
    with pytest.raises(PackageError, match=message):
        run_build(make_package(files))


def test_sibling_modules_are_imported_fresh(make_package: MakePackage) -> None:
    build = "import os, helper\n\ndef build():\n    open(os.environ['SCALEOUT_BUILD_OUTPUT_DIR'] + '/v', 'w').write(helper.V)\n"
    first = make_package({"scaleout.yaml": IMPORTING_YAML, "build.py": build, "helper.py": "V = '1'\n"}, "a")
    second = make_package({"scaleout.yaml": IMPORTING_YAML, "build.py": build, "helper.py": "V = '2'\n"}, "b")
    run_build(first)
    run_build(second)
    assert (first / "v").read_text() == "1" and (second / "v").read_text() == "2"


class FakeClient:
    def __init__(self) -> None:
        self.callbacks: dict[str, object] = {}

    def set_train_callback(self, fn: object) -> None:
        self.callbacks["train"] = fn


def test_load_startup_registers_callbacks(make_package: MakePackage) -> None:
    startup = "def train(model, settings):\n    return model\n\ndef startup(client):\n    client.set_train_callback(train)\n"
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "startup.py": startup})
    client = FakeClient()
    load_startup(root, client)
    train = client.callbacks["train"]
    assert callable(train) and train(5, {}) == 5


def test_load_startup_failure_names_the_file(make_package: MakePackage) -> None:
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "startup.py": "def startup(client):\n    client.nope()\n"})
    with pytest.raises(PackageError, match=r"startup\(\) in .*startup.py failed: AttributeError") as info:
        load_startup(root, FakeClient())
    assert isinstance(info.value.__cause__, AttributeError)


# A helper module the startup file imports; line 4 hands numpy a bad shape.
HELPER = "import numpy as np\n\ndef load(n):\n    return np.zeros(6).reshape(n, 4)\n"


@pytest.mark.parametrize(
    ("startup", "where", "what"),
    [
        # startup() raises in a helper of the package (through numpy): the helper's line.
        ("from data import load\n\ndef startup(client):\n    load(5)\n", "data.py:4", "ValueError: cannot reshape"),
        # An error at import time, on line 3 of startup.py.
        ("import os\n\nraise RuntimeError('no data folder')\n", "startup.py:3", "RuntimeError: no data folder"),
        # A syntax error: the line it points at, not a frame of the import machinery.
        ("def startup(client):\n    pass\n\ndef broken(:\n", "startup.py:4", "SyntaxError"),
    ],
    ids=["in-a-helper", "at-import", "syntax"],
)
def test_startup_failure_names_the_line_in_the_package(make_package: MakePackage, startup: str, where: str, what: str) -> None:
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "startup.py": startup, "data.py": HELPER})
    with pytest.raises(PackageError) as info:
        load_startup(root, FakeClient())
    message = str(info.value)
    assert what in message and message.endswith(f"({where})"), message
    assert "\n" not in message


def test_describe_failure_is_one_short_line(make_package: MakePackage) -> None:
    from scaleout.package.project import MAX_REASON_CHARS, describe_failure

    root = make_package({"scaleout.yaml": IMPORTING_YAML})
    long = ValueError("x" * 5000 + "\nsecond line")
    text = describe_failure(long, root)
    assert "\n" not in text and len(text) < MAX_REASON_CHARS + 40 and text.startswith("ValueError: xxx") and text.endswith("..."), text
    assert describe_failure(KeyError(), root) == "KeyError"  # no frame in the package: no location


def test_a_library_the_package_needs_but_scaleout_lacks_is_named_with_what_to_do(make_package: MakePackage) -> None:
    startup = "import numpy\nimport scaleout_test_absent_lib.nn\n\ndef startup(client):\n    pass\n"
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "startup.py": startup})
    with pytest.raises(PackageError) as info:
        load_startup(root, FakeClient())
    message = str(info.value)
    assert "\n" not in message
    assert "the package needs module 'scaleout_test_absent_lib'" in message, message
    assert "pip install scaleout_test_absent_lib" in message, message  # what to do (a source install here)
    assert "(startup.py:2)" in message, message


@pytest.mark.parametrize(("module", "dist"), [("cv2", "opencv-python"), ("PIL.Image", "pillow"), ("skimage.io", "scikit-image")])
def test_a_missing_module_names_its_pip_distribution_and_managed_env(make_package: MakePackage, module: str, dist: str) -> None:
    startup = f"import {module}\n\ndef startup(client):\n    pass\n"
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "startup.py": startup})
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(PackageError) as info:
        load_startup(root, FakeClient())
    message = str(info.value)
    assert f"pip install {dist})" in message and "--managed-env" in message and "\n" not in message, message


def test_a_missing_module_of_the_package_itself_gets_no_install_hint(make_package: MakePackage) -> None:
    # data/ is the package's own folder: a missing data.loader is its bug, not a library to install
    startup = "from data.loader import load\n\ndef startup(client):\n    pass\n"
    root = make_package({"scaleout.yaml": IMPORTING_YAML, "startup.py": startup, "data/__init__.py": ""})
    with pytest.raises(PackageError) as info:
        load_startup(root, FakeClient())
    message = str(info.value)
    assert "ModuleNotFoundError: No module named 'data.loader' (startup.py:1)" in message and "pip install" not in message, message
