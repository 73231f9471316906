"""The project's packaging metadata: what `pip install` builds from pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_expression() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # The string form (PEP 639); a TOML table makes setuptools print a deprecation banner.
    assert data["project"]["license"] == "Apache-2.0"
    # setuptools reads the string form from 77 on; an older one refuses it.
    (req,) = [r for r in data["build-system"]["requires"] if re.match(r"setuptools\b", r)]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", req)
    assert match and int(match[1]) >= 77, req
    # The installed package was built from it (make test reinstalls when pyproject.toml changes).
    assert importlib.metadata.metadata("scaleout")["License-Expression"] == "Apache-2.0"


SRC = ROOT / "src" / "scaleout"


def test_every_data_file_of_the_package_is_shipped() -> None:
    # The zipapp is built by pip from pyproject.toml and the one-file executable collects the
    # same files: a data file the package-data globs miss would be absent from both.
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["scaleout"]
    shipped = {p for pattern in patterns for p in SRC.glob(pattern)}
    files = {p for p in SRC.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert files <= shipped, f"not in [tool.setuptools.package-data]: {sorted(str(p.relative_to(SRC)) for p in files - shipped)}"


def test_no_module_finds_its_own_files_through___file__() -> None:
    # Inside the frozen executable there is no source tree: package data is read with
    # importlib.resources.files("scaleout..."). (Another module's __file__, such as a compute
    # package's, is an attribute and fine.)
    offenders = [
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
        if any(isinstance(node, ast.Name) and node.id == "__file__" for node in ast.walk(ast.parse(p.read_text())))
    ]
    assert not offenders, f"use importlib.resources instead of __file__ in {offenders}"
