"""Paired statistics for A/B results over seeds: mean difference, seeded bootstrap interval, sign count.

Why its own module: the study, the demo and the benchmark grid report the same statistics (mean and sample std
over seeds; TPP minus no-TPP, paired by seed, labelled subset and budget), and a reader must be able to
re-compute them. The interval is the
percentile bootstrap of the mean paired difference: ``n_resamples`` resamples of the pairs with
replacement, drawn as one ``(n_resamples, n)`` index array from ``numpy.random.default_rng(seed)``,
and the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles (numpy's linear interpolation) of
the resampled means. With 5 pairs it is a rough interval (it cannot be wider than the pairs' range);
the sign count is reported beside it for that reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

#: the study's protocol values (docs/results/study_tumour_crops/PROTOCOL.md)
N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference ``b - a`` with its bootstrap interval and how many pairs favour ``b``."""

    n: int
    mean: float
    lo: float
    hi: float
    better: int  # pairs where b is better (higher, or lower when lower is better)
    worse: int
    ties: int
    level: float = LEVEL

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self, digits: int = 2) -> str:
        """e.g. ``+1.23 [95% CI -0.40, +2.90], TPP better in 4/5``."""
        f = f"{{:+.{digits}f}}"
        return (f"{f.format(self.mean)} [{100 * self.level:g}% CI {f.format(self.lo)}, {f.format(self.hi)}], "
                f"better in {self.better}/{self.n}")


def bootstrap_mean_ci(values: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded, reproducible)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D list of values, got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(int(n_resamples), len(x)))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True,
                      n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = LEVEL) -> PairedDifference:
    """Statistic of the pairs ``(a[i], b[i])``: mean of ``b - a``, its bootstrap interval, sign count."""
    if len(a) != len(b):
        raise ValueError(f"paired results need equal lengths, got {len(a)} and {len(b)}")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    lo, hi = bootstrap_mean_ci(d, n_resamples, seed, level)
    sign = d if higher_is_better else -d
    return PairedDifference(n=len(d), mean=float(d.mean()), lo=lo, hi=hi, better=int((sign > 0).sum()),
                            worse=int((sign < 0).sum()), ties=int((sign == 0).sum()), level=level)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of a result column."""
    a = [float(x) for x in xs]
    m = math.fsum(a) / len(a)
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in a) / (len(a) - 1)) if len(a) > 1 else 0.0
