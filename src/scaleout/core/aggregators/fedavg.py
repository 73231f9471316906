"""FedAvg: the example-weighted mean of client updates (McMahan et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from scaleout.core.aggregators.base import Partial, cast_mean, check_weight
from scaleout.core.errors import UpdateRejected
from scaleout.core.payload import TensorSpec, check_compatible, check_finite


class FedAvg:
    """Running float64 weighted sum; `result()` divides by the total weight.

    Every check runs before the sums are touched, so a refused update leaves no trace.
    """

    name = "fedavg"

    def __init__(self, template: Mapping[str, TensorSpec]) -> None:
        self.template = dict(template)
        self._sums = {name: np.zeros(spec.shape, dtype=np.float64) for name, spec in self.template.items()}
        self._weight = 0.0
        self._contributors: list[str] = []

    @property
    def count(self) -> int:
        return len(self._contributors)

    def add(self, update: Mapping[str, np.ndarray], weight: float, contributor: str) -> None:
        w = check_weight(weight)
        self._check_new([contributor])
        check_compatible(self.template, update)
        check_finite(update)
        if not np.isfinite(self._weight + w):
            raise UpdateRejected(f"weight {w!r} makes the total weight overflow")
        # One fresh float64 array per tensor holds sums + update * w; the old sums are
        # replaced only once every tensor is known finite, so a refusal changes nothing.
        new: dict[str, np.ndarray] = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for name, total in self._sums.items():
                fresh = np.multiply(update[name], w, dtype=np.float64)
                fresh += total
                if not np.isfinite(fresh).all():
                    raise UpdateRejected(f"weighting this update by {w:g} overflows the running sum")
                new[name] = fresh
        self._sums = new
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
        check_finite(p.sums)
        for name, total in self._sums.items():
            total += np.asarray(p.sums[name], dtype=np.float64)
        self._weight += w
        self._contributors.extend(p.contributors)

    def partial(self) -> Partial:
        sums = {name: total.copy() for name, total in self._sums.items()}
        return Partial(sums, self._weight, self.count, list(self._contributors))

    def result(self) -> dict[str, np.ndarray]:
        if self._weight <= 0:
            raise UpdateRejected("no updates to aggregate")
        return {name: cast_mean(total / self._weight, self.template[name].dtype) for name, total in self._sums.items()}

    def _check_new(self, contributors: list[str]) -> None:
        seen = set(self._contributors)
        for contributor in contributors:
            if not isinstance(contributor, str) or not contributor:
                raise UpdateRejected(f"contributor must be a non-empty string, got {contributor!r}")
            if contributor in seen:
                raise UpdateRejected(f"duplicate update from {contributor!r}; each contributor counts once")
            seen.add(contributor)
