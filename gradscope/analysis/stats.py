"""The one noise rule every claim and agreement uses: Student's t at 95%, two-sided.

A difference is *inside the noise* when ``|mean| <= t(0.975, n-1) * SE`` with ``SE = sd / sqrt(n)`` over seeds
(ddof 1). With one seed there is no spread to estimate, so nothing is decided from it.

**A noise floor.** Each seed's value is itself a measurement: an error rate counted on m examples, a loss averaged
over a few mini-batches. Its own noise is part of the spread over seeds, so the true per-seed variance is at least
the measurement's variance; a sample of 2-3 seeds can still show less (identical values: sd 0). Where the caller
knows each value's measurement variance, :func:`interval` takes ``floor`` (their mean) and uses
``max(sample variance, floor)`` as the per-seed variance, with the same t(0.975, n-1): the seed spread is kept where
it is larger (adding the two would count the measurement noise twice), and a spread below the measurement's own
noise, which can only be a small-sample accident, is replaced by that noise. :func:`binomial_variance` is the
floor of an error rate.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

# t(0.975, df) for df = 1..30 (Student's t; standard tables), then the normal 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (inf for df < 1)."""
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_sd_se(values: Sequence[float]) -> tuple[float, float, float, int]:
    """``(mean, sd, se, n)`` of the finite values (sd with ddof 1; sd and se NaN for n < 2)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = sum(v) / n
    if n < 2:
        return mean, math.nan, math.nan, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, sd, sd / math.sqrt(n), n


def band(se: float, n: int) -> float:
    """Half-width of the 95% interval of a mean over ``n`` seeds: ``t(0.975, n-1) * se`` (inf for n < 2)."""
    return t975(n - 1) * se if n >= 2 and math.isfinite(se) else math.inf


def interval(values: Sequence[float], floor: float = 0.0) -> tuple[float, float, float, int, float, float]:
    """``(mean, sd, se, n, lo, hi)``: the mean over seeds with its 95% t-interval ``[lo, hi]`` (±inf for n < 2).

    ``floor``: the least per-seed variance the measurement allows (the mean of the values' own measurement
    variances; 0 or NaN: none known). ``sd`` is then ``sqrt(max(sample variance, floor))``, the spread the interval
    used; :func:`floored` says whether the floor replaced the sample spread.
    """
    mean, sd, se, n = mean_sd_se(values)
    if floored(sd, floor) and n >= 2:
        sd = math.sqrt(floor)
        se = sd / math.sqrt(n)
    b = band(se, n)
    return mean, sd, se, n, mean - b, mean + b


def floored(sd: float, floor: float) -> bool:
    """Whether a sample ``sd`` over seeds lies below the measurement's own noise ``floor`` (a variance): the case
    where :func:`interval` widens to the floor (False when either is unknown)."""
    return math.isfinite(sd) and math.isfinite(floor) and floor > 0 and sd * sd < floor


def identical(sd: float, values: Sequence[float]) -> bool:
    """Whether seeds gave the same value, up to float rounding (sd within 1e-9 of the values' scale): a spread of 0
    that is no evidence of certainty (the runs may repeat each other)."""
    v = [abs(float(x)) for x in values if x is not None and math.isfinite(float(x))]
    return len(v) >= 2 and math.isfinite(sd) and sd <= 1e-9 * max(1.0, *v)


def binomial_variance(error: float, examples: float) -> float:
    """Variance of an error rate ``error`` (a fraction) counted on ``examples`` examples, as a fraction squared.

    The Agresti-Coull estimate (Agresti & Coull 1998): with ``k = error·m`` wrong of ``m``, centre
    ``p = (k + 2)/(m + 4)`` and variance ``p(1 - p)/(m + 4)``. The plain ``error(1 - error)/m`` is 0 for a run that
    makes no error (or only errors), exactly the quantised case where a floor is needed; adding two errors and two
    hits keeps it positive (0 wrong of 40: sd 3.1 points) and equals the plain variance to within O(1/m) otherwise.
    NaN when ``examples`` is unknown (None, 0) or ``error`` is not finite.
    """
    if examples is None or not examples > 0 or error is None or not math.isfinite(error):
        return math.nan
    m = float(examples) + 4
    p = (float(error) * float(examples) + 2) / m
    return p * (1 - p) / m


ABOVE, BELOW, STRADDLES = "above", "below", "straddles"


def versus_margin(lo: float, hi: float, margin: float) -> str:
    """Where a 95% interval ``[lo, hi]`` lies against ``margin``: ``above`` (lo > margin), ``below`` (hi < margin)
    or ``straddles``.

    This is THE equivalence standard of every claim: "differs by more than the margin" needs the whole interval
    above it, "does not differ by more than the margin" needs the whole interval below it (one side of a TOST), and
    an interval that contains the margin decides neither.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return STRADDLES
    if lo > margin:
        return ABOVE
    if hi < margin:
        return BELOW
    return STRADDLES


def seeds_to_decide(mean: float, sd: float, margin: float, most: int = 64) -> Optional[int]:
    """Seeds that would put an interval with this mean and sd wholly on one side of ``margin`` (None: more than
    ``most``, or no spread/mean to extrapolate from). A planning number, assuming the mean and sd stay as measured."""
    if not (math.isfinite(mean) and math.isfinite(sd)) or mean == margin:
        return None
    for n in range(2, most + 1):
        if t975(n - 1) * sd / math.sqrt(n) < abs(mean - margin):
            return n
    return None
