"""Look up a model helper by name, as in Scaleout Edge."""

from __future__ import annotations

import importlib
from typing import Any

SUPPORTED = ("numpyhelper",)


def get_helper(name: str) -> Any:
    """Return a new instance of the helper called `name` (e.g. "numpyhelper")."""
    if name not in SUPPORTED:
        raise ValueError(f"unknown helper {name!r}; supported: {', '.join(SUPPORTED)}")
    module = importlib.import_module(f"scaleoututil.helpers.{name}")
    return module.Helper()
