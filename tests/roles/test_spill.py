"""The controller's spill of forwarded updates (roles/spill.py): checked before a byte is
written, handed over memory-mapped and read-only, removed whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.errors import PayloadError, UpdateRejected
from scaleout.roles.spill import Spill

MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([1, 2], np.int32)}


def test_spilled_updates_come_back_memory_mapped_and_read_only(tmp_path: Path) -> None:
    spill = Spill(tmp_path / "s" / "1-1", payload.describe(payload.encode_named(MODEL, "dict")))
    for i in range(3):
        spill.add("c0", f"k{i}", 10 + i, {"loss": i}, payload.encode_named({k: v + i for k, v in MODEL.items()}, "dict"))
    assert len(list((tmp_path / "s" / "1-1").iterdir())) == 3
    with spill.updates({"k0", "k2"}) as updates:
        assert [(u.client, u.num_examples, dict(u.metadata)) for u in updates] == [("k0", 10, {"loss": 0}), ("k2", 12, {"loss": 2})]
        for u, i in zip(updates, (0, 2), strict=True):
            for k, v in MODEL.items():
                np.testing.assert_array_equal(u.tensors[k], v + i)
                assert not u.tensors[k].flags.writeable
                with pytest.raises(ValueError, match="read-only"):
                    u.tensors[k][0] = 0
    spill.remove()
    assert not (tmp_path / "s" / "1-1").exists()


def test_a_bad_update_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    spill = Spill(tmp_path / "r", payload.describe(payload.encode_named(MODEL, "dict")))
    with pytest.raises(PayloadError, match="the model's tensors, dtypes and shapes"):
        spill.add("c0", "k", 1, {}, payload.encode_named({"w": MODEL["w"].astype(np.float64), "n": MODEL["n"]}, "dict"))
    with pytest.raises(UpdateRejected):
        spill.add("c0", "k", 1, {}, payload.encode_named({"w": np.full((2, 3), np.nan, np.float32), "n": MODEL["n"]}, "dict"))
    assert not (tmp_path / "r").exists()
    spill.add("c0", "k", 1, {}, payload.encode_named(MODEL, "dict"))
    with pytest.raises(UpdateRejected, match="a second update from k"):
        spill.add("c1", "k", 1, {}, payload.encode_named(MODEL, "dict"))
