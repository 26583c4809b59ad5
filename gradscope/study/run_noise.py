"""Each run's own measurement noise, the floor under a training claim's spread over seeds.

A run's final value is a measurement, not a fact about the net: a final *error* is a count of mistakes on a known
number of examples (a binomial estimate), a final *loss* a mean of a few mini-batch losses. Two or three seeds can
agree more closely than that noise allows (quantised errors on a small test set give identical values, sd 0), and a
t-interval built on such a spread would decide with certainty it does not have. :class:`Noise` holds each run's
measurement variance so that :mod:`gradscope.study.training_claims` can floor the per-seed variance at it
(:func:`gradscope.analysis.stats.interval`, rule ``max(sample variance, floor)``):

* **errors** (:func:`binomial_noise`): the Agresti-Coull binomial variance of the error on its number of examples
  (the training error window: iterations × mini-batch size; the test error: the test set size);
* **losses** (:func:`batch_noise`): the squared standard error of the mean of the last ``window`` mini-batch
  losses, ``var(losses, ddof=1) / window``, the batch-to-batch noise of that mean.

A paired gap (deep minus shallow of one seed) adds the two runs' variances. Runs of one seed share their batches and
the test set, so their measurement errors are positively correlated and the true variance of the gap is smaller:
adding errs on the wide side, as a floor should.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

from gradscope import schema as S
from gradscope.analysis import stats

BINOMIAL, BATCHES = "binomial", "batches"


@dataclass(frozen=True)
class Noise:
    """Per run: the measurement variance of its final value (the quantity's unit squared: points² or nats²) and how
    many examples (:data:`BINOMIAL`) or mini-batch steps (:data:`BATCHES`) that value is a mean over. A run that is
    missing has unknown noise."""

    variance: Dict[str, float] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)
    kind: str = BINOMIAL

    def floor(self, groups: Sequence[Sequence[str]]) -> float:
        """The per-seed variance floor of a quantity that adds or subtracts the runs of each group (one group per
        seed: ``[run]`` for a run's own value, ``[deep, shallow]`` for a paired gap): the mean over groups of the
        sum of their runs' variances. NaN when any run's noise is unknown, or there is no group."""
        sums = []
        for runs in groups:
            v = [self.variance.get(r, math.nan) for r in runs]
            if not runs or not all(math.isfinite(x) for x in v):
                return math.nan
            sums.append(sum(v))
        return sum(sums) / len(sums) if sums else math.nan

    def words(self, runs: Sequence[str]) -> str:
        """``the binomial noise of 2,560 examples per run`` / ``the batch-to-batch noise of each run's last 20
        steps``: what the floor is, for an evidence line."""
        counts = sorted({self.counts[r] for r in runs if r in self.counts})
        if not counts:
            how_many = "its"
        else:
            how_many = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} to {counts[-1]:,}"
        if self.kind == BINOMIAL:
            return f"the binomial noise of {how_many} examples per run"
        return f"the batch-to-batch noise of each run's last {how_many} steps"


def binomial_noise(errors: Dict[str, float], examples: Dict[str, int]) -> Noise:
    """The noise of final errors in **percent** (``errors``: run -> %), each counted on ``examples[run]`` examples:
    ``10⁴ × binomial_variance`` in points². Runs without a count, or with a NaN error, have unknown noise."""
    variance, counts = {}, {}
    for run, err in errors.items():
        m = examples.get(run)
        v = stats.binomial_variance(err / 100, m) if m else math.nan
        if math.isfinite(v):
            variance[run], counts[run] = 1e4 * v, int(m)
    return Noise(variance, counts, BINOMIAL)


def batch_noise(losses: Any, runs: Sequence[str], window: int) -> Noise:
    """The noise of each run's final loss, the mean of its last ``window`` mini-batch losses (the study's loss
    table): ``var(last losses, ddof=1) / count`` in nats². Unknown for a run with fewer than two finite losses in the
    window or a non-finite one (a diverged run has no final loss)."""
    variance, counts = {}, {}
    for run in runs:
        rows = losses[losses[S.RUN] == run].sort_values(S.STEP)
        tail = [float(x) for x in rows["loss"].tail(window)]
        if len(tail) < 2 or not all(math.isfinite(x) for x in tail):
            continue
        mean = sum(tail) / len(tail)
        variance[run] = sum((x - mean) ** 2 for x in tail) / (len(tail) - 1) / len(tail)
        counts[run] = len(tail)
    return Noise(variance, counts, BATCHES)
