"""The noise rule with a measurement floor: intervals computed by hand (t(0.975, 1) = 12.7062, t(0.975, 2) = 4.3027),
the Agresti-Coull binomial variance from its formula, and the cases where a zero spread must not look certain."""
from __future__ import annotations

import math

import pytest

from gradscope.analysis import stats
from gradscope.analysis.stats import binomial_variance, floored, identical, interval


def test_binomial_variance_by_hand():
    # 0 wrong of 40: the plain p(1-p)/m is 0; Agresti-Coull adds two wrong and two right: p = 2/44 over m + 4 = 44
    assert binomial_variance(0.0, 40) == pytest.approx((2 / 44) * (42 / 44) / 44)
    assert math.sqrt(binomial_variance(0.0, 40)) == pytest.approx(0.0314, abs=1e-4)  # 3.1 points
    # 4 wrong of 40 (10%): p = 6/44
    assert binomial_variance(0.1, 40) == pytest.approx((6 / 44) * (38 / 44) / 44)
    # all wrong is as noisy as none wrong
    assert binomial_variance(1.0, 40) == pytest.approx(binomial_variance(0.0, 40))
    # many examples: the plain binomial variance, to O(1/m)
    assert binomial_variance(0.1, 1_000_000) == pytest.approx(0.1 * 0.9 / 1_000_000, rel=1e-4)
    # unknown count or value: no floor
    for bad in ((0.1, 0), (0.1, None), (math.nan, 40)):
        assert math.isnan(binomial_variance(*bad))


def test_a_floor_widens_a_zero_spread_by_hand():
    # three identical values, floor 0.27 per seed: sd sqrt(0.27), se sqrt(0.27/3) = 0.3, half-width 4.3027 * 0.3
    mean, sd, se, n, lo, hi = interval([1.0, 1.0, 1.0], floor=0.27)
    assert (mean, n) == (1.0, 3) and sd == pytest.approx(math.sqrt(0.27)) and se == pytest.approx(0.3)
    assert (lo, hi) == (pytest.approx(1.0 - 1.2908, abs=1e-4), pytest.approx(1.0 + 1.2908, abs=1e-4))
    assert floored(0.0, 0.27) and not identical(sd, [1.0, 1.0, 1.0])
    # without a floor the same values give a zero-width interval, and are flagged as identical
    mean, sd, se, n, lo, hi = interval([1.0, 1.0, 1.0])
    assert lo == hi == 1.0 and identical(sd, [1.0, 1.0, 1.0])


def test_a_spread_above_the_floor_is_kept():
    # sd 1 over three seeds: [1 - 4.3027/sqrt(3), 1 + 4.3027/sqrt(3)] = [-1.4841, 3.4841], with or without a floor of 0.25
    for floor in (0.0, 0.25, math.nan):
        mean, sd, se, n, lo, hi = interval([0.0, 1.0, 2.0], floor=floor)
        assert sd == pytest.approx(1.0) and lo == pytest.approx(-1.4841, abs=1e-4) and hi == pytest.approx(3.4841,
                                                                                                            abs=1e-4)
    assert not floored(1.0, 0.25) and not floored(0.0, math.nan) and not floored(math.nan, 0.25)


def test_one_seed_stays_undecided_whatever_the_floor():
    mean, sd, se, n, lo, hi = interval([2.0], floor=0.5)
    assert n == 1 and lo == -math.inf and hi == math.inf
    assert stats.versus_margin(lo, hi, 0.1) == stats.STRADDLES


def test_identical_allows_float_rounding_only():
    gaps = [2.01 - 1.01, 2.0 - 1.0, 2.02 - 1.02]  # 1.0 up to rounding
    assert identical(stats.mean_sd_se(gaps)[1], gaps)
    close = [1.0, 1.001]
    assert not identical(stats.mean_sd_se(close)[1], close)
    assert not identical(math.nan, [1.0])  # one value: no spread to judge
