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
earlier values, and only upward moves count (a falling loss is training); a spike must also top every value in its
window, a cheap first test that spares the median of most steps.

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
from collections import deque
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

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
    """

    window: int = 20
    z: float = 6.0
    warmup: int = 10
    update_band: Optional[Tuple[float, float]] = (1e-5, 1e-1)
    rel_floor: float = 0.02
    kinds: Tuple[str, ...] = ALERT_KINDS

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
    med = median(history)
    mad = median(abs(h - med) for h in history)
    floor = rel_floor * abs(med) if relative else rel_floor
    scale = max(_MAD_TO_SD * mad, floor, 1e-12)
    return (x - med) / scale, med, scale


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
        self._loss: Deque[float] = deque(maxlen=rules.window)
        self._grad: Dict[str, Deque[float]] = {}
        self._episodes: Dict[str, _Episode] = {k: _Episode() for k in ALERT_KINDS}

    def observe(self, rows: Iterable[Row], losses: Iterable[Tuple[int, float]] = ()) -> List[Alert]:
        """The alerts that rows just transferred (of one or more steps, in step order) and losses raise."""
        by_step: Dict[int, List[Row]] = {}
        for row in rows:
            by_step.setdefault(row[0], []).append(row)
        loss_of = dict(losses)
        alerts: List[Alert] = []
        for step in sorted(set(by_step) | set(loss_of)):
            alerts.extend(self._observe_step(step, by_step.get(step, []), loss_of.get(step)))
        return alerts

    def _observe_step(self, step: int, rows: List[Row], loss: Optional[float]) -> List[Alert]:
        kinds, found = self.rules.kinds, []
        checks = ((DIVERGENCE, lambda: divergence(step, rows, loss, not self.gradients_may_overflow)),
                  (LOSS_SPIKE, lambda: self._loss_spike(step, loss)),
                  (GRAD_SPIKE, lambda: self._grad_spike(step, rows)),
                  (UPDATE_BAND, lambda: update_band(step, rows, self.rules.update_band,
                                                    decay_only_ratio(*self.decay, step=step) if self.decay else None)))
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
        alert = self._spike(step, self._loss, loss, loss, None, LOSS, LOSS_SPIKE, relative=True)
        self._loss.append(loss)
        return alert

    def _grad_spike(self, step: int, rows: List[Row]) -> Optional[Alert]:
        """The spiking block nearest the loss (largest depth), with every other spiking block in ``others``."""
        spikes: List[Tuple[int, Alert]] = []
        for _, block, depth, call, metric, value in rows:
            if metric != S.GRAD_NORM or call != 0 or not (math.isfinite(value) and value > 0):
                continue
            history = self._grad.get(block)
            if history is None:
                history = self._grad[block] = deque(maxlen=self.rules.window)
            alert = self._spike(step, history, math.log(value), value, block, S.GRAD_NORM, GRAD_SPIKE,
                                relative=False)
            history.append(math.log(value))
            if alert is not None:
                spikes.append((depth, alert))
        if not spikes:
            return None
        spikes.sort(key=lambda item: -item[0])
        first = spikes[0][1]
        return Alert(step, GRAD_SPIKE, first.block, first.metric, first.value, first.threshold,
                     tuple(a.block for _, a in spikes[1:]))

    def _spike(self, step: int, history: Deque[float], x: float, value: float, block: Optional[str], metric: str,
               kind: str, relative: bool) -> Optional[Alert]:
        """An alert when ``x`` (``value``, or its log when not ``relative``) is a spike against ``history``."""
        if len(history) < self.rules.warmup or x <= max(history):  # a spike tops its window (cheap test first)
            return None
        z, med, scale = robust_z(list(history), x, self.rules.rel_floor, relative)
        if z <= self.rules.z:
            return None
        bound = med + self.rules.z * scale
        return Alert(step, kind, block, metric, value, bound if relative else math.exp(bound))


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


def update_band(step: int, rows: List[Row], band: Optional[Tuple[float, float]],
                decay_ratio: Optional[float] = None) -> Optional[Alert]:
    """The earliest block (forward order) whose ``update_ratio`` lies outside ``band``; the others in ``others``.

    A ratio of exactly 0 is a block the optimizer did not move at all (no gradient reached it: an expert that got no
    token, the layer in front of a zero-initialised one at the first step, a frozen layer), not one that learns too
    slowly: it is out of band only when no block moved in that step (a learning rate of 0). A block whose parameters
    were all zero before the step has no ratio (see ``gradscope.engine.spec.ratios``).

    ``decay_ratio`` (:func:`decay_only_ratio`): when the ratio equals it, the alert's ``note`` says that the
    gradient contributes nothing and weight decay drives the update.
    """
    if band is None:
        return None
    low, high = band
    ratios = [(depth, block, value) for _, block, depth, _, metric, value in rows
              if metric == S.UPDATE_RATIO and math.isfinite(value)]
    moved = any(value > 0 for _, _, value in ratios)
    out = sorted((depth, block, value) for depth, block, value in ratios
                 if not (low <= value <= high) and (value != 0 or not moved))
    if not out:
        return None
    _, block, value = out[0]
    return Alert(step, UPDATE_BAND, block, S.UPDATE_RATIO, value, low if value < low else high,
                 tuple(b for _, b, _ in out[1:]), note=_decay_note(value, decay_ratio))


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
