"""tpp_monai.reporting: the paired bootstrap against a re-statement of its maths, sign counts, errors."""

from __future__ import annotations

import numpy as np
import pytest

from tpp_monai.reporting import bootstrap_mean_ci, paired_difference


def _restated_ci(values, n_resamples, seed, level):
    """Re-statement: one resample at a time with Generator.choice (with replacement), then the percentiles."""
    rng = np.random.default_rng(seed)
    x = np.asarray(values, dtype=np.float64)
    means = [rng.choice(x, size=len(x), replace=True).mean() for _ in range(n_resamples)]
    return tuple(np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2]))


@pytest.mark.parametrize("seed", [0, 7])
def test_bootstrap_equals_restatement_with_the_same_seed(seed):
    d = [1.5, -0.25, 2.0, 0.75, 3.0]
    lo, hi = bootstrap_mean_ci(d, n_resamples=10_000, seed=seed, level=0.95)
    rlo, rhi = _restated_ci(d, 10_000, seed, 0.95)
    # same index stream, the same float64 means: equal up to summation order of 5 numbers
    assert lo == pytest.approx(rlo, abs=1e-12) and hi == pytest.approx(rhi, abs=1e-12)
    assert min(d) <= lo < np.mean(d) < hi <= max(d)


def test_paired_difference_values_and_signs():
    a = [50.0, 60.0, 55.0, 40.0, 70.0]
    b = [54.0, 59.0, 58.0, 40.0, 75.0]
    r = paired_difference(a, b)
    assert r.n == 5 and r.mean == pytest.approx(2.2) and (r.better, r.worse, r.ties) == (3, 1, 1)
    assert (r.lo, r.hi) == pytest.approx(bootstrap_mean_ci([4.0, -1.0, 3.0, 0.0, 5.0]))
    low = paired_difference(a, b, higher_is_better=False)  # e.g. HD95: lower is better
    assert (low.better, low.worse) == (1, 3) and low.mean == pytest.approx(2.2)
    assert "+2.20 [95% CI" in r.text()
    const = paired_difference([1.0, 2.0], [2.0, 3.0])
    assert (const.lo, const.hi, const.mean) == (1.0, 1.0, 1.0)  # every resample has mean 1


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="confidence level"):
        bootstrap_mean_ci([1.0], level=1.5)
