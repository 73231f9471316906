"""Arithmetic and .npz storage for models given as lists (or dicts) of numpy arrays.

Mirrors FEDn's / Scaleout Edge's numpyhelper. Every operation also accepts dicts of
named arrays (with the same keys) and returns the same container type it was given.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, Union

import numpy as np

Model = Union[list[np.ndarray], dict[str, np.ndarray]]


def _map(fn: Callable[..., np.ndarray], *models: Model) -> Model:
    first = models[0]
    if isinstance(first, Mapping):
        for other in models[1:]:
            if not isinstance(other, Mapping) or other.keys() != first.keys():
                raise ValueError("models must be dicts with the same keys")
        return {k: fn(*(m[k] for m in models)) for k in first}  # type: ignore[call-overload]
    for other in models[1:]:
        if isinstance(other, Mapping) or len(other) != len(first):
            raise ValueError(f"models must be lists of the same length ({len(first)} arrays)")
    return [fn(*xs) for xs in zip(*models)]


def _values(m: Model) -> list[np.ndarray]:
    return list(m.values()) if isinstance(m, Mapping) else list(m)


class Helper:
    """Helper for models whose parameters are numpy arrays."""

    def __init__(self) -> None:
        self.name = "numpyhelper"

    def increment_average(self, m1: Model, m2: Model, n: float, N: float) -> Model:
        """Running weighted mean: fold m2 (weight n) into m1, N being the total weight so far."""
        return _map(lambda x, y: np.add(x, n * (y - x) / N), m1, m2)

    def add(self, m1: Model, m2: Model, a: float = 1.0, b: float = 1.0) -> Model:
        """a*m1 + b*m2."""
        return _map(lambda x, y: x * a + y * b, m1, m2)

    def subtract(self, m1: Model, m2: Model, a: float = 1.0, b: float = 1.0) -> Model:
        """a*m1 - b*m2."""
        return self.add(m1, m2, a, -b)

    def divide(self, m1: Model, m2: Model) -> Model:
        """m1 / m2, element-wise."""
        return _map(np.divide, m1, m2)

    def multiply(self, m1: Model, m2: Model) -> Model:
        """m1 * m2, element-wise."""
        return _map(np.multiply, m1, m2)

    def sqrt(self, m1: Model) -> Model:
        return _map(np.sqrt, m1)

    def power(self, m1: Model, a: float) -> Model:
        return _map(lambda x: np.power(x, a), m1)

    def norm(self, m: Model) -> float:
        """L1 norm of all parameters: the sum of |x| over every element of every array.

        FEDn sums `np.linalg.norm(x, 1)` per array, which agrees for 1-d arrays but is the
        induced matrix norm (max column sum) for 2-d ones and fails beyond; the entry-wise
        norm is what is meant and works for any shape.
        """
        return float(sum(np.abs(np.asarray(x, dtype=np.float64)).sum() for x in _values(m)))

    def sign(self, m: Model) -> Model:
        return _map(np.sign, m)

    def ones(self, m1: Model, a: float) -> Model:
        """Arrays shaped like m1's, filled with `a` (float64, as in FEDn)."""
        return _map(lambda x: np.ones(np.shape(x)) * a, m1)

    def save(self, arrays: Model, path: str | os.PathLike[str] | IO[bytes] | None = None) -> str | IO[bytes]:
        """Write a compressed .npz: a list under keys "0", "1", ...; a dict under its names.

        Returns the path written (a temp file when `path` is None; ".npz" is appended by
        numpy when missing).
        """
        if path is None:
            path = self.get_tmp_path()
        if isinstance(arrays, Mapping):
            named = {str(k): np.asarray(v) for k, v in arrays.items()}
        else:
            named = {str(i): np.asarray(v) for i, v in enumerate(arrays)}
        np.savez_compressed(path, **named)  # type: ignore[arg-type]
        if isinstance(path, (str, os.PathLike)):
            path = os.fspath(path)
            return path if path.endswith(".npz") else path + ".npz"
        return path

    def load(self, path: str | os.PathLike[str] | IO[bytes]) -> Model:
        """Read a .npz: a list ordered by integer key ("10" after "9") when every key is an
        integer, else a dict of named arrays."""
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if all(k.isdigit() for k in keys):
                return [npz[k] for k in sorted(keys, key=int)]
            return {k: npz[k] for k in keys}

    def get_tmp_path(self) -> str:
        """A fresh, closed temporary file path ending in .npz (the caller deletes it)."""
        fd, path = tempfile.mkstemp(suffix=".npz")
        os.close(fd)
        return path
