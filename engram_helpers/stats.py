"""Means with seeded percentile-bootstrap 95% intervals: the one way the course states its uncertainty.

A result is a mean over units (facts, tweets, pairs of subjects); its interval comes from resampling those units
with replacement (a paired comparison resamples the per-unit differences). Every resampling is seeded, so a
notebook run twice prints the same intervals::

    est = stats.bootstrap(per_fact_scores)          # Estimate: mean [lo, hi] over facts
    low, high = stats.bootstrap_mean(effects)       # effects [facts, layers] -> low, high [layers]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` units (e.g. facts) with its bootstrap 95% interval ``[lo, hi]``."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"

    def pct(self) -> str:
        """As percentages: ``"95% [88, 100]"``."""
        return f"{100 * self.mean:.0f}% [{100 * self.lo:.0f}, {100 * self.hi:.0f}]"


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap 95% interval of the mean over the first axis: values [n, ...] -> (low, high) [...].

    The rows are resampled with replacement ``n_boot`` times with a seeded generator. One row gives the
    row itself as both ends.
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        raise ValueError("bootstrap_mean needs at least one value.")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def bootstrap(values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of ``values`` (one per unit, NaNs left out) with :func:`bootstrap_mean`'s interval, as an
    :class:`Estimate`."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        raise ValueError("No values to average: evaluate at least one fact.")
    low, high = bootstrap_mean(x, n_boot, seed)
    return Estimate(float(x.mean()), float(low), float(high), len(x))
