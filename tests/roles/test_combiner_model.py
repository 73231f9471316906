"""The combiner keeps a round's model in an unnamed temporary file, mapped (issue 17)."""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path

import pytest

from scaleout.core.errors import StorageError
from scaleout.roles.combiner import _let_go, _mapped_copy


def test_the_model_is_mapped_from_a_file_nobody_else_sees_and_reads_back_after_its_pages_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = bytes(range(256)) * 5000
    model = _mapped_copy(data)
    assert isinstance(model, mmap.mmap) and model[:] == data
    assert list(tmp_path.iterdir()) == []  # unnamed: gone with its mapping, even after a kill
    _let_go(model)
    assert model[:] == data


def test_a_temporary_folder_that_cannot_take_the_model_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with pytest.raises(StorageError, match="keeping the round's model"):
        _mapped_copy(b"model")
