"""Alerts: anomalies read from each recorded step's rows at ``scope.step()``, never inside a hook.

Four kinds (:data:`ALERT_KINDS`), each tested on the host values that the step's one transfer already brought back,
so detection costs no device synchronisation:

* ``loss_spike``: the loss (given as ``scope.step(loss=...)``) lies more than ``z`` robust standard deviations above
  the median of the last ``window`` recorded losses;
* ``grad_spike``: the same test on each block's ``grad_norm`` (call 0), in log space (gradient norms move by factors);
* ``update_band``: a block's ``update_ratio`` (||delta w|| / ||w|| of an optimizer step) leaves ``update_band``;
* ``divergence``: a NaN/Inf in an activation, a gradient, a parameter norm or the loss.

Robust z-score: ``z = (x - median(W)) / (1.4826 * MAD(W))`` over the window ``W`` of the values before ``x``
(1.4826 makes the MAD a standard deviation for normal noise; median and MAD ignore the few spikes the window
holds). The scale has a floor (``rel_floor`` of the median for the loss, the same fraction in log space for
gradients) so that a near-constant series does not turn a 1 % wobble into an alert. A spike needs ``warmup``
earlier values, and only upward moves count (a falling loss is training). Three guards keep ordinary training from
firing, each measured on healthy runs (``tests/engine/test_alert_noise.py``):

* a jump or a climb: to start an episode, the value must also rise above the largest of the last
  :data:`JUMP_SPAN` values by ``z / 2`` scales and by :data:`TAIL_MARGIN` times the :data:`TAIL_RANK`-th largest
  of the series' own earlier jumps (the last :data:`TAIL_MEMORY` steps: calm steps and one-step excursions, alerts
  among them; a lasting episode adds none), or, for a gradient, climb (:data:`CLIMB_STEPS` values in a row at least
  :data:`ELEVATED` times the median, the last the largest, :data:`CLIMB_FACTOR` times the median and
  :data:`CLIMB_GROWTH` times the first). A smooth rise tops its window at every step but never jumps; the losses of
  small batches are skewed and heavy-tailed (one hard example in a batch of 8 lifts its loss several-fold), so
  their jumps recur and raise the bar, while a fault seen fewer than :data:`TAIL_RANK` times in the memory still
  fires; an explosion that grows by a factor each step never jumps and is caught as a climb;
* a minimum size for gradient spikes (``min_factor`` times the window median): a gradient norm that rises
  smoothly by 10-40 % over a few steps early in training (a known phase, not a fault) tops a z of 6 in log space;
* ``update_band``'s low end reads each block's learning rate (:mod:`gradscope.engine.lrschedule`): judged at the
  base a torch scheduler records while the lr warms up toward it, not at all at an lr of 0 that was never above 0,
  as it is otherwise (a decay's note names the fraction of the peak), and only after ``band_patience`` recorded
  steps in a row below it: warm-up from 0 and the first steps of a hand-written warm-up are the schedule, not a
  block that learns too slowly. The high end fires at
  once (a step too large does its harm at once); at the first step of an Adam-type optimizer its note says that
  this step moves every weight by about lr whatever the gradient.

A value that is still anomalous continues its episode (an excursion lasting ten steps is one alert), whether or
not it tops the values before it.

Which block an alert names, "the block first affected": a fault that arises at block k during the forward pass
reaches every block after k, so a forward anomaly names the *earliest* anomalous block in forward order. Gradients
flow from the loss back to the input, so a gradient anomaly that arises at block k reaches every block before k: it
names the anomalous block *nearest the loss* (the latest in forward order). ``update_band`` names the earliest
block out of the band and lists the others. Each kind fires when an episode starts: a kind that was already
anomalous at the previous recorded step does not fire again until a recorded step is clean (a run that stays NaN
gives one divergence alert, not one per step).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

from gradscope import schema as S
from gradscope.engine.alertchecks import (DECAY_TOLERANCE, below_band, decay_only_ratio, divergence,
                                          update_band)
from gradscope.engine.alertkinds import (ANOMALY_POLICIES, LOSS, Alert, AlertRules, AnomalyError,
                                         OptimizerStep, Row, Told)
from gradscope.engine.spikes import (CLIMB_FACTOR, CLIMB_GROWTH, CLIMB_STEPS, ELEVATED, JUMP_SPAN,
                                     TAIL_MARGIN, TAIL_MEMORY, TAIL_RANK, Series, robust_z)
from gradscope.schema import ALERT_KINDS, DIVERGENCE, GRAD_SPIKE, LOSS_SPIKE, UPDATE_BAND

__all__ = ["ALERT_KINDS", "ANOMALY_POLICIES", "CLIMB_FACTOR", "CLIMB_GROWTH", "CLIMB_STEPS", "DECAY_TOLERANCE",
           "ELEVATED", "JUMP_SPAN", "LOSS", "TAIL_MARGIN", "TAIL_MEMORY", "TAIL_RANK", "Alert", "AlertRules",
           "AnomalyError", "Detector", "OptimizerStep", "Row", "Series", "Told", "below_band", "decay_only_ratio",
           "divergence", "robust_z", "update_band"]

class _Episode:
    """Per kind: was the previous recorded step anomalous? A kind fires only when an episode starts."""

    def __init__(self) -> None:
        self.step = -1
        self.bad = False
        self.prev_bad = False

    def start(self, step: int, bad: bool) -> bool:
        """Note ``step``'s state; True when it is anomalous, the step before it was not, and it has not fired yet.

        Steps arrive in order for each kind; rows of a step older than the latest one start no episode.
        """
        if step < self.step:
            return False
        if step > self.step:
            self.prev_bad, self.step, self.bad = self.bad, step, False
        fired_already = self.bad
        self.bad = self.bad or bad
        return bad and not self.prev_bad and not fired_already


class Detector:
    """Turns recorded rows (and losses) into :class:`Alert` objects, one recorded step at a time."""

    def __init__(self, rules: AlertRules = AlertRules(), gradients_may_overflow: bool = False,
                 decay: Optional[Tuple[float, float, float]] = None) -> None:
        self.rules = rules
        #: the SGD optimizer's (lr, weight_decay, momentum): update_band alerts say when weight decay alone explains
        #: the update ratio (:func:`decay_only_ratio`)
        self.decay = decay
        #: a GradScaler is in use: gradients that overflow are its skipped steps, not a divergence
        self.gradients_may_overflow = gradients_may_overflow
        self._loss = Series(rules.window)
        self._grad: Dict[str, Series] = {}
        self._low_since: Dict[str, int] = {}  # block -> first recorded step of its current run below the band
        self._low_runs: Dict[str, int] = {}  # block -> recorded steps in that run
        self._band_open: Optional[Alert] = None  # the update_band alert of the episode going on, if one
        self._told: Dict[int, Told] = {}  # recorded step -> what its optimizer steps were told (kept a few steps)
        self._episodes: Dict[str, _Episode] = {k: _Episode() for k in ALERT_KINDS}

    def observe(self, rows: Iterable[Row], losses: Iterable[Tuple[int, float]] = (),
                optimizer_steps: Optional[Dict[int, Told]] = None) -> List[Alert]:
        """The alerts that rows just transferred (of one or more steps, in step order) and losses raise.
        ``optimizer_steps``: per recorded step, what each block's optimizer step was told (its lr), where known."""
        by_step: Dict[int, List[Row]] = {}
        for row in rows:
            by_step.setdefault(row[0], []).append(row)
        loss_of = dict(losses)
        # what an optimizer step was told is known at its pre-hook, its update_ratio rows only after its post-hook:
        # when the step's closure (Lightning, LBFGS) closes the recorded step in between, they come a flush apart
        told = self._told
        told.update(optimizer_steps or {})
        alerts: List[Alert] = []
        steps = sorted(set(by_step) | set(loss_of))
        for step in steps:
            alerts.extend(self._observe_step(step, by_step.get(step, []), loss_of.get(step), told.get(step)))
        if steps:
            for old in [s for s in told if s < steps[-1] - _TOLD_KEPT]:
                del told[old]
        return alerts

    def _observe_step(self, step: int, rows: List[Row], loss: Optional[float],
                      told: Optional[Told] = None) -> List[Alert]:
        kinds, found = self.rules.kinds, []
        checks = ((DIVERGENCE, lambda: divergence(step, rows, loss, not self.gradients_may_overflow)),
                  (LOSS_SPIKE, lambda: self._loss_spike(step, loss)),
                  (GRAD_SPIKE, lambda: self._grad_spike(step, rows)),
                  (UPDATE_BAND, lambda: self._update_band(step, rows, told)))
        present = {r[4] for r in rows}
        for kind, check in checks:
            if kind not in kinds or (kind == LOSS_SPIKE and loss is None):
                continue
            if kind in _METRIC_OF and _METRIC_OF[kind] not in present:
                continue
            alert = check()
            if self._episodes[kind].start(step, alert is not None):
                found.append(alert)
        return found

    def _loss_spike(self, step: int, loss: Optional[float]) -> Optional[Alert]:
        if loss is None or not math.isfinite(loss):
            return None
        return self._spike(step, self._loss, loss, loss, None, LOSS, LOSS_SPIKE, relative=True)

    def _grad_spike(self, step: int, rows: List[Row]) -> Optional[Alert]:
        """The spiking block nearest the loss (largest depth), with every other spiking block in ``others``."""
        spikes: List[Tuple[int, Alert]] = []
        for _, block, depth, call, metric, value in rows:
            if metric != S.GRAD_NORM or call != 0 or not (math.isfinite(value) and value > 0):
                continue
            series = self._grad.get(block)
            if series is None:
                series = self._grad[block] = Series(self.rules.window)
            alert = self._spike(step, series, math.log(value), value, block, S.GRAD_NORM, GRAD_SPIKE,
                                relative=False)
            if alert is not None:
                spikes.append((depth, alert))
        if not spikes:
            return None
        spikes.sort(key=lambda item: -item[0])
        first = spikes[0][1]
        return Alert(step, GRAD_SPIKE, first.block, first.metric, first.value, first.threshold,
                     tuple(a.block for _, a in spikes[1:]))

    def _spike(self, step: int, series: Series, x: float, value: float, block: Optional[str], metric: str,
               kind: str, relative: bool) -> Optional[Alert]:
        """An alert when ``x`` (``value``, or its log when not ``relative``) starts or continues a spike of
        ``series`` (:meth:`gradscope.engine.spikes.Series.test`)."""
        bound = series.test(x, self.rules, relative)
        if bound is None:
            return None
        return Alert(step, kind, block, metric, value, bound if relative else math.exp(bound))

    def _update_band(self, step: int, rows: List[Row], told: Optional[Told]) -> Optional[Alert]:
        """:func:`update_band`, with the low end confirmed over ``band_patience`` recorded steps per block."""
        band = self.rules.update_band
        if band is None:
            return None
        below = set(below_band(rows, band, told))
        measured = {r[1] for r in rows if r[4] == S.UPDATE_RATIO}  # a block without a row this step keeps its run
        for block in list(self._low_runs):
            if block in measured and block not in below:
                del self._low_runs[block], self._low_since[block]
        for block in below:
            self._low_since.setdefault(block, step)
            self._low_runs[block] = self._low_runs.get(block, 0) + 1
        patience = self.rules.band_patience
        confirmed = {b: self._low_since[b] for b in below if self._low_runs[b] >= patience}
        decay = decay_only_ratio(*self.decay, step=step) if self.decay else None
        found = update_band(step, rows, band, decay, told, confirmed)
        if found is None and any(n >= patience and b not in measured for b, n in self._low_runs.items()):
            return self._band_open  # a block still below the band took no step now: its episode goes on
        self._band_open = found
        return found


_METRIC_OF = {GRAD_SPIKE: S.GRAD_NORM, UPDATE_BAND: S.UPDATE_RATIO}
#: recorded steps before the latest one whose optimizer information a detector keeps for rows that come late
_TOLD_KEPT = 4
