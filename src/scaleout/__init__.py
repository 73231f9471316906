"""Scaleout: terminal-first federated learning.

`from scaleout import EdgeClient, ScaleoutModel` is the compute-package API, kept
compatible with Scaleout Edge; `from scaleout import Scaleout` (also `APIClient`,
`AsyncScaleout`) drives a federation from Python (scaleout/api.py). They are loaded
lazily so `scaleout --help` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["APIClient", "AsyncScaleout", "EdgeClient", "Scaleout", "ScaleoutModel", "__version__"]

if TYPE_CHECKING:
    from scaleout.api import APIClient, AsyncScaleout, Scaleout
    from scaleout.edge import EdgeClient, ScaleoutModel


def __getattr__(name: str) -> Any:
    if name in ("EdgeClient", "ScaleoutModel"):
        from scaleout import edge

        return getattr(edge, name)
    if name in ("Scaleout", "APIClient", "AsyncScaleout"):
        from scaleout import api

        return getattr(api, name)
    raise AttributeError(f"module 'scaleout' has no attribute {name!r}")
