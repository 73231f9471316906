from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.errors import PackageError
from scaleout.package.seed import read_model_file

DTYPES = [np.float32, np.float64, np.int64, np.uint8, np.bool_, np.int32]


def test_npz_list_keeps_numeric_order_and_dtypes(tmp_path: Path) -> None:
    arrays = [np.full((i + 1, 2), i).astype(DTYPES[i % len(DTYPES)]) for i in range(12)]
    np.savez_compressed(tmp_path / "seed.npz", **{str(i): a for i, a in enumerate(arrays)})
    decoded = payload.decode(read_model_file(tmp_path / "seed.npz"))
    assert isinstance(decoded, list) and len(decoded) == 12
    for got, want in zip(decoded, arrays, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert decoded[10].shape == (11, 2)  # "10" comes after "9", not after "1"


def test_npz_with_names_gives_dict(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", weight=np.ones((2, 3), np.float32), bias=np.zeros(3, np.float64))
    decoded = payload.decode(read_model_file(tmp_path / "m.npz"))
    assert isinstance(decoded, dict) and list(decoded) == ["weight", "bias"]  # the file's order, not sorted
    assert decoded["bias"].dtype == np.float64


def test_safetensors_is_returned_as_is(tmp_path: Path) -> None:
    data = payload.encode({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    (tmp_path / "seed.safetensors").write_bytes(data)
    assert read_model_file(tmp_path / "seed.safetensors") == data


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("seed.pt", b"x", "must be .npz or .safetensors"),
        ("seed.npz", b"not a zip", "cannot read model file"),
        ("seed.safetensors", b"\x08\0\0\0\0\0\0\0{}garbage", "cannot read model file"),
    ],
)
def test_bad_model_files(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PackageError, match=message):
        read_model_file(tmp_path / name)


def test_missing_and_empty_model_files(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="does not exist"):
        read_model_file(tmp_path / "nope.npz")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(PackageError, match="no arrays"):
        read_model_file(tmp_path / "empty.npz")
    np.save(tmp_path / "plain.npy", np.ones(3))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    with pytest.raises(PackageError, match="not an .npz"):
        read_model_file(tmp_path / "plain.npz")
