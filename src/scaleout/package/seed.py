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
    except MemoryError:
        raise PackageError(f"cannot read model file {path}: its arrays do not fit in memory") from None


def _check_npz_headers(path: Path) -> None:
    """Each array's header declares no more bytes than its member holds: numpy allocates
    what a header declares before reading (a 60 KB .npz declaring 8 TiB)."""
    import math

    import numpy as np

    if not zipfile.is_zipfile(path):
        return  # np.load says what it is instead
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in readers:
                    raise ValueError(f"array {info.filename!r} is in .npy format {version[0]}.{version[1]}; save it with numpy's default (1.0 or 2.0)")
                shape, _, dtype = readers[version](f, max_header_size=10_000)
                declared = math.prod(shape) * dtype.itemsize
                if declared > info.file_size:
                    raise ValueError(f"array {info.filename!r} declares {declared} bytes but holds {info.file_size}")


def _read_npz(path: Path) -> Arrays:
    import numpy as np

    _check_npz_headers(path)
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
