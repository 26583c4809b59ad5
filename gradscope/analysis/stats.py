"""The one noise rule every claim and agreement uses: Student's t at 95%, two-sided.

A difference is *inside the noise* when ``|mean| <= t(0.975, n-1) * SE`` with ``SE = sd / sqrt(n)`` over seeds
(ddof 1). With one seed there is no spread to estimate, so nothing is decided from it.
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


def interval(values: Sequence[float]) -> tuple[float, float, float, int, float, float]:
    """``(mean, sd, se, n, lo, hi)``: the mean over seeds with its 95% t-interval ``[lo, hi]`` (±inf for n < 2)."""
    mean, sd, se, n = mean_sd_se(values)
    b = band(se, n)
    return mean, sd, se, n, mean - b, mean + b


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
