from __future__ import annotations

import numpy as np
import pytest

from scaleout.core.errors import UpdateRejected
from scaleout.core.updates import read_num_examples


@pytest.mark.parametrize("n, expected", [(1, 1), (600, 600), (12.0, 12), (np.int64(7), 7), (np.float32(3.0), 3)])
def test_accepts_positive_counts(n: object, expected: int) -> None:
    count = read_num_examples({"training_metadata": {"num_examples": n}, "other": "ignored"})
    assert count == expected and type(count) is int


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        [],
        "num_examples=5",
        {},
        {"num_examples": 5},
        {"training_metadata": None},
        {"training_metadata": {}},
        {"training_metadata": {"num_examples": 0}},
        {"training_metadata": {"num_examples": -3}},
        {"training_metadata": {"num_examples": True}},
        {"training_metadata": {"num_examples": 2.5}},
        {"training_metadata": {"num_examples": "5"}},
        {"training_metadata": {"num_examples": float("nan")}},
        {"training_metadata": {"num_examples": float("inf")}},
    ],
)
def test_refuses_bad_metadata_with_instructions(metadata: object) -> None:
    with pytest.raises(UpdateRejected) as info:
        read_num_examples(metadata)
    message = str(info.value)
    assert '{"training_metadata": {"num_examples": N}}' in message
    assert "got" in message


def test_message_shows_what_was_returned_but_stays_short() -> None:
    with pytest.raises(UpdateRejected) as info:
        read_num_examples({"training_metadata": {"num_examples": 0}, "blob": "x" * 10_000})
    assert "num_examples" in str(info.value).split("got", 1)[1]
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("n", [2**53 + 1, 10**400, 1e300])
def test_implausible_num_examples_refused(n: object) -> None:
    with pytest.raises(UpdateRejected, match="not plausible"):
        read_num_examples({"training_metadata": {"num_examples": n}})


def test_largest_plausible_num_examples_accepted() -> None:
    assert read_num_examples({"training_metadata": {"num_examples": 2**53}}) == 2**53
