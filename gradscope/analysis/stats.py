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

import functools
import math
from typing import Optional, Sequence

# ---- Student's t (no scipy: the regularised incomplete beta by its continued fraction) ------------------------
def _betacf(a: float, b: float, x: float) -> float:
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on :func:`t_cdf`; 1e-10 accurate)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q={q} is not in (0, 1)")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=None)
def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (inf for df < 1), from
    :func:`t_quantile`. Before, a three-decimal table stopped at df 30 and 1.96 stood for every df above it: 1-4%
    too narrow (t(0.975, 38) is 2.024), so a deep net's verdict interval could clear a cut the exact interval
    straddles."""
    if df < 1:
        return math.inf
    return t_quantile(0.975, df)


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
