"""sample_projects/pytorch-digits: PyTorch with BatchNorm through a real federation.

Needs the `torch` extra (pip install -e '.[torch]'): skipped with the reason otherwise.
"""

from __future__ import annotations

import pytest
from conftest import ROOT, Federation, wait_line

from scaleout.core import payload

pytest.importorskip("torch", reason="the PyTorch sample needs the torch extra: pip install -e '.[torch]'")
pytest.importorskip("sklearn", reason="the PyTorch sample needs the torch extra (scikit-learn): pip install -e '.[torch]'")

DIGITS = ROOT / "sample_projects" / "pytorch-digits" / "client"


def test_pytorch_digits_three_clients_three_rounds_accuracy_rises(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(DIGITS)
    fed.activate(DIGITS)
    fed.combiner("c1")
    for i in range(3):
        fed.client(f"digits-{i}")
    fed.wait_clients(3)
    session = fed.run_session(rounds=3, min_clients=3, round_timeout=120)
    assert session["status"] == "finished", session
    rounds = session["rounds"]
    assert all(r["status"] == "succeeded" and len(r["participants"]) == 3 for r in rounds), rounds
    acc = [r["validation"]["test_accuracy"] for r in rounds]
    assert acc[0] < acc[2] and acc[2] > 0.8, acc
    # The state_dict travels whole, by name: BatchNorm's integer counter too.
    _, first = fed.admin("model.get", {"id": seed})
    _, last = fed.admin("model.get", {"id": session["end_model"]})
    assert first is not None and last is not None
    before, after = payload.decode(first), payload.decode(last)
    assert isinstance(after, dict) and list(after) == list(before)
    assert str(after["bn.num_batches_tracked"].dtype) == "int64" and int(after["bn.num_batches_tracked"]) > 0
    # Each client prints its accuracy after every round's validation.
    client = next(p for p in fed.procs if p.name == "digits-0")
    assert client.popen.stdout is not None
    # All three are in the pipe by now (the session ended after the last validation).
    printed = [wait_line(client.popen.stdout, "digits-0: test accuracy", 10, "digits-0")]
    printed += [client.popen.stdout.readline().decode() for _ in rounds[1:]]
    assert [float(line.split()[3]) for line in printed] == [round(a, 3) for a in acc], (printed, acc)
