"""Read a seed model file (.npz from numpyhelper, or .safetensors) as a model payload."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from scaleout.core.errors import PackageError, PayloadError

if TYPE_CHECKING:
    from scaleout.core.payload import Arrays


def read_model_file(path: Path) -> bytes:
    """The safetensors payload of the model in `path`.

    An .npz whose keys are exactly "0".."n-1" (as numpyhelper saves) becomes a list in
    int(key) order; other keys give a dict. A .safetensors file is validated and returned as is.
    """
    from scaleout.core import payload

    suffix = path.suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise PackageError(f"model file must be .npz or .safetensors, got {path.name!r}")
    if not path.is_file():
        raise PackageError(f"model file {path} does not exist")
    try:
        if suffix == ".safetensors":
            data = path.read_bytes()
            payload.decode(data)
            return data
        return payload.encode(_read_npz(path))
    except (OSError, ValueError, zipfile.BadZipFile, PayloadError) as exc:
        raise PackageError(f"cannot read model file {path}: {exc}") from exc


def _read_npz(path: Path) -> Arrays:
    import numpy as np

    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with loaded as npz:
        keys = list(npz.files)
        if not keys:
            raise ValueError("the .npz holds no arrays")
        if set(keys) == {str(i) for i in range(len(keys))}:
            return [npz[str(i)] for i in range(len(keys))]
        return {key: npz[key] for key in keys}
