"""The alerts of one scope: detection at each flush, the user's handler, ``alerts.csv`` beside the records.

The rules themselves (what a spike, a band exit or a divergence is) live in :mod:`gradscope.engine.alerts`; this
module connects them to a scope: which recorded rows a detector reads, what ``attach(on_anomaly=...)`` does with an
alert, and where it is written.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from gradscope import schema as S
from gradscope.engine.alerts import ANOMALY_POLICIES, Alert, AlertRules, AnomalyError, Detector, Row, Told
from gradscope.errors import GradscopeError
from gradscope.schema import DIVERGENCE, UPDATE_BAND

Handler = Union[None, str, Callable[[Alert], object]]


def check_handler(on_anomaly: Handler) -> Handler:
    """Validate ``attach(on_anomaly=...)``: ``None``, ``"warn"``, ``"raise"`` or a callable taking an Alert."""
    if on_anomaly is None or callable(on_anomaly) or on_anomaly in ANOMALY_POLICIES:
        return on_anomaly
    raise GradscopeError(f"on_anomaly={on_anomaly!r}: use 'warn', 'raise', a function taking a gradscope Alert, "
                         f"or None (alerts are still kept: scope.alerts())")


class AlertLog:
    """The alerts of one scope: detection at each flush, the user's handler, the file beside the records.

    ``on_anomaly``: ``None`` keeps alerts silently (``scope.alerts()``, ``alerts.csv``); ``"warn"`` warns once per
    alert; ``"raise"`` makes the next ``scope.step()`` raise :class:`AnomalyError` (never ``frame()`` or
    ``detach()``, which must not lose rows); a callable receives each :class:`Alert` as it is found.
    """

    def __init__(self, rules: Optional[AlertRules], on_anomaly: Handler, out: Optional[Path] = None,
                 write_files: bool = True, gradients_may_overflow: bool = False) -> None:
        if rules is not None and not isinstance(rules, AlertRules):
            raise GradscopeError(f"alert_rules={rules!r}: pass gradscope.AlertRules(...) or None for the defaults")
        self.detector = Detector(rules or AlertRules(), gradients_may_overflow)
        self.handler = check_handler(on_anomaly)
        self.out = out if write_files else None
        self.alerts: List[Alert] = []
        self._pending: List[Alert] = []
        self.enabled = bool(self.detector.rules.kinds)  # AlertRules(kinds=()) turns detection off
        rules = self.detector.rules
        #: update_band is on: the optimizer hooks keep what each block's step was told (its lr)
        self.reads_lr = UPDATE_BAND in rules.kinds and rules.update_band is not None
        #: the traced origin of the first forward NaN (an ``OpOrigin``), set by the scope before each observe
        self.origin: Any = None

    def observe(self, rows: Iterable[Row], losses: Iterable[Tuple[int, float]] = (),
                optimizer_steps: Optional[Dict[int, Told]] = None) -> List[Alert]:
        """Detect on newly transferred rows and losses (and what the optimizer steps were told: their lr); write,
        tell and remember what is new."""
        new = self.detector.observe(rows, losses, optimizer_steps)
        if not new:
            return new
        new = [with_origin(a, self.origin) for a in new]
        self.alerts.extend(new)
        if self.out is not None:
            self.write()
        for alert in new:
            if callable(self.handler):
                self.handler(alert)
            elif self.handler == "warn":
                warnings.warn(str(alert), RuntimeWarning, stacklevel=4)
        if self.handler == "raise":
            self._pending.extend(new)
        return new

    def raise_pending(self) -> None:
        """Under ``on_anomaly="raise"``: raise :class:`AnomalyError` for the alerts found since the last call."""
        if self._pending:
            pending, self._pending = self._pending, []
            raise AnomalyError("; ".join(str(a) for a in pending))

    def rows(self) -> List[Dict[str, object]]:
        """Every alert so far as a flat dict (columns :data:`gradscope.schema.ALERT_COLUMNS`)."""
        return [a.as_dict() for a in self.alerts]

    def write(self) -> None:
        """Rewrite ``out/alerts.csv`` (atomically) with every alert so far."""
        from gradscope import store  # pandas loads only when an alert is written

        store.write_alerts(self.rows(), self.out)


def with_origin(alert: Alert, origin: Any) -> Alert:
    """A divergence alert at the step of a traced first NaN names its operator and module; where the replay found
    none, its ``note`` says why (a parameter already non-finite, the block's input already non-finite, ...)."""
    if alert.kind != DIVERGENCE or origin is None or origin.step != alert.step:
        return alert
    if getattr(origin, "op", None) is None:
        why = f"operator not found in block {origin.block!r}: {origin.note}" if origin.note else ""
        return replace(alert, note="; ".join(x for x in (alert.note, why) if x)) if why else alert
    note = "; ".join(x for x in (alert.note, origin.note) if x)
    return replace(alert, origin=f"{origin.op} in {origin.module!r}", note=note)


def detector_rows(rows: Any, start: int, sites: Sequence[Any], depth: Dict[int, int]) -> List[Row]:
    """The recorded rows from index ``start`` (the recorder's parallel lists) that a detector reads, as its tuples:
    gradient norms, update ratios and non-finite values (a healthy step's other rows matter to no detector)."""
    step, site, call, metric, value = rows.step, rows.site, rows.call, rows.metric, rows.value
    wanted, end = _READ, len(value)
    if math.isfinite(sum(value[start:end])):  # every value finite: only a count can still report a NaN/Inf
        picked = [i for i in range(start, end) if metric[i] in wanted
                  or (metric[i] == S.ACT_NONFINITE and value[i] > 0)]
    else:
        picked = [i for i in range(start, end) if metric[i] in wanted or not math.isfinite(value[i])
                  or (metric[i] == S.ACT_NONFINITE and value[i] > 0)]
    return [(step[i], sites[site[i]].name, depth.get(site[i], -1), call[i], metric[i], value[i]) for i in picked]


_READ = frozenset((S.GRAD_NORM, S.UPDATE_RATIO))
