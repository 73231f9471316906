"""Look up a model helper by name, and read and write the files dispatcher commands exchange,
as in Scaleout Edge and FEDn."""

from __future__ import annotations

import importlib
import json
from typing import Any

SUPPORTED = ("numpyhelper",)


def get_helper(name: str) -> Any:
    """Return a new instance of the helper called `name` (e.g. "numpyhelper")."""
    if name not in SUPPORTED:
        raise ValueError(f"unknown helper {name!r}; supported: {', '.join(SUPPORTED)}")
    module = importlib.import_module(f"scaleoututil.helpers.{name}")
    return module.Helper()


def save_metadata(metadata: dict[str, Any], filename: str) -> None:
    """Write `metadata` as JSON to `filename + "-metadata"`: what a train command leaves beside
    its output model (e.g. {"num_examples": 600})."""
    with open(str(filename) + "-metadata", "w") as outfile:
        json.dump(metadata, outfile)


def load_metadata(filename: str) -> Any:
    """Read the JSON in `filename + "-metadata"` (a train command's input settings)."""
    with open(str(filename) + "-metadata") as infile:
        return json.load(infile)


def save_metrics(metrics: dict[str, Any], filename: str) -> None:
    """Write `metrics` as JSON to `filename`: what a validate or predict command outputs."""
    with open(filename, "w") as outfile:
        json.dump(metrics, outfile)
