"""A dict model keeps the key order its user gave, through a whole round (issue 5, item 4).

The seed's keys are not sorted; the package's train callback refuses a model whose keys
come in another order, so a round succeeds only if every hop kept it: the seed, the
controller, the combiner, the client helpers, the partial and the committed model.
"""

from __future__ import annotations

import numpy as np
from conftest import FIXTURES, Federation, scaleout

from scaleout.core import payload

ORDER_CLIENT = FIXTURES / "order_client"
ORDER = ["layer2.weight", "layer1.weight", "a.bias", "z"]


def test_dict_model_keeps_its_key_order_through_rounds(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(ORDER_CLIENT)
    fed.activate(ORDER_CLIENT)
    fed.combiner("c1")
    fed.combiner("c2")
    for name in ("o-0", "o-1", "o-2"):
        fed.client(name)
    fed.wait_clients(3)
    # Two rounds: the second trains on the committed model of the first.
    session = fed.run_session(rounds=2, min_clients=3, validate=True)
    assert session["status"] == "finished", session
    for rnd in session["rounds"]:
        assert rnd["status"] == "succeeded" and rnd["participants"] == ["o-0", "o-1", "o-2"], rnd
        assert rnd["validation"] == {"keys_in_order": 1.0}, rnd
    _, data = fed.admin("model.get", {"id": session["end_model"]})
    assert data is not None
    model = payload.decode(data)
    assert isinstance(model, dict) and list(model) == ORDER
    for i, name in enumerate(ORDER):
        np.testing.assert_array_equal(model[name], np.full(i + 2, float(i) + 2, np.float32))
    # What `scaleout model download -o FILE.npz` writes keeps the order too.
    out = fed.tmp / "end.npz"
    r = scaleout("model", "download", session["end_model"], "-o", str(out), "--data-dir", str(fed.data))
    assert r.returncode == 0, r.stderr
    with np.load(out) as npz:
        assert list(npz.files) == ORDER
    assert seed != session["end_model"]
