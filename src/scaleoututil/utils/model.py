"""`from scaleoututil.utils.model import ScaleoutModel`, as Scaleout Edge packages write it."""

from __future__ import annotations

from scaleout.edge import ScaleoutModel

__all__ = ["ScaleoutModel"]
