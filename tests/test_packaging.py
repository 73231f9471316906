"""The project's packaging metadata: what `pip install` builds from pyproject.toml."""

from __future__ import annotations

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
