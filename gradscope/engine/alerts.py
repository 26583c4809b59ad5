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
* ``update_band``'s low end is read at the schedule's reference learning rate (the ratio times
  ``initial_lr / lr`` where a torch scheduler set ``initial_lr``, else times the largest lr so far / lr), not at
  all at lr 0, and only after ``band_patience`` recorded steps in a row below it: warm-up from 0, a cosine tail
  and a step of a hand-written warm-up are the schedule, not a block that learns too slowly. The high end fires at
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

import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from gradscope import schema as S
from gradscope.errors import GradscopeError

from gradscope.schema import ALERT_KINDS, DIVERGENCE, GRAD_SPIKE, LOSS_SPIKE, UPDATE_BAND

ANOMALY_POLICIES = ("warn", "raise")
#: the metric name an alert on the loss carries
LOSS = "loss"
_MAD_TO_SD = 1.4826

#: a recorded value as the detector sees it: (step, block name, forward depth, call, metric, value)
Row = Tuple[int, str, int, int, str, float]


class AnomalyError(GradscopeError, FloatingPointError):
    """Raised by ``Scope.step()`` under ``on_anomaly="raise"``, after the step's records and alerts are kept."""


@dataclass(frozen=True)
class Alert:
    """One anomaly: where (``step``, ``block``), what (``kind``, ``metric``) and by how much.

    ``block`` is ``None`` for the loss. ``threshold`` is the bound that ``value`` crossed, in the value's units (for a
    spike: ``median + z * scale``, back in linear units for gradients; for the band: its low or high end; for a
    divergence: ``inf``). ``others`` lists further blocks affected at the same step. ``note``: the diagnosis in
    words where the numbers tell it (an update ratio that weight decay alone explains).
    """

    step: int
    kind: str
    block: Optional[str]
    metric: str
    value: float
    threshold: float
    others: Tuple[str, ...] = ()
    #: a divergence: the operator and module that made the first NaN/Inf (``"aten.log in '3.act'"``), when traced
    origin: str = ""
    #: the diagnosis in words, where the numbers tell it (weight decay alone drives an update_band block)
    note: str = ""

    def __str__(self) -> str:
        where = "the loss" if self.block is None else f"block {self.block!r}"
        more = f" (and {len(self.others)} more: {', '.join(self.others[:3])}{', ...' if len(self.others) > 3 else ''})" \
            if self.others else ""
        made = f"; made by {self.origin}" if self.origin else ""
        return (f"gradscope alert: {self.kind} at step {self.step}, {where}{more}: {self.metric} = {self.value:.4g} "
                f"{_relation(self)} {self.threshold:.4g}{made}" + (f"; {self.note}" if self.note else ""))

    def as_dict(self) -> Dict[str, object]:
        """A flat dict (``others`` joined by spaces) for a table row."""
        row = asdict(self)
        row["others"] = " ".join(self.others)
        return row


def _relation(alert: Alert) -> str:
    if alert.kind == DIVERGENCE:
        return "(non-finite), threshold"
    return "below" if alert.value < alert.threshold else "above"


@dataclass(frozen=True)
class AlertRules:
    """Thresholds of the detectors (see the module docstring).

    Args:
        window: recorded steps in the running window of a spike test.
        z: robust z-score above which a value is a spike.
        warmup: earlier values a spike test needs before it can fire.
        update_band: ``(low, high)`` for ``update_ratio``; ``None`` turns the band test off.
        rel_floor: the scale's floor, as a fraction of the median (loss) or in log space (gradients).
        kinds: the kinds to detect (default all of :data:`ALERT_KINDS`); ``()`` turns detection off.
        min_factor: a gradient spike is also at least this many times its window's median (1 turns it off).
        band_patience: recorded steps in a row a block's update ratio must stay below the band before it is
            reported (the high end needs one).
    """

    window: int = 20
    z: float = 6.0
    warmup: int = 10
    update_band: Optional[Tuple[float, float]] = (1e-5, 1e-1)
    rel_floor: float = 0.02
    kinds: Tuple[str, ...] = ALERT_KINDS
    min_factor: float = 1.5
    band_patience: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 3:
            raise GradscopeError(f"AlertRules(window={self.window!r}): use an integer >= 3")
        if not (isinstance(self.warmup, int) and 3 <= self.warmup <= self.window):
            raise GradscopeError(f"AlertRules(warmup={self.warmup!r}): use an integer between 3 and window")
        if not (isinstance(self.z, (int, float)) and self.z > 0):
            raise GradscopeError(f"AlertRules(z={self.z!r}): use a positive number (6 is a clear outlier)")
        band = self.update_band
        if band is not None and not (len(band) == 2 and 0 <= band[0] < band[1]):
            raise GradscopeError(f"AlertRules(update_band={band!r}): use (low, high) with 0 <= low < high, or None")
        if not (isinstance(self.min_factor, (int, float)) and self.min_factor >= 1):
            raise GradscopeError(f"AlertRules(min_factor={self.min_factor!r}): use a number >= 1 (1 turns it off)")
        if not (isinstance(self.band_patience, int) and self.band_patience >= 1):
            raise GradscopeError(f"AlertRules(band_patience={self.band_patience!r}): use an integer >= 1")
        unknown = [k for k in self.kinds if k not in ALERT_KINDS]
        if unknown:
            raise GradscopeError(f"AlertRules(kinds={list(self.kinds)!r}): unknown {unknown}; "
                                 f"choose from {list(ALERT_KINDS)}")


def robust_z(history: Sequence[float], x: float, rel_floor: float,
             relative: bool = True) -> Tuple[float, float, float]:
    """``(z, median, scale)``: the robust z-score of ``x`` against ``history``, and what it was computed from.

    ``scale = 1.4826 * MAD(history)``, at least ``rel_floor * |median|`` (``relative``) or ``rel_floor`` (a log-space
    series, whose differences are already relative). ``median + z_max * scale`` is the bound ``x`` is tested against.
    """
    med = _median(sorted(history))
    mad = _median(sorted(abs(h - med) for h in history))
    floor = rel_floor * abs(med) if relative else rel_floor
    scale = max(_MAD_TO_SD * mad, floor, 1e-12)
    return (x - med) / scale, med, scale


def _median(ordered: Sequence[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


#: one-step jumps a series keeps to learn its own noise (read once it holds ``warmup`` of them)
TAIL_MEMORY = 200
#: a spike starts with a jump over the largest of this many previous values (see ``Detector._spike``)
JUMP_SPAN = 3
#: "elevated": this many times the window's median (a climb's values; an episode goes on while its values are)
ELEVATED = 1.5
#: a gradient's climb: this many elevated values in a row, the last the largest of them, this many times the median
#: and this many times the first of them (see ``Detector._spike``)
CLIMB_STEPS, CLIMB_FACTOR, CLIMB_GROWTH = 4, 3.0, 1.5
#: a spike must jump this many times the ``TAIL_RANK``-th largest of the series' own earlier jumps
TAIL_MARGIN, TAIL_RANK = 2.0, 5


class _Series:
    """One watched series (the loss, or one block's log gradient norm): its window and the z-scores seen so far."""

    __slots__ = ("window", "jumps", "high", "climb", "pending")

    def __init__(self, window: int) -> None:
        self.window: Deque[float] = deque(maxlen=window)
        #: earlier one-step jumps of calm steps and lone excursions: relative to the window's median (the loss), in
        #: log units (gradients)
        self.jumps: Deque[float] = deque(maxlen=TAIL_MEMORY)
        self.high = False  # the latest value was a spike (started or continued one)
        self.climb = 0  # elevated values in a row (ELEVATED times the window's median)
        self.pending: Optional[float] = None  # the jump of a one-step excursion, kept once the next step is calm

    def calm(self, jump: float) -> None:
        """A value at or below the level: the excursion before it (if one) was a lone one, part of the noise."""
        if self.pending is not None:
            self.jumps.append(self.pending)
        self.jumps.append(jump)
        self.pending, self.high = None, False

    def bar(self, least_jump: float, least_count: int) -> float:
        """The jump a spike must start with: ``least_jump``, or more where the series' own jumps are larger (read
        once it holds ``least_count`` of them)."""
        if len(self.jumps) < least_count:
            return least_jump
        return max(least_jump, TAIL_MARGIN * heapq.nlargest(TAIL_RANK, self.jumps)[-1])


@dataclass(frozen=True)
class OptimizerStep:
    """What a block's optimizer step in a recorded step was told (:mod:`gradscope.engine.lrschedule`): for
    ``update_band``.

    ``lr``: its parameter group's learning rate. ``lr_scale``: the lr over the base its scheduler records while it
    warms up toward it (the low end is then judged at the base), 1 otherwise, 0 at lr 0 (not judged).
    ``first_adaptive``: the first step of an Adam, AdamW or Adamax (its update is about ``lr`` per weight).
    ``of_peak``: the lr over the largest it has been so far (a decaying schedule says so in the note).
    """

    lr: float
    lr_scale: float
    first_adaptive: bool = False
    of_peak: float = 1.0


#: what a detector is told per recorded step: block name -> its optimizer step (a dict, or the lazily resolved
#: :class:`gradscope.engine.lrschedule.BlockSteps`: ``get``, ``in`` and ``[]`` are all it reads)
Told = Mapping[str, OptimizerStep]


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
        self._loss = _Series(rules.window)
        self._grad: Dict[str, _Series] = {}
        self._low_since: Dict[str, int] = {}  # block -> first recorded step of its current run below the band
        self._low_runs: Dict[str, int] = {}  # block -> recorded steps in that run
        self._band_open: Optional[Alert] = None  # the update_band alert of the episode going on, if one
        self._episodes: Dict[str, _Episode] = {k: _Episode() for k in ALERT_KINDS}

    def observe(self, rows: Iterable[Row], losses: Iterable[Tuple[int, float]] = (),
                optimizer_steps: Optional[Dict[int, Told]] = None) -> List[Alert]:
        """The alerts that rows just transferred (of one or more steps, in step order) and losses raise.
        ``optimizer_steps``: per recorded step, what each block's optimizer step was told (its lr), where known."""
        by_step: Dict[int, List[Row]] = {}
        for row in rows:
            by_step.setdefault(row[0], []).append(row)
        loss_of = dict(losses)
        told = optimizer_steps or {}
        alerts: List[Alert] = []
        for step in sorted(set(by_step) | set(loss_of)):
            alerts.extend(self._observe_step(step, by_step.get(step, []), loss_of.get(step), told.get(step)))
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
                series = self._grad[block] = _Series(self.rules.window)
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

    def _spike(self, step: int, series: _Series, x: float, value: float, block: Optional[str], metric: str,
               kind: str, relative: bool) -> Optional[Alert]:
        """An alert when ``x`` (``value``, or its log when not ``relative``) starts or continues a spike.

        The level first: ``x`` more than ``z`` robust standard deviations above the window's median (and, for a
        gradient, ``min_factor`` times it). Above it, an episode starts with either

        * a jump: ``x`` above the largest of the last :data:`JUMP_SPAN` values by ``z / 2`` scales, and by
          :data:`TAIL_MARGIN` times the :data:`TAIL_RANK`-th largest of the series' own earlier jumps (its noise: the
          jumps of calm steps, and of excursions above the level that lasted one step, alerts among them; a jump
          that recurs that often is the series' own), or
        * for a gradient, a climb, whatever the level: :data:`CLIMB_STEPS` values in a row at least
          :data:`ELEVATED` times their window's median, the last the largest of them, :data:`CLIMB_FACTOR` times its median and
          :data:`CLIMB_GROWTH` times the first (an explosion that grows by a factor each step never jumps, and widens
          the window's spread, so its level runs away from it).

        A smooth rise of a few percent a step stays below both; the batches of a heavy-tailed loss jump often but
        alone, which raises the bar. While the value stays above the level, or :data:`ELEVATED` times the median, the
        episode goes on."""
        history, rules = series.window, self.rules
        if len(history) < rules.warmup:
            history.append(x)
            return None
        recent = max(history[-1], history[-2], history[-3])  # the last JUMP_SPAN values
        if not relative and x <= min(history) + math.log(min(rules.min_factor, ELEVATED)):
            # below every bound (the median is at least the window's least value): the common case, no median
            series.calm(x - recent)
            series.climb = 0
            history.append(x)
            return None
        _, med, scale = robust_z(history, x, rules.rel_floor, relative)
        earlier = list(history)
        history.append(x)
        level = max(med + rules.z * scale, med if relative else med + math.log(rules.min_factor))
        raised = med + math.log(ELEVATED) if not relative else (med * ELEVATED if med > 0 else math.inf)
        series.climb = series.climb + 1 if x >= raised else 0
        climb_bound = med + math.log(CLIMB_FACTOR)
        run = earlier[len(earlier) - series.climb + 1:]  # the values before x in its run of elevated values
        climbing = not relative and series.climb >= CLIMB_STEPS and x >= climb_bound and \
            all(x >= h for h in run) and x - run[0] >= math.log(CLIMB_GROWTH)
        unit = max(abs(med), scale) if relative else 1.0  # jumps are kept relative to the loss, in log units else
        jump = (x - recent) / unit
        if series.high and (x > level or x >= raised):  # the episode goes on
            series.pending = None
            return Alert(step, kind, block, metric, value, level if relative else math.exp(level))
        if x <= level and not climbing:
            series.calm(jump)
            return None
        needed = series.bar(0.5 * rules.z * scale / unit, rules.warmup)
        if x > level and jump > needed:
            bound = max(level, recent + needed * unit)
        elif climbing:
            bound = climb_bound
        else:
            bound = None
        # a lone excursion above the level (the step after it calm), alert or not, joins the noise memory: one that
        # recurs (TAIL_RANK times in TAIL_MEMORY steps) is the series' own, not a fault
        series.pending = jump if series.climb <= 1 else None
        if bound is None:
            return None
        series.high = True
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


def decay_only_ratio(lr: float, weight_decay: float, momentum: float = 0.0,
                     step: Optional[int] = None) -> Optional[float]:
    """The update ratio ||delta w|| / ||w|| of SGD when the gradient is zero: weight decay alone moves w by
    ``lr * weight_decay * (1 - momentum**(step + 1)) / (1 - momentum)`` of its norm at optimizer step ``step``
    (0-based; the momentum buffer fills up), ``lr * weight_decay / (1 - momentum)`` in the steady state
    (``step=None``). None without weight decay."""
    if weight_decay <= 0 or lr <= 0 or not 0 <= momentum < 1:
        return None
    filled = 1.0 if step is None else 1.0 - momentum ** (step + 1)
    return lr * weight_decay * filled / (1.0 - momentum)


#: How close (relative) an update ratio must be to the weight-decay-only one for the note: float32 steps of 1e-6
#: of a weight's norm carry ~1% rounding (w - (w - 1e-6 w) in float32).
DECAY_TOLERANCE = 0.05


def _decay_note(value: float, decay_ratio: Optional[float]) -> str:
    """Words for an update ratio within :data:`DECAY_TOLERANCE` of the weight-decay-only ratio, else ``""``."""
    if not decay_ratio or not value > 0 or abs(math.log(value / decay_ratio)) > DECAY_TOLERANCE:
        return ""
    return (f"the update ratio equals what weight decay alone gives (lr x weight_decay / (1 - momentum) once the "
            f"momentum has filled up; {decay_ratio:.4g} at this step, within {DECAY_TOLERANCE:.0%}): the gradient "
            f"contributes nothing to this block's update, weight decay drives it")


def below_band(rows: List[Row], band: Tuple[float, float], told: Optional[Told] = None) -> List[str]:
    """Blocks whose ``update_ratio`` is below ``band``'s low end, each judged as its optimizer step was told
    (``told``, block -> :class:`OptimizerStep`): at the base lr while its schedule warms up (the ratio divided by
    ``lr_scale``), not at all at lr 0 (nothing was meant to move).

    A ratio of exactly 0 counts only when no block moved (a learning rate too small for float32 to apply moves
    nothing); while other blocks moved, it is a block the optimizer did not move (no gradient reached it: an expert
    that got no token, the layer in front of a zero-initialised one at the first step, a frozen layer)."""
    told = told or {}
    ratios = [(block, value) for _, block, _, _, metric, value in rows
              if metric == S.UPDATE_RATIO and math.isfinite(value)]
    moved = any(value > 0 for _, value in ratios)
    out = []
    for block, value in ratios:
        scale = told[block].lr_scale if block in told else 1.0
        if scale > 0 and value / scale < band[0] and (value != 0 or not moved):
            out.append(block)
    return out


def update_band(step: int, rows: List[Row], band: Optional[Tuple[float, float]],
                decay_ratio: Optional[float] = None, told: Optional[Told] = None,
                confirmed_low: Optional[Dict[str, int]] = None) -> Optional[Alert]:
    """The earliest block (forward order) whose ``update_ratio`` lies outside ``band``; the others in ``others``.

    Above the band counts at once; below it, the blocks of :func:`below_band`, or, when given, those in
    ``confirmed_low`` (block -> the first step of its run below the band, for blocks below it now;
    :class:`Detector` keeps them). A block whose parameters were all zero before the step has no ratio (see
    ``gradscope.engine.spec.ratios``). ``threshold`` is the bound the named block's ratio crossed: the low end times
    its ``lr_scale`` while its schedule warms up.

    The note says what the numbers explain: weight decay alone (``decay_ratio``, :func:`decay_only_ratio`), the
    first step of an Adam-type optimizer, a ratio judged at the schedule's base lr, an lr below its peak, a run
    below the band.
    """
    if band is None:
        return None
    low, high = band
    low_blocks = set(confirmed_low) if confirmed_low is not None else set(below_band(rows, band, told))
    out = sorted((depth, block, value) for _, block, depth, _, metric, value in rows
                 if metric == S.UPDATE_RATIO and math.isfinite(value) and (value > high or block in low_blocks))
    if not out:
        return None
    _, block, value = out[0]
    above = value > high
    mine = (told or {}).get(block)
    threshold = high if above else low * (mine.lr_scale if mine is not None and 0 < mine.lr_scale < 1 else 1.0)
    notes = [_decay_note(value, decay_ratio)]
    if above and mine is not None and mine.first_adaptive:
        notes.append(f"this is the first step of its Adam-type optimizer, which moves every weight with a gradient "
                     f"by about lr = {mine.lr:.3g} whatever the gradient's size (its bias correction makes the first "
                     f"update lr x sign(g)), so the ratio is about lr / rms(w); a learning-rate warm-up avoids it")
    if not above and mine is not None and 0 < mine.lr_scale < 1:
        notes.append(f"judged at the base learning rate its schedule warms up to: this step's lr is "
                     f"{mine.lr_scale:.3g} of it, and {value:.3g} / {mine.lr_scale:.3g} = "
                     f"{value / mine.lr_scale:.3g} is still below {low:g}")
    if not above and mine is not None and mine.of_peak < 1:
        notes.append(f"this step's lr ({mine.lr:.3g}) is {mine.of_peak:.3g} of the largest it has been: if the "
                     f"schedule decays it on purpose (a cosine or step tail), the block moving this little is what "
                     f"that schedule asks")
    if not above and confirmed_low and confirmed_low.get(block, step) < step:
        notes.append(f"below the band at every recorded step since step {confirmed_low[block]}")
    return Alert(step, UPDATE_BAND, block, S.UPDATE_RATIO, value, threshold,
                 tuple(b for _, b, _ in out[1:]), note="; ".join(n for n in notes if n))


def divergence(step: int, rows: List[Row], loss: Optional[float], gradients: bool = True) -> Optional[Alert]:
    """The first NaN/Inf of a step, in the order the step computed them: forward activations (earliest block),
    then the loss (finite activations and a non-finite loss: the NaN came from the loss or its targets, and the
    backward only carries it), then backward gradients (the block nearest the loss; at a block its output gradient
    before its input gradient), then parameter norms (earliest block).

    ``gradients=False`` (a GradScaler is in use) ignores non-finite gradients: an fp16 gradient that overflows is a
    step the scaler skips while it lowers the scale, and a real divergence still shows in the loss or activations.
    """
    isfinite = math.isfinite
    bad = [r for r in rows if (not isfinite(r[5]) and (gradients or r[4] not in _GRADIENT_METRICS))
           or (r[4] == S.ACT_NONFINITE and r[5] > 0)]
    if not bad and (loss is None or isfinite(loss)):
        return None
    rows = bad
    forward = sorted(((depth, metric != S.ACT_NONFINITE), block, metric, value)  # the count is the clearest value
                     for _, block, depth, _, metric, value in rows if _nonfinite_forward(metric, value))
    if forward:
        return _divergence_alert(step, forward)
    backward = sorted(((-depth, metric != S.GRAD_NORM), block, metric, value)
                      for _, block, depth, _, metric, value in rows
                      if metric in S.BACKWARD_METRICS and not math.isfinite(value))
    if loss is not None and not math.isfinite(loss):  # before the backward, which starts from it
        return Alert(step, DIVERGENCE, None, LOSS, loss, math.inf, tuple(dict.fromkeys(b for _, b, _, _ in backward)))
    if backward:
        return _divergence_alert(step, backward)
    params = sorted((depth, block, metric, value) for _, block, depth, _, metric, value in rows
                    if metric in S.PARAM_METRICS and not math.isfinite(value))
    if params:
        return _divergence_alert(step, params)
    return None


def _nonfinite_forward(metric: str, value: float) -> bool:
    if metric == S.ACT_NONFINITE:
        return value > 0
    return metric in S.FORWARD_METRICS and not math.isfinite(value)


def _divergence_alert(step: int, ordered: List[Tuple[Any, str, str, float]]) -> Alert:
    blocks: List[str] = []
    for _, block, _, _ in ordered:
        if block not in blocks:
            blocks.append(block)
    _, block, metric, value = ordered[0]
    return Alert(step, DIVERGENCE, block, metric, value, math.inf, tuple(blocks[1:]))


_GRADIENT_METRICS = frozenset(S.BACKWARD_METRICS + (S.PARAM_GRAD_NORM,))
