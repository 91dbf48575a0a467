"""engram_helpers.stats: means with seeded percentile-bootstrap 95% intervals."""

from __future__ import annotations

import numpy as np
import pytest

from engram_helpers import stats


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    x = np.random.default_rng(0).normal(size=50)
    e = stats.bootstrap(x, seed=1)
    assert e.lo < e.mean < e.hi and e.n == 50
    assert e == stats.bootstrap(x, seed=1)
    assert abs((e.hi - e.lo) - 2 * 1.96 * x.std() / np.sqrt(50)) < 0.2  # about the normal-theory width
    assert stats.bootstrap([1.0, 1.0, 1.0]).lo == 1.0
    with pytest.raises(ValueError, match="No values"):
        stats.bootstrap([])


def test_bootstrap_mean_is_seeded_over_the_first_axis_and_covers_the_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, size=(200, 2))
    low, high = stats.bootstrap_mean(values, n_boot=500, seed=1)
    low2, high2 = stats.bootstrap_mean(values, n_boot=500, seed=1)
    np.testing.assert_array_equal(low, low2)
    np.testing.assert_array_equal(high, high2)
    mean, se = values.mean(axis=0), values.std(axis=0, ddof=1) / np.sqrt(200)
    assert np.all(low < mean) and np.all(mean < high)
    np.testing.assert_allclose(high - low, 2 * 1.96 * se, rtol=0.2)  # close to the normal interval
    one_low, one_high = stats.bootstrap_mean(values[:1])
    np.testing.assert_array_equal(one_low, values[0])
    np.testing.assert_array_equal(one_high, values[0])


def test_the_estimate_is_the_array_bootstrap_of_one_column():
    # one bootstrap: an Estimate's interval is bootstrap_mean's, with the same draws, NaNs left out first
    x = np.random.default_rng(3).normal(size=30)
    e = stats.bootstrap(np.append(x, np.nan), n_boot=700, seed=5)
    low, high = stats.bootstrap_mean(x, n_boot=700, seed=5)
    assert (e.lo, e.hi, e.n) == (float(low), float(high), 30) and e.mean == pytest.approx(x.mean())
    assert stats.Estimate(0.5, 0.25, 0.75, 4).pct() == "50% [25, 75]" and str(stats.Estimate(0.5, 0.25, 0.75, 4)) == \
        "0.500 [0.250, 0.750]"
