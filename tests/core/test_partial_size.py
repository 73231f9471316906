"""A partial's size follows from the model and the number of updates folded in (issue 20 #7)."""

from __future__ import annotations

import numpy as np

from scaleout.core.aggregators import FedAvg
from scaleout.core.aggregators.base import encode_partial, partial_size_range
from scaleout.core.payload import describe, encode, encode_named


def sizes(named: dict[str, np.ndarray], layout: str, count: int, name_len: int, big: float = 1.0) -> tuple[int, tuple[int, int]]:
    model = encode_named(named, layout) if layout == "dict" else encode(list(named.values()))
    template = describe(model)
    agg = FedAvg(template)
    for i in range(count):
        agg.add({k: np.full(s.shape, big, dtype=s.dtype) for k, s in template.items()}, 2.0**60 if big > 1 else 1.0, f"{i:0{name_len}d}")
    return len(encode_partial(agg.partial(), layout)), partial_size_range(template, count)


def test_encoded_partials_lie_in_the_range() -> None:
    cases = [
        ({"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}, "dict", 1, 2, 1.0),
        ({"w": np.zeros((3, 4), np.float32)}, "dict", 300, 128, 1.0),  # long names, many contributors
        ({"w": np.zeros(1000, np.float32)}, "dict", 3, 8, 1e30),  # sums promoted to float64
        ({"größe\n\"x\"": np.zeros(7, np.float64), "i": np.zeros(5, np.int32)}, "dict", 2, 5, 1.0),
        ({"0": np.zeros(10, np.float16), "1": np.zeros(2, np.uint8)}, "list", 4, 3, 1.0),
    ]
    for named, layout, count, name_len, big in cases:
        size, (least, most) = sizes(named, layout, count, name_len, big)
        assert least <= size <= most, (named.keys(), size, least, most)


def test_the_range_is_tight_enough_to_refuse_an_inflated_announce() -> None:
    template = describe(encode_named({"w": np.zeros(1 << 18, np.float32)}, "dict"))
    least, most = partial_size_range(template, 10)
    assert least == 8 + 4 * (1 << 18)
    assert most < 3 * (1 << 20)  # a 1 MiB model: never 4 GiB


def test_partial_pieces_are_its_bytes_and_views_of_its_sums() -> None:
    """encode_partial_pieces joined is encode_partial; its array pieces are the sums' own
    memory (a combiner streams them to the controller without a second copy)."""
    import numpy as np

    from scaleout.core.aggregators.base import Partial, encode_partial, encode_partial_pieces

    sums = {"a": np.arange(12, dtype=np.float64).reshape(3, 4), "b": np.linspace(0, 1, 5, dtype=np.float32)}
    p = Partial(sums=sums, weight=3.0, count=2, contributors=["x", "y"])
    pieces = encode_partial_pieces(p)
    assert b"".join(pieces) == encode_partial(p)
    arrays = [np.frombuffer(piece, dtype=np.uint8) for piece in pieces[2:]]
    assert any(np.shares_memory(a, sums["a"]) for a in arrays) and any(np.shares_memory(a, sums["b"]) for a in arrays)
