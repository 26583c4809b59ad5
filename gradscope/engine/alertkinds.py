"""What an alert is: the :class:`Alert` record, the :class:`AlertRules` thresholds, the error ``on_anomaly="raise"``
raises, and what a detector reads (a recorded :data:`Row`, what each block's optimizer step was told). The rules
that find alerts live in :mod:`gradscope.engine.alerts` (the detector), :mod:`gradscope.engine.spikes` and
:mod:`gradscope.engine.alertchecks`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional, Tuple

from gradscope.errors import GradscopeError
from gradscope.schema import ALERT_KINDS, DIVERGENCE

ANOMALY_POLICIES = ("warn", "raise")
#: the metric name an alert on the loss carries
LOSS = "loss"

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


@dataclass(frozen=True)
class OptimizerStep:
    """What a block's optimizer step in a recorded step was told (:mod:`gradscope.engine.lrschedule`): for
    ``update_band``.

    ``lr``: its parameter group's learning rate. ``lr_scale``: the lr over the base its scheduler records while it
    warms up toward it (the low end is then judged at the base), 1 otherwise, 0 at an lr of 0 that was never above
    0 (not judged).
    ``first_adaptive``: the first step of an Adam, AdamW or Adamax (its update is about ``lr`` per weight).
    ``of_peak``: the lr over the largest it has been so far (a decaying schedule says so in the note).
    ``of_base``: the lr over the base its scheduler records, when below it and not warming up toward it (a flat
    lr under the base: a warm-up stepped per epoch, a resumed run after a decay; the note says so).
    """

    lr: float
    lr_scale: float
    first_adaptive: bool = False
    of_peak: float = 1.0
    of_base: float = 1.0


#: what a detector is told per recorded step: block name -> its optimizer step (a dict, or the lazily resolved
#: :class:`gradscope.engine.lrschedule.BlockSteps`: ``get``, ``in`` and ``[]`` are all it reads)
Told = Mapping[str, OptimizerStep]
