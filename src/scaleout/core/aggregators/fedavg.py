"""FedAvg: the example-weighted mean of client updates (McMahan et al., 2017)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from scaleout.core.aggregators.base import Partial, cast_mean, check_weight
from scaleout.core.errors import UpdateRejected
from scaleout.core.payload import TensorSpec, check_compatible, check_values, value_bounds

# A float64 sum whose exact value stays below this cannot overflow, rounding included
# (float64 reaches 1.8e308): below it the sums need no isfinite pass.
SAFE_SUM = 1e307


class FedAvg:
    """Running float64 weighted sum; `result()` divides by the total weight.

    Every check runs before the sums are touched, so a refused update leaves no trace.
    Sums are kept in template order, so the result keeps the model's tensor order.
    """

    name = "fedavg"

    def __init__(self, template: Mapping[str, TensorSpec]) -> None:
        self.template = dict(template)
        self._sums = {name: np.zeros(spec.shape, dtype=np.float64) for name, spec in self.template.items()}
        self._weight = 0.0
        self._contributors: list[str] = []
        # Largest |value| an update may hold per tensor, and a bound on each sum's |elements|.
        self._largest: dict[str, float] = {}
        for name, spec in self.template.items():
            low, high = value_bounds(spec.dtype)
            self._largest[name] = float(max(-low, high))
        self._ceiling = dict.fromkeys(self.template, 0.0)

    @property
    def count(self) -> int:
        return len(self._contributors)

    def add(self, update: Mapping[str, np.ndarray], weight: float, contributor: str) -> None:
        w = check_weight(weight)
        self._check_new([contributor])
        check_compatible(self.template, update)
        check_values(self.template, update)
        if not np.isfinite(self._weight + w):
            raise UpdateRejected(f"weight {w!r} makes the total weight overflow")
        # One fresh float64 array per tensor holds sums + update * w; the old sums are
        # replaced only once every tensor is known finite, so a refusal changes nothing.
        # Every value is within the model's range, so a sum can only overflow when its
        # ceiling says so (float64 models): only then does it take an isfinite pass.
        new: dict[str, np.ndarray] = {}
        ceilings = {name: self._ceiling[name] + self._largest[name] * w for name in self._sums}
        with np.errstate(over="ignore", invalid="ignore"):
            for name, total in self._sums.items():
                fresh = np.multiply(update[name], w, dtype=np.float64)
                fresh += total
                if not ceilings[name] < SAFE_SUM and not np.isfinite(fresh).all():
                    raise UpdateRejected(f"weighting this update by {w:g} overflows the running sum")
                new[name] = fresh
        self._sums = new
        self._ceiling = ceilings
        self._weight += w
        self._contributors.append(contributor)

    def add_partial(self, p: Partial) -> None:
        w = check_weight(p.weight, allow_zero=True)
        if p.count != len(p.contributors) or (w == 0) != (p.count == 0):
            raise UpdateRejected(
                f"inconsistent partial: count {p.count}, weight {p.weight}, {len(p.contributors)} contributors"
            )
        self._check_new(p.contributors)
        check_compatible(self.template, p.sums)
        if not math.isfinite(self._weight + w):
            raise UpdateRejected(f"partial weight {w!r} makes the total weight overflow")
        # One min and one max per tensor: NaN/inf refused, and a ceiling for the new sums.
        ceilings: dict[str, float] = {}
        for name in self._sums:
            sums = np.asarray(p.sums[name])
            peak = 0.0
            if sums.size:
                least, greatest = float(sums.min()), float(sums.max())
                if not (math.isfinite(least) and math.isfinite(greatest)):
                    raise UpdateRejected(f"partial aggregate tensor {name!r} contains NaN or inf")
                peak = max(-least, greatest)
            ceilings[name] = self._ceiling[name] + peak
        if all(c < SAFE_SUM for c in ceilings.values()):
            for name, total in self._sums.items():  # cannot overflow: add in place
                total += p.sums[name]
        else:  # may overflow: fresh sums, kept only if all are finite (a refusal changes nothing)
            new: dict[str, np.ndarray] = {}
            with np.errstate(over="ignore", invalid="ignore"):
                for name, total in self._sums.items():
                    fresh = np.add(total, p.sums[name], dtype=np.float64)
                    if not np.isfinite(fresh).all():
                        raise UpdateRejected(f"adding this partial aggregate overflows the running sum of tensor {name!r}")
                    new[name] = fresh
            self._sums = new
        self._ceiling = ceilings
        self._weight += w
        self._contributors.extend(p.contributors)

    def partial(self) -> Partial:
        """A copy of the running sums; refused if one is not finite (never sent on)."""
        for name, total in self._sums.items():
            if not self._ceiling[name] < SAFE_SUM and not np.isfinite(total).all():
                raise UpdateRejected(f"the aggregate of tensor {name!r} is not finite")
        sums = {name: total.copy() for name, total in self._sums.items()}
        return Partial(sums, self._weight, self.count, list(self._contributors))

    def mean(self) -> dict[str, np.ndarray]:
        """The float64 weighted mean, before any cast: what a server step starts from."""
        if self._weight <= 0:
            raise UpdateRejected("no updates to aggregate")
        return {name: total / self._weight for name, total in self._sums.items()}

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean in each tensor's dtype; refused if it does not fit that dtype."""
        return {name: cast_mean(name, mean, self.template[name].dtype) for name, mean in self.mean().items()}

    def _check_new(self, contributors: list[str]) -> None:
        seen = set(self._contributors)
        for contributor in contributors:
            if not isinstance(contributor, str) or not contributor:
                raise UpdateRejected(f"contributor must be a non-empty string, got {contributor!r}")
            if contributor in seen:
                raise UpdateRejected(f"duplicate update from {contributor!r}; each contributor counts once")
            seen.add(contributor)
