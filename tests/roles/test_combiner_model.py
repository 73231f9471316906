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


def _resident(mapped: mmap.mmap) -> int:
    """Bytes of ``mapped`` resident in this process (its entry in /proc/self/smaps)."""
    import numpy as np

    start = f"{np.frombuffer(mapped, dtype=np.uint8, count=1).ctypes.data:x}-"
    lines = Path("/proc/self/smaps").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(start))
    return next(int(line.split()[1]) * 1024 for line in lines[at + 1 :] if line.startswith("Rss:"))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("norm", [0.0, 1e6])
def test_an_update_pulled_into_a_mapped_file_is_checked_and_folded_without_staying_in_memory(norm: float) -> None:
    """The check and the fold read a mapped update a stretch at a time and let each go: after
    both, at most a stretch of it is resident, and of the model (its pages a send still held
    are let go too, norm bound or not); the sums are those of the update itself."""
    import numpy as np

    from scaleout.core import payload
    from scaleout.core.aggregators import get_aggregator
    from scaleout.core.aggregators.bounds import norm_limit
    from scaleout.core.aggregators.fold import STRETCH
    from scaleout.roles.combiner import Job, _check_update

    n = 6 * STRETCH + 7  # 96 MiB of float32
    model = _mapped_copy(payload.encode({"w": np.zeros(n, np.float32), "b": np.ones(3, np.float32)}))
    update = _mapped_copy(payload.encode({"w": np.full(n, 0.5, np.float32), "b": np.ones(3, np.float32)}))
    job = Job("train", "s", 1, "m", None)  # type: ignore[arg-type]  # the tracker is not used here
    job.agg, job.model, job.model_map = get_aggregator("fedavg", payload.describe(model)), payload.views(model), model
    job.norm_limit = norm_limit(job.model, norm)
    assert np.frombuffer(model, dtype=np.uint8).max() > 0 and _resident(model) > 4 * STRETCH  # touched, as a send to a slow client does
    checked = _check_update(job, update)
    job.agg.add(checked, 2.0, "c")
    assert _resident(update) <= 4 * STRETCH and _resident(model) <= 4 * STRETCH
    sums = job.agg.partial(copy=False).sums["w"]
    assert sums.min() == sums.max() == 1.0


def test_an_update_forwarded_as_it_came_is_not_hashed_again_and_a_re_encoded_one_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """A needs_updates round forwards each update to the controller: the client's bytes go up
    with the sha256 the link checked them against on receipt, not hashed a second time; an
    update re-encoded in the model's dtypes (float64 for float32) is hashed, as it must be."""
    import hashlib

    import numpy as np

    from scaleout.core import payload
    from scaleout.core.aggregators import get_aggregator
    from scaleout.roles.combiner import Job, _check_update, _forwarded_bytes

    model = payload.encode({"w": np.zeros(1000, np.float32)})
    job = Job("train", "s", 1, "m", None)  # type: ignore[arg-type]  # the tracker is not used here
    job.agg, job.model, job.model_size = get_aggregator("fedavg", payload.describe(model)), payload.views(model), len(model)
    same = payload.encode({"w": np.full(1000, 0.5, np.float32)})
    wider = payload.encode({"w": np.full(1000, 0.5, np.float64)})
    checked_same, checked_wider = _check_update(job, same), _check_update(job, wider)
    received = hashlib.sha256(same).hexdigest()  # what the link checked on receipt

    hashed: list[int] = []  # the bytes each sha256 made here was given: the real hash, counted
    real = hashlib.sha256

    def counted(data: bytes = b"", **kw: object) -> object:
        hashed.append(len(data))
        return real(data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hashlib, "sha256", counted)
    up = _forwarded_bytes(job, same, checked_same, received)
    assert up.sha256 == received and bytes(up.data) == same and hashed == []
    up = _forwarded_bytes(job, wider, checked_wider, "the client's digest, of bytes that do not go up")
    assert bytes(up.data) == same and up.sha256 == real(same).hexdigest() and hashed == [len(same)]
