"""`check_values` one chunk at a time, as an update lands (issue 17 #2).

A combiner's link hashes each chunk of an update as it arrives; `LandingCheck.feed` then
looks at the same bytes while they are still in the CPU cache, so by the time the payload
is whole and its digest matches, the combiner knows whether every value is finite and in
the model dtype's range, and a bound on each tensor's largest |value|, without reading the
update again from memory.

The chunks come in order. The safetensors header (its first 8 + N bytes) is collected
first and gives each tensor's dtype and byte range; an element cut by a chunk's border is
completed from the next chunk. `verdict` says at the end:

- the peaks (as `check_values` returns them: a bound on each float tensor's |values|, the
  type's extent for an integer tensor that always fits) when every tensor clearly passes;
- None when it cannot say so: a malformed or unexpected header, chunks out of order or
  missing, or any tensor that does not clearly pass (NaN, inf, a value out of range, or a
  bound too loose to decide). The caller then runs `check_values` over the whole update,
  which decides, and names the offending tensor with its exact value. A refusal is rare, so
  only that path reads the update twice.

Pure: no files, no threads; the caller feeds it bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np

from scaleout.core.aggregators.fold import _SLACK, _TINY, DOT_BLOCK, amax
from scaleout.core.payload import _DTYPES, _MAX_HEADER, TensorSpec, headroom, value_bounds


class _Span:
    __slots__ = ("name", "dtype", "begin", "end", "tail", "peak", "squares", "least", "greatest", "seen", "dotted")

    def __init__(self, name: str, dtype: np.dtype, begin: int, end: int) -> None:
        self.name, self.dtype, self.begin, self.end = name, dtype, begin, end
        self.tail = b""  # the start of an element a chunk's border cut
        self.peak = 0.0  # floats: a bound on |values| so far (NaN once a NaN is seen), besides...
        self.squares = 0.0  # ...the largest sum of squares of a piece (float32/float64: its root, raised by _SLACK, bounds the piece)
        self.dotted = self.dtype in _SLACK
        self.least: int | float = 0  # integers and bools: the exact extremes so far
        self.greatest: int | float = 0
        self.seen = False

    def look(self, piece: memoryview) -> None:
        """Take in this tensor's next bytes (in order)."""
        size = self.dtype.itemsize
        if self.tail:
            need = size - len(self.tail)
            self.tail += bytes(piece[:need])
            piece = piece[need:]
            if len(self.tail) == size:
                whole, self.tail = self.tail, b""
                self._values(np.frombuffer(whole, dtype=self.dtype))
        whole_bytes = len(piece) - len(piece) % size
        if whole_bytes:
            self._values(np.frombuffer(piece[:whole_bytes], dtype=self.dtype))
        if whole_bytes < len(piece):
            self.tail = bytes(piece[whole_bytes:])

    def _values(self, values: np.ndarray) -> None:
        if values.size > DOT_BLOCK:  # the slack below holds for at most DOT_BLOCK elements a dot product
            for start in range(0, values.size, DOT_BLOCK):
                self._values(values[start : start + DOT_BLOCK])
            return
        if self.dotted:  # float32, float64: one dot product over bytes in cache, as `peak_bound`
            squares = float(np.dot(values, values))
            if _TINY[self.dtype] <= squares < math.inf:
                if squares > self.squares:
                    self.squares = squares
                return
        if self.dtype.kind == "f":  # float16; NaN, inf, squares beyond the dtype or lost to underflow: the exact peak
            if math.isnan(self.peak):
                return
            bound = amax(values)
            self.peak = bound if math.isnan(bound) else max(self.peak, bound)
        elif values.size:
            least, greatest = values.min().item(), values.max().item()
            self.least = min(self.least, least) if self.seen else least
            self.greatest = max(self.greatest, greatest) if self.seen else greatest
            self.seen = True


class LandingCheck:
    """Fed an update's bytes in order (``feed``), says at the end (``verdict``) whether
    each value passes `check_values` against ``reference`` and with what peaks."""

    def __init__(self, reference: Mapping[str, TensorSpec], size: int) -> None:
        self.reference = dict(reference)
        self.size = size  # the payload's announced size
        self.fed = 0  # bytes taken in, in order
        self.head = bytearray()  # the 8-byte length and the JSON header, until parsed
        self.spans: list[_Span] | None = None  # in offset order, absolute offsets
        self.lost = False  # something it cannot judge (bad header, a gap): the whole check decides
        self.payload: object = None  # set by its feeder once the bytes are whole and their digest matched: what it judged
        self._next = 0  # index of the first span not yet wholly seen

    def feed(self, offset: int, chunk: memoryview | bytes) -> None:
        """Take in ``chunk``, the payload's bytes from ``offset`` on (never raises: what it
        cannot read makes its verdict None)."""
        if self.lost:
            return
        try:
            view = memoryview(chunk)
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                self._feed(offset, view if view.format == "B" and view.ndim == 1 else view.cast("B"))
        except Exception:  # noqa: BLE001  # a verdict of None: the whole-update check decides and says why
            self.lost = True

    def _feed(self, offset: int, chunk: memoryview) -> None:
        if offset != self.fed or offset + len(chunk) > self.size:
            self.lost = True
            return
        self.fed += len(chunk)
        if self.spans is None:
            chunk = self._header(chunk)
            if self.spans is None:
                return
        start = self.fed - len(chunk)
        stop = self.fed
        spans = self.spans
        if self._next < len(spans):  # the usual chunk: whole elements inside one tensor
            span = spans[self._next]
            size = span.dtype.itemsize
            if span.begin <= start and stop < span.end and not span.tail and not (start - span.begin) % size and not len(chunk) % size:
                span._values(np.frombuffer(chunk, dtype=span.dtype))
                return
        while self._next < len(spans) and start < stop:
            span = spans[self._next]
            a, b = max(start, span.begin), min(stop, span.end)
            if a < b:
                span.look(chunk[a - start : b - start])
            if span.end <= stop:
                self._next += 1
            else:
                break

    def _header(self, chunk: memoryview) -> memoryview:
        """Collect the header from ``chunk``; parse it once whole. Returns the bytes after it."""
        want = 8 if len(self.head) < 8 else 8 + struct.unpack("<Q", bytes(self.head[:8]))[0]
        take = min(len(chunk), want - len(self.head))
        self.head += chunk[:take]
        chunk = chunk[take:]
        if len(self.head) == 8 and want == 8:
            (length,) = struct.unpack("<Q", bytes(self.head))
            if length > _MAX_HEADER or 8 + length > self.size:
                self.lost = True
                return chunk[:0]
            return self._header(chunk) if length else self._parse(chunk)
        if len(self.head) < want:
            return chunk[:0]
        return self._parse(chunk)

    def _parse(self, rest: memoryview) -> memoryview:
        header = json.loads(bytes(self.head[8:]))
        base = len(self.head)
        spans = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            if name not in self.reference or not (isinstance(begin, int) and isinstance(end, int)) or (end - begin) != math.prod(entry["shape"]) * dtype.itemsize:
                raise ValueError(name)
            spans.append(_Span(name, dtype, base + begin, base + end))
        spans.sort(key=lambda s: s.begin)
        position = base
        for span in spans:  # they tile the data exactly (as `payload` requires): anything else, the whole check says why
            if span.begin != position:
                raise ValueError(span.name)
            position = span.end
        if position != self.size:
            raise ValueError("size")
        self.spans = spans
        self.head = bytearray()
        return rest

    def verdict(self) -> dict[str, float] | None:
        """The peaks `check_values` would pass the update with (bounds for float tensors),
        or None unless every byte was fed and every tensor clearly passes."""
        if self.lost or self.spans is None or self.fed != self.size:
            return None
        peaks: dict[str, float] = {}
        for span in self.spans:
            target = self.reference[span.name].dtype
            low, high = value_bounds(target)
            own_low, own_high = value_bounds(span.dtype)
            fits = low <= own_low and own_high <= high
            if span.begin == span.end:
                peaks[span.name] = 0.0
            elif span.dtype.kind == "f":
                peak = span.peak if not span.squares else max(span.peak, math.sqrt(span.squares * _SLACK[span.dtype]))
                if not (peak <= (high if fits else min(-low, high)) and (np.dtype(target).kind != "f" or peak <= headroom(target))):
                    return None  # NaN, inf, out of range, or a bound too loose to tell: the whole check decides
                peaks[span.name] = peak
            elif fits:
                peaks[span.name] = float(max(-own_low, own_high))
            else:
                if span.least < low or span.greatest > high:
                    return None
                peaks[span.name] = float(max(-span.least, span.greatest))
        return peaks
