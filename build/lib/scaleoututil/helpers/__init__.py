"""Model helpers: `get_helper("numpyhelper")` returns an object that saves, loads and combines arrays."""

from __future__ import annotations

from scaleoututil.helpers.helpers import get_helper

__all__ = ["get_helper"]
