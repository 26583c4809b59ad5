"""Alerts of a study's training runs, found from its frame and losses by the detectors that
``attach(on_anomaly=...)`` runs live (:mod:`gradscope.engine.alerts`): the same rows, in step order, give the same
alerts, so a report can list them without the study watching each step. One difference: a live scope also knows
each block's learning rate (``update_band`` judges a warm-up at its base and names a decay in its note); the
frame does not record it, which the built-in studies, trained at one constant lr, do not need.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

from gradscope import schema as S
from gradscope.engine.alerts import AlertRules, Detector, Row

#: columns of a study's alerts table: the run, then :data:`gradscope.schema.ALERT_COLUMNS`
COLUMNS = (S.RUN,) + S.ALERT_COLUMNS


def study_alerts(frame: Any, losses: Any, rules: Optional[AlertRules] = None,
                 decay: Optional[Tuple[float, float, float]] = None):
    """One row per alert of each run of ``frame`` (training-phase rows: ``run``, frame columns) with the training
    loss of each step from ``losses`` (columns ``run, step, loss``); columns :data:`COLUMNS`.

    ``decay``: the study's SGD ``(lr, weight_decay, momentum)``; an update_band alert whose ratio is what weight
    decay alone gives (:func:`gradscope.engine.alerts.decay_only_ratio`) says so in its note."""
    import pandas as pd

    out: List[dict] = []
    runs = [] if frame is None or frame.empty else list(dict.fromkeys(frame[S.RUN]))
    loss_runs = [] if losses is None or losses.empty else list(dict.fromkeys(losses[S.RUN]))
    for run in dict.fromkeys(runs + loss_runs):
        rows = _rows(frame[frame[S.RUN] == run]) if run in runs else []
        run_losses = [] if run not in loss_runs else [
            (int(s), float(v)) for s, v in losses.loc[losses[S.RUN] == run, [S.STEP, "loss"]].itertuples(index=False)]
        detector = Detector(rules or AlertRules(), decay=decay)
        out.extend({S.RUN: run, **alert.as_dict()} for alert in detector.observe(rows, run_losses))
    table = pd.DataFrame(out, columns=list(COLUMNS))
    return table.astype({S.STEP: "int64", "value": "float64", "threshold": "float64"})


def _rows(frame: Any) -> List[Row]:
    """The rows a detector reads (gradient norms, update ratios, non-finite values) as its tuples, in step order."""
    value = frame[S.VALUE]
    wanted = frame[S.METRIC].isin([S.GRAD_NORM, S.UPDATE_RATIO]) | ~value.map(math.isfinite) | \
        ((frame[S.METRIC] == S.ACT_NONFINITE) & (value > 0))
    picked = frame[wanted].sort_values([S.STEP, S.DEPTH], kind="stable")
    return [(int(s), str(b), int(d), int(c), str(m), float(v)) for s, b, d, c, m, v in
            picked[[S.STEP, S.BLOCK, S.DEPTH, S.CALL, S.METRIC, S.VALUE]].itertuples(index=False)]
