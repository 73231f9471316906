"""FedAvg: the example-weighted mean of client updates (McMahan et al., 2017)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scaleout.core.aggregators.base import Partial, cast_mean, check_weight
from scaleout.core.aggregators.fold import BLOCK, FOLD_BLOCK, acc_dtype, amax, fold_into, fold_many_into
from scaleout.core.errors import UpdateRejected
from scaleout.core.payload import TensorSpec, check_compatible, check_dtypes, check_values

@dataclass(frozen=True)
class Checked:
    """An update that passed `FedAvg.check`: its arrays and a bound on each one's |values|."""

    arrays: dict[str, np.ndarray]
    peaks: dict[str, float]
    converted: tuple[str, ...] = ()  # tensors of another width than the model's (float64 for float32): cast by the fold
    read: Callable[[np.ndarray], None] | None = None  # told each stretch of the arrays once read (check) and folded (add)


# A sum whose exact value stays below these cannot overflow its accumulator, rounding
# included (float32 reaches 3.4e38, float64 1.8e308): below them no isfinite pass is needed.
SAFE_SUM = {np.dtype(np.float32): 1e37, np.dtype(np.float64): 1e307}


class FedAvg:
    """Running weighted sum; `result()` divides by the total weight.

    Sums are kept in `acc_dtype` of each tensor (float32 for float16/float32 tensors, see
    `fold` for the error bound), promoted to float64 only if their magnitude requires it.
    Each update is read twice, block by block: once to check it (NaN, inf, values beyond the
    model's dtype, and a bound on the largest magnitude, which bounds the sums), once to fold
    it in place; a combiner checks its chunks as they land instead (`check(landed=...)`,
    core/aggregators/landing.py), so the fold is the only read of it from memory. Every check runs before the sums are touched, so a refused update leaves no
    trace. Sums are kept in template order, so the result keeps the model's tensor order.
    """

    name = "fedavg"

    def __init__(self, template: Mapping[str, TensorSpec]) -> None:
        self.template = dict(template)
        self._sums = {name: np.zeros(spec.shape, dtype=acc_dtype(spec.dtype)) for name, spec in self.template.items()}
        self._weight = 0.0
        self._contributors: list[str] = []
        self._ceiling = dict.fromkeys(self.template, 0.0)  # a bound on each sum's |elements|
        self._scratch: dict[np.dtype, np.ndarray] = {}

    @property
    def count(self) -> int:
        return len(self._contributors)

    def check(
        self, update: Mapping[str, np.ndarray], read: Callable[[np.ndarray], None] | None = None, landed: dict[str, float] | None = None,
    ) -> Checked:
        """Check an update against the model (names, shapes, values) without touching the
        sums: safe to run for several updates at once, outside whatever serialises `add`.
        ``read`` is told each stretch of the update once read, here and by `add` (a caller
        whose update is a mapped file lets those pages go: it is never all in memory).
        ``landed``: the peaks a `LandingCheck` of this update's bytes passed them with (its
        values were checked chunk by chunk as they arrived): they are not read again here."""
        check_compatible(self.template, update)
        converted = tuple(check_dtypes(self.template, update))  # another kind (int for float) is refused
        arrays = {name: np.asarray(update[name]) for name in self.template}
        if landed is not None and landed.keys() == arrays.keys():
            return Checked(arrays, dict(landed), converted, read)
        return Checked(arrays, check_values(self.template, update, read), converted, read)

    def add(self, update: Mapping[str, np.ndarray] | Checked, weight: float, contributor: str) -> None:
        """Fold ``update`` (raw, or as returned by `check`) in with ``weight``."""
        checked = update if isinstance(update, Checked) else self.check(update)
        w = check_weight(weight)
        self._check_new([contributor])
        update, peaks = checked.arrays, checked.peaks
        if not math.isfinite(self._weight + w):
            raise UpdateRejected(f"weight {w!r} makes the total weight overflow")
        with np.errstate(over="ignore"):
            ceilings = {name: self._ceiling[name] + w * peaks[name] for name in self._sums}
        self._fold(update, w, ceilings, "weighting this update by {w:g} overflows the running sum of tensor {name!r}", checked.read)
        self._weight += w
        self._contributors.append(contributor)

    def add_many(self, items: Sequence[tuple[Checked, float, str]]) -> list[UpdateRejected | None]:
        """`add` each ``(checked, weight, contributor)`` in turn, each all or nothing; returns
        what each `add` raised (None: folded in). The sums are bit for bit those of the `add`
        calls in that order, folded in one pass over the sums (`fold_many_into`) unless one of
        the batch could take a sum near its accumulator's limit (then one at a time, as `add`)."""
        outcomes: list[UpdateRejected | None] = []
        seen, weight, ceilings = set(self._contributors), self._weight, dict(self._ceiling)
        taken: list[tuple[Checked, float, str]] = []
        for checked, raw_weight, contributor in items:
            try:  # the refusals of `add`, in its order, against the state the earlier items leave
                w = check_weight(raw_weight)
                self._check_new([contributor], seen)
                if not math.isfinite(weight + w):
                    seen.discard(contributor)
                    raise UpdateRejected(f"weight {w!r} makes the total weight overflow")
            except UpdateRejected as exc:
                outcomes.append(exc)
                continue
            outcomes.append(None)
            weight += w
            with np.errstate(over="ignore"):
                ceilings = {name: ceilings[name] + w * checked.peaks[name] for name in self._sums}
            taken.append((checked, w, contributor))
        if not all(ceilings[name] < SAFE_SUM[total.dtype] for name, total in self._sums.items()):
            return [self._try_add(*item) for item in items]  # a promotion or a fresh float64 sum on the way
        for name, total in self._sums.items() if taken else ():
            arrays = [checked.arrays[name] for checked, _, _ in taken]
            fold_many_into(total, arrays, [w for _, w, _ in taken], self._scratch_for(total.dtype), [checked.read for checked, _, _ in taken])
        for _, w, contributor in taken:
            self._weight += w
            self._contributors.append(contributor)
        self._ceiling = ceilings
        return outcomes

    def _try_add(self, checked: Checked, weight: float, contributor: str) -> UpdateRejected | None:
        try:
            self.add(checked, weight, contributor)
        except UpdateRejected as exc:
            return exc
        return None

    def add_partial(self, p: Partial) -> None:
        """Fold another aggregator's partial in, all or nothing. The partial's arrays are
        handed over: the first one's, when writable, become the sums themselves (not copied)."""
        w = check_weight(p.weight, allow_zero=True)
        if p.count != len(p.contributors) or (w == 0) != (p.count == 0):
            raise UpdateRejected(
                f"inconsistent partial: count {p.count}, weight {p.weight}, {len(p.contributors)} contributors"
            )
        self._check_new(p.contributors)
        check_compatible(self.template, p.sums)
        if not math.isfinite(self._weight + w):
            raise UpdateRejected(f"partial weight {w!r} makes the total weight overflow")
        # One blocked pass per tensor: NaN/inf refused, and a ceiling for the new sums.
        ceilings: dict[str, float] = {}
        for name in self._sums:
            peak = amax(np.asarray(p.sums[name]))
            if not math.isfinite(peak):
                raise UpdateRejected(f"partial aggregate tensor {name!r} contains NaN or inf")
            ceilings[name] = self._ceiling[name] + peak
        if self.count == 0 and self._adoptable(p.sums, ceilings):
            # The first partial's own (writable) buffers become the sums: 0 + 1.0 * x is x, and
            # a reducer holding a partial as large as the model does not hold a second one.
            self._sums = {name: p.sums[name] for name in self._sums}
            self._ceiling = ceilings
        else:
            self._fold({name: np.asarray(p.sums[name]) for name in self._sums}, 1.0, ceilings, "adding this partial aggregate overflows the running sum of tensor {name!r}")
        self._weight += w
        self._contributors.extend(p.contributors)

    def _fold(
        self, arrays: dict[str, np.ndarray], w: float, ceilings: dict[str, float], overflow: str, read: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        """sums += w * arrays, all or nothing. Sums whose ceiling stays safe are folded in
        place; a float32 sum that could outgrow float32 is promoted to float64 first (exact);
        a float64 sum that could overflow is computed afresh and kept only if finite."""
        for name, ceiling in ceilings.items():
            total = self._sums[name]
            if total.dtype == np.float32 and not ceiling < SAFE_SUM[total.dtype]:
                self._sums[name] = total.astype(np.float64)
        fresh: dict[str, np.ndarray] = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for name, ceiling in ceilings.items():
                total = self._sums[name]
                if not ceiling < SAFE_SUM[total.dtype]:
                    new = np.multiply(arrays[name], w, dtype=np.float64)
                    new += total
                    if not np.isfinite(new).all():
                        raise UpdateRejected(overflow.format(w=w, name=name))
                    fresh[name] = new
        for name, total in self._sums.items():  # nothing below can fail: the update is in
            if name in fresh:
                self._sums[name] = fresh[name]
            else:
                fold_into(total, arrays[name], w, self._scratch_for(total.dtype), read)
        self._ceiling = ceilings

    def _adoptable(self, sums: Mapping[str, np.ndarray], ceilings: dict[str, float]) -> bool:
        """Whether ``sums`` can be taken as this aggregator's own: writable arrays of each
        sum's shape and dtype (as a partial's views into a writable payload are), whose
        ceilings a fold in place would accept too."""
        for name, total in self._sums.items():
            s = sums[name]
            if not (isinstance(s, np.ndarray) and s.flags.writeable and s.flags.c_contiguous and s.dtype == total.dtype and s.shape == total.shape):
                return False
            if not ceilings[name] < SAFE_SUM[total.dtype]:
                return False
        return True

    def _scratch_for(self, dtype: np.dtype) -> np.ndarray:
        if dtype not in self._scratch:
            self._scratch[dtype] = np.empty(max(BLOCK, FOLD_BLOCK), dtype=dtype)
        return self._scratch[dtype]

    def partial(self, copy: bool = True) -> Partial:
        """The running sums (in their accumulator dtypes), copied unless ``copy`` is False
        (the caller then adds nothing more: a combiner encoding its final share); refused if
        one is not finite (never sent on)."""
        for name, total in self._sums.items():
            if not self._ceiling[name] < SAFE_SUM[total.dtype] and not np.isfinite(total).all():
                raise UpdateRejected(f"the aggregate of tensor {name!r} is not finite")
        sums = {name: total.copy() if copy else total for name, total in self._sums.items()}
        return Partial(sums, self._weight, self.count, list(self._contributors))

    def mean(self, in_place: bool = False) -> dict[str, np.ndarray]:
        """The weighted mean in each sum's accumulator dtype (divided in float64 element by
        element, without a model-sized float64 temporary): what a server step starts from.
        ``in_place`` divides the sums themselves (no copy of the model; nothing may be
        added afterwards: the controller's last use of a round's aggregate)."""
        if self._weight <= 0:
            raise UpdateRejected("no updates to aggregate")
        weight = np.float64(self._weight)
        out = {name: np.divide(total, weight, out=total if in_place else np.empty_like(total), casting="same_kind") for name, total in self._sums.items()}
        if in_place:
            self._weight, self._contributors = 0.0, []  # spent: adding to it now would be wrong
            self._sums = {}
        return out

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean in each tensor's dtype; refused if it does not fit that dtype."""
        return {name: cast_mean(name, mean, self.template[name].dtype) for name, mean in self.mean().items()}

    def _check_new(self, contributors: list[str], seen: set[str] | None = None) -> None:
        seen = set(self._contributors) if seen is None else seen  # a caller's own set: each one that passes is added
        for contributor in contributors:
            if not isinstance(contributor, str) or not contributor:
                raise UpdateRejected(f"contributor must be a non-empty string, got {contributor!r}")
            if contributor in seen:
                raise UpdateRejected(f"duplicate update from {contributor!r}; each contributor counts once")
            seen.add(contributor)
