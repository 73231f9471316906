"""Updates are checked chunk by chunk as they land on the combiner (issue 17 #2), over real
TLS links: a bad value in an update's last chunk refuses that update, and the round's
model is bit for bit the mean of the others."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, Federation

from scaleout.core import payload

GOOD = ["good-0", "good-1", "good-2"]


@pytest.mark.parametrize("bad", ["nan", "-inf", "3e38"])
def test_a_bad_value_in_the_last_chunk_refuses_the_update_and_leaves_the_sums_as_the_others_make_them(fed: Federation, bad: str) -> None:
    fed.controller()
    seed = fed.seed_from(FIXTURES / "lastchunk_client")  # 600,000 float32 zeros: 2.4 MB, three chunks
    combiner = fed.combiner("c1")
    for name in GOOD:
        fed.client(name, package=FIXTURES / "extreme_client")  # the model plus one
    fed.client("odd", package=FIXTURES / "lastchunk_client")  # the same, with its last value bad
    fed.wait_clients(4)
    session = fed.run_session(rounds=1, min_clients=3, validate=False, settings={"extreme_shift": 1, "lastchunk_value": bad})
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == GOOD, rnd
    _, new = fed.admin("model.get", {"id": rnd["model_id"]})
    assert new is not None and rnd["model_id"] != seed
    (values,) = payload.read(new)[0].values()
    assert values.dtype == np.float32 and values.shape == (600_000,)
    assert np.array_equal(values, np.ones(600_000, np.float32))  # bit for bit: the odd update left no trace
    log = combiner.text()
    assert "update from odd refused" in log and "'0'" in log.split("update from odd refused", 1)[1].splitlines()[0], log[-3000:]
    assert log.count("update values checked as they landed") == len(GOOD), log[-3000:]  # the good ones were not read again
