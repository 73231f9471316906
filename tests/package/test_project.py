from __future__ import annotations

from pathlib import Path

import pytest

from scaleout.core.errors import PackageError
from scaleout.package.project import load_project

from .conftest import IMPORTING_YAML, MakePackage

# Nine levels of YAML aliases, each ten of the one before: 480 bytes whose repr is 10^9 items
# (printing one in a message took minutes and gigabytes: this file's test would time out).
LAUGHS = "l0: &l0 [x]\n" + "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 10))


def test_importing_and_dispatcher_entry_points(make_package: MakePackage) -> None:
    yaml_text = IMPORTING_YAML + '  train:\n    command: "python train.py"\n  validate: python validate.py\n'
    root = make_package({"scaleout.yaml": yaml_text, "build.py": "", "startup.py": ""})
    project = load_project(root)
    assert project.root == root
    assert project.python_env == "python_env.yaml"
    assert project.entry_points["train"] == {"command": "python train.py"}
    assert project.entry_file("build") == (root / "build.py").resolve()
    assert project.entry_file("startup") == (root / "startup.py").resolve()
    assert project.entry_file("train") is None
    assert project.entry_file("validate") is None
    assert project.entry_file("predict") is None
    assert project.entry_command("train") == "python train.py"
    assert project.entry_command("validate") == "python validate.py"
    assert project.entry_command("build") is None


def test_python_env_optional(make_package: MakePackage) -> None:
    root = make_package({"scaleout.yaml": "entry_points:\n  build: build.py\n"})
    assert load_project(root).python_env is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("entry_points: [build.py\n", "not valid YAML"),
        ("python_env: env.yaml\n", "no 'entry_points'"),
        ("", "must be a mapping"),
        ("entry_points: [build.py]\n", "'entry_points' must be a mapping"),
        ("entry_points:\n  build: 3\n", "entry point 'build'"),
        ("entry_points:\n  train: {cmd: x}\n", "entry point 'train'"),
        ("entry_points:\n  build: build.py\npython_env: [a]\n", "'python_env'"),
        # A re-attack: nesting raised RecursionError (a traceback at set-active); a 1 MiB flow list took 30 s.
        ("entry_points: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("entry_points: [" + "1," * 20_000 + "1]\n", r"is 39.1 KiB; a project file may be at most 32.0 KiB"),
        # A third attack: what PyYAML's constructors raise, and messages that printed a whole value.
        ("x: 2001-13-40\nentry_points: {build: build.py}\n", r"not valid YAML: ValueError: month must be in 1\.\.12"),
        ("x: " + "9" * 5000 + "\nentry_points: {build: build.py}\n", "not valid YAML: ValueError"),
        ("x: !!timestamp abc\nentry_points: {build: build.py}\n", "not valid YAML"),
        ("entry_points: {build: {command: x, timeout: 0x" + "f" * 20_000 + "}}\n", "got a very large number"),
        (LAUGHS + "entry_points: {build: {command: x, timeout: *l9}}\n", "got a list"),
        ("entry_points: {build: \"a\\0b.py\"}\n", "no NUL"),
        ("entry_points: {build: " + "a" * 5000 + ".py}\n", "at most 1024 characters"),
        # A fourth attack: merge keys copying a 2,500-key mapping 1,700 times in 32 KiB (8.5 s, 180 MB).
        ("b: &b {" + ", ".join(f"k{i}: 0" for i in range(2500)) + "}\nm: [" + ", ".join(["{<<: *b}"] * 500) + "]\nentry_points: {build: build.py}\n",
         "builds more than 100,000 entries"),
        ("x: !" + "a" * 20_000 + " 1\nentry_points: {build: build.py}\n", r"not valid YAML: .{1,300}$"),  # PyYAML quotes the whole tag
    ],
)
def test_bad_project_file(make_package: MakePackage, text: str, message: str) -> None:
    root = make_package({"scaleout.yaml": text})
    with pytest.raises(PackageError, match=message):
        load_project(root)


def test_missing_directory_and_project_file(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="does not exist"):
        load_project(tmp_path / "nope")
    with pytest.raises(PackageError, match="no scaleout.yaml"):
        load_project(tmp_path)


def test_entry_file_outside_root_or_missing(make_package: MakePackage) -> None:
    root = make_package(
        {"scaleout.yaml": "entry_points:\n  build: ../evil.py\n  startup: startup.py\n", "../evil.py": ""}
    )
    project = load_project(root)
    with pytest.raises(PackageError, match="outside the package"):
        project.entry_file("build")
    with pytest.raises(PackageError, match="does not exist"):
        project.entry_file("startup")
