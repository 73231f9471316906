"""The fold kernels: one pass over an update to check it, one to add it, both blocked.

An update is read from memory once per pass, in blocks small enough (``BLOCK`` elements)
that the temporaries of a block stay in the CPU cache: `x * w` never becomes a fresh
model-sized array, so the fold runs near memory bandwidth and allocates O(BLOCK).

Accumulator precision (``acc_dtype``): float16 and float32 tensors are summed in float32,
everything else (float64, ints, bools) in float64. For n updates the float32 sum of
``w_i * x_i`` is within ``n * 2**-24 * sum(|w_i * x_i|)`` of the exact sum (recursive
summation bound); with 1,000 updates that is at most 6e-5 of the sum of magnitudes and in
practice (random rounding) about 2e-6, below what the float32 model itself can tell
apart after a round of SGD. Ints need float64 to stay exact up to 2**53.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

BLOCK = 1 << 16  # elements per block: 256-512 KiB of temporaries, inside L2 (measured best on this machine)
STRETCH = 64 * BLOCK  # elements of an array read before a ``read`` hook is told (amax, fold_into, check_change)


def acc_dtype(dtype: str | np.dtype) -> np.dtype:
    """The dtype a running sum of tensors of ``dtype`` is kept in."""
    d = np.dtype(dtype)
    return np.dtype(np.float32) if d.kind == "f" and d.itemsize <= 4 else np.dtype(np.float64)


def amax(x: np.ndarray, read: Callable[[np.ndarray], None] | None = None) -> float:
    """Largest |value| of ``x`` (0.0 when empty); NaN when ``x`` holds a NaN, inf for an inf.

    Bools and ints are exact in float64 up to 2**53, which is all a range check needs.
    ``read``, when given, is told each stretch of a float ``x`` once it has been read (a
    caller whose ``x`` is a mapped file lets those pages go).
    """
    flat = x.reshape(-1)
    if flat.size == 0:
        return 0.0
    if flat.dtype.kind == "b":
        return 1.0 if flat.any() else 0.0
    if flat.dtype.kind in "iu":
        return float(max(abs(int(flat.min())), abs(int(flat.max()))))
    # max(max(x), -min(x)) in two reductions over the same block while it is in cache;
    # np.maximum.reduce propagates NaN, so a NaN anywhere makes the result NaN.
    peak, told = 0.0, 0
    for start in range(0, flat.size, BLOCK):
        block = flat[start : start + BLOCK]
        hi, lo = float(block.max()), float(block.min())
        if math.isnan(hi) or math.isnan(lo):
            return math.nan
        peak = max(peak, hi, -lo)
        told = _tell(read, flat, told, start + BLOCK)
    return peak


DOT_BLOCK = 1 << 20  # elements per dot product in `peak_bound`: no temporaries, so only its Python overhead and the bound's looseness (sqrt of it) count
# Below these, a sum of squares may have lost some to underflow (squares under ~1e-38 in
# float32, ~1e-308 in float64 are 0): the elements are all tiny, and `amax` says how tiny.
_TINY = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): 1e-290}
_SLACK = {np.dtype(np.float32): 1 + 4 * DOT_BLOCK * 2.0**-23, np.dtype(np.float64): 1 + 4 * DOT_BLOCK * 2.0**-52}  # 4 n eps


def peak_bound(x: np.ndarray, read: Callable[[np.ndarray], None] | None = None) -> float:
    """An upper bound on ``x``'s largest |value|, not always the value: for float32 and
    float64, the square root of each block's sum of squares (one BLAS dot product, a few
    times cheaper than the max and the min `amax` takes), raised past its rounding error.
    NaN or inf when ``x`` holds one, or when the squares overflow (|x| beyond 1.8e19 in
    float32): ask `amax` then. Other dtypes: `amax`. ``read`` as in `amax`."""
    flat = x.reshape(-1)
    if flat.dtype not in _TINY or flat.size == 0:
        return amax(x, read)
    worst, told = 0.0, 0
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for start in range(0, flat.size, DOT_BLOCK):
            block = flat[start : start + DOT_BLOCK]
            squares = float(np.dot(block, block))
            if not squares < math.inf:  # NaN, or inf
                return squares
            worst = max(worst, squares)
            told = _tell(read, flat, told, start + DOT_BLOCK)
    if worst < _TINY[flat.dtype]:  # all below 1e-15 (zeros, say), some squares maybe lost to underflow
        return amax(x)
    # A sum of n products of non-negative terms, rounded: within (1 + n u)/(1 - n u) of exact.
    return math.sqrt(worst * _SLACK[flat.dtype])


def _tell(read: Callable[[np.ndarray], None] | None, flat: np.ndarray, told: int, stop: int, stretch: int = STRETCH) -> int:
    """Tell ``read`` of ``flat[told:stop]`` once it spans ``stretch`` or reaches the end;
    returns where the next stretch to tell begins."""
    if read is None or (stop - told < stretch and stop < flat.size):
        return told
    read(flat[told:stop])
    return stop


def _weight(w: float, dtype: np.dtype) -> np.floating:
    """``w`` in the accumulator's dtype, or in float64 when it is beyond that dtype's range
    (a weight of 1e308 on an all-zero tensor: 0 * inf would put NaN in the sums)."""
    return dtype.type(w) if abs(w) <= float(np.finfo(dtype).max) else np.float64(w)


def fold_into(acc: np.ndarray, x: np.ndarray, w: float, scratch: np.ndarray | None = None, read: Callable[[np.ndarray], None] | None = None) -> None:
    """``acc += w * x`` in place, block by block, with no model-sized temporary.

    ``acc`` is a C-contiguous float32 or float64 array of x's shape; ``scratch`` (optional)
    a buffer of at least BLOCK elements of acc's dtype, reused across calls; ``read``
    (optional) is told each stretch of ``x`` once it has been added (see `amax`).
    """
    a = acc.reshape(-1)
    v = x.reshape(-1)
    if scratch is None or scratch.size < BLOCK or scratch.dtype != acc.dtype:
        scratch = np.empty(BLOCK, dtype=acc.dtype)
    weight = _weight(w, acc.dtype)
    told = 0
    for start in range(0, a.size, BLOCK):
        stop = min(start + BLOCK, a.size)
        tmp = scratch[: stop - start]
        np.multiply(v[start:stop], weight, out=tmp, casting="unsafe")
        np.add(a[start:stop], tmp, out=a[start:stop])
        told = _tell(read, v, told, stop)


FOLD_BLOCK = 1 << 17  # elements per block of the sums in `fold_many_into`: 512 KiB of float32 (measured best of 64 KiB..4 MiB here, k = 8)


def fold_many_into(
    acc: np.ndarray, xs: Sequence[np.ndarray], ws: Sequence[float], scratch: np.ndarray | None = None,
    reads: Sequence[Callable[[np.ndarray], None] | None] | None = None, block: int = FOLD_BLOCK,
) -> None:
    """``acc += w_0 * x_0``, then ``+= w_1 * x_1``... for each ``(x_i, w_i)``, in one pass
    over ``acc``: each block of it is read once, gets every update added while it is in
    cache, and is written once (an update costs its own read plus 1/k of the sums' read
    and write, instead of all three). Each element sees the same operations in the same
    order as `fold_into` of each update in turn, so the sums are bit for bit theirs.
    ``scratch``, ``reads`` (one hook per update, as in `fold_into`) are optional."""
    a = acc.reshape(-1)
    vs = [x.reshape(-1) for x in xs]
    if scratch is None or scratch.size < block or scratch.dtype != acc.dtype:
        scratch = np.empty(block, dtype=acc.dtype)
    weights = [_weight(w, acc.dtype) for w in ws]
    hooks = list(reads) if reads is not None else [None] * len(vs)
    told = [0] * len(vs)
    stretch = max(block, STRETCH // max(1, len(vs)))  # k mapped updates together hold about one STRETCH of pages, not k
    for start in range(0, a.size, block):
        stop = min(start + block, a.size)
        tmp = scratch[: stop - start]
        out = a[start:stop]
        for i, v in enumerate(vs):
            np.multiply(v[start:stop], weights[i], out=tmp, casting="unsafe")
            np.add(out, tmp, out=out)
            told[i] = _tell(hooks[i], v, told[i], stop, stretch)
