"""A verdict is given only when the fit determines it: the slope's standard error and 95% interval
(:func:`gradscope.analysis.fit_log_slope`), the interval rule of :func:`gradscope.analysis.classify`, and verdict rows
that say why a class is ``unknown``."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.analysis.text import sentence

LO, HI = A.layer_thresholds()  # x0.958 / x1.044 per layer in amplitude


def frame_of(grad_norm, act_var=None) -> pd.DataFrame:
    """One step of per-block values (block k at depth k); act_var defaults to a flat profile."""
    act_var = [1.0] * len(grad_norm) if act_var is None else act_var
    rows = [{S.STEP: 0, S.BLOCK: f"b{k}", S.DEPTH: k, S.KIND: "Linear", S.METRIC: m, S.VALUE: float(v), S.CALL: 0}
            for k, (a, g) in enumerate(zip(act_var, grad_norm)) for m, v in ((S.ACT_VAR, a), (S.GRAD_NORM, g))]
    return pd.DataFrame(rows).astype({S.STEP: "int64", S.DEPTH: "int64", S.CALL: "int64"})


def backward_row(grad_norm) -> pd.Series:
    v = A.verdicts(frame_of(grad_norm))
    return v[v[A.SIGNAL] == A.BACKWARD].iloc[0]


def test_slope_standard_error_and_interval_match_a_hand_computation():
    x = np.arange(6.0)
    y = np.array([0.31, 0.05, -0.12, -0.41, -0.55, -0.93])  # ln values
    fit = A.fit_log_slope(x, np.exp(y))
    # independent reference: least squares by numpy's lstsq, SE from the residuals by the textbook formula
    design = np.stack([x, np.ones_like(x)], axis=1)
    (b, a), res, *_ = np.linalg.lstsq(design, y, rcond=None)
    se = math.sqrt(float(res[0]) / (6 - 2) / float(((x - x.mean()) ** 2).sum()))
    # Student's t, 97.5% quantile, 4 degrees of freedom, in closed form (2.776 in the tables)
    alpha = 4 * 0.975 * 0.025
    t4 = 2 * math.sqrt(math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha) - 1)
    assert fit.n == 6
    assert fit.slope == pytest.approx(b, rel=1e-12)
    assert fit.se == pytest.approx(se, rel=1e-12)
    assert (fit.slope_low, fit.slope_high) == pytest.approx((b - t4 * se, b + t4 * se), rel=1e-12)
    # the same numbers by hand (residuals of the fitted line)
    resid = y - (a + b * x)
    assert fit.se == pytest.approx(math.sqrt((resid ** 2).sum() / 4 / 17.5), rel=1e-12)
    # the verdict row carries the interval of the per-block factor: backward factor = exp(-slope)
    r = backward_row(np.exp(y))
    assert (r[A.FACTOR_LOW], r[A.FACTOR_HIGH]) == pytest.approx(
        (math.exp(-(b + t4 * se)), math.exp(-(b - t4 * se))), rel=1e-12)
    assert r[A.FACTOR_LOW] < r[A.FACTOR] < r[A.FACTOR_HIGH]


def test_an_exact_line_has_zero_error_and_two_points_have_no_interval():
    fit = A.fit_log_slope([0, 1, 2, 3], [1.0, 0.5, 0.25, 0.125])
    assert fit.se == pytest.approx(0.0, abs=1e-12)
    assert (fit.slope_low, fit.slope_high) == pytest.approx((math.log(0.5), math.log(0.5)), rel=1e-12)
    two = A.fit_log_slope([0, 1], [1.0, 0.01])
    assert two.slope == pytest.approx(math.log(0.01))
    assert math.isnan(two.se) and (two.slope_low, two.slope_high) == (-math.inf, math.inf)


@pytest.mark.parametrize("low,high,expected", [
    (0.80, 0.95, A.VANISHING),    # wholly below x0.958
    (1.05, 1.30, A.EXPLODING),    # wholly above x1.044
    (0.96, 1.04, A.HEALTHY),      # wholly between
    (0.90, 1.00, A.UNKNOWN),      # straddles the vanishing cut
    (1.00, 1.10, A.UNKNOWN),      # straddles the exploding cut
    (0.50, 1.50, A.UNKNOWN),      # straddles both
])
def test_classify_gives_a_class_only_to_an_interval_on_one_side(low, high, expected):
    mid = math.sqrt(low * high)
    assert A.classify(mid, signal=A.BACKWARD, low=low, high=high) == expected
    # without an interval the point decides, as before
    assert A.classify(0.9, signal=A.BACKWARD) == A.VANISHING


def test_a_noisy_but_clean_geometric_series_keeps_its_class():
    rng = np.random.default_rng(0)
    k = np.arange(20)
    noise = np.exp(rng.normal(0.0, 0.05, k.size))
    vanishing = backward_row(0.9 ** (19 - k) * noise)  # x0.9 per block toward the input
    assert vanishing[A.VERDICT] == A.VANISHING and vanishing[A.FACTOR_HIGH] < LO
    flat = backward_row(noise)
    assert flat[A.VERDICT] == A.HEALTHY and LO <= flat[A.FACTOR_LOW] and flat[A.FACTOR_HIGH] <= HI
    exploding = backward_row(1.2 ** (19 - k) * noise)
    assert exploding[A.VERDICT] == A.EXPLODING and exploding[A.FACTOR_LOW] > HI


def test_a_series_that_does_not_follow_a_trend_is_unknown_and_says_why():
    # seven heterogeneous blocks whose least-squares rate is x0.86 per block (a point class: vanishing)
    values = [1.0, 0.3, 1.4, 0.2, 0.9, 0.15, 0.6]
    r = backward_row(values[::-1])
    assert r[A.FACTOR] < LO  # the point estimate alone would be "vanishing"
    assert r[A.FACTOR_LOW] < LO < r[A.FACTOR_HIGH]
    assert r[A.VERDICT] == A.UNKNOWN
    assert "the fit does not determine the rate" in r[A.REASON] and "over 7 blocks" in r[A.REASON]
    assert f"R² {r[A.R2]:.2f}" in r[A.REASON] and "straddles x0.958" in r[A.REASON]
    text = sentence(r.to_dict())
    assert "cannot be judged: the fit does not determine the rate" in text


def test_two_blocks_are_unknown_but_a_zero_end_still_vanishes():
    r = backward_row([0.01, 1.0])  # a 100x drop between two blocks: one ratio, no trend to check
    assert r[A.VERDICT] == A.UNKNOWN and "2 blocks" in r[A.REASON]
    assert (r[A.FACTOR_LOW], r[A.FACTOR_HIGH]) == (0.0, math.inf)
    assert backward_row([0.0, 1.0])[A.VERDICT] == A.VANISHING  # the far end is zero: vanished, whatever the fit
    assert backward_row([0.0, 0.0, 0.0])[A.VERDICT] == A.VANISHING
    decided = backward_row([0.001, 0.01, 0.1, 1.0])  # x0.1 per block toward the input, an exact line
    assert decided[A.VERDICT] == A.VANISHING and pd.isna(decided[A.REASON])  # a class that is decided carries no reason

