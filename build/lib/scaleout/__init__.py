"""Scaleout: terminal-first federated learning.

`from scaleout import EdgeClient, ScaleoutModel` is the compute-package API, kept
compatible with Scaleout Edge. It is loaded lazily so `scaleout --help` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["EdgeClient", "ScaleoutModel", "__version__"]

if TYPE_CHECKING:
    from scaleout.edge import EdgeClient, ScaleoutModel


def __getattr__(name: str) -> Any:
    if name in ("EdgeClient", "ScaleoutModel"):
        from scaleout import edge

        return getattr(edge, name)
    raise AttributeError(f"module 'scaleout' has no attribute {name!r}")
