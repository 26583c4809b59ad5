"""Verdicts: how the forward signal and the backward gradient change across depth, as a plain DataFrame.

Pure functions from a frame (see :mod:`gradscope.schema`) to a frame; no torch, no plotting.

What is measured
----------------
Two signals per run, each read from one metric of the frame:

========== ========== ================================ =========================================
signal     metric     near end -> far end              direction of the per-block ``factor``
========== ========== ================================ =========================================
forward    act_var    first block -> last block        growth toward the output
backward   grad_norm  last block -> first block        growth toward the input
========== ========== ================================ =========================================

* **Rows used.** Only ``call == 0`` rows; every verdict reads one :class:`~gradscope.analysis.profiles.Profiles`
  pass over the frame (pass ``profiles=`` to share it between verdicts, agreement and figures).
* **Steps.** ``step="all"`` gives one row per recorded step (what a report shows for training),
  ``step=<int>``/``"first"``/``"last"`` one step, ``step=None`` one row per run from the geometric mean per block
  over all steps (meant for initialisation frames, whose batches are draws of one state).
* **Per-block factor.** A least-squares line through ``(position, ln value)`` over the blocks whose value is
  finite and positive; ``factor = exp(slope)`` (forward) or ``exp(-slope)`` (backward), with the line's ``r2``.
* **End to end** (``end_to_end``) is read from the fit, ``factor ** (positions spanned)``, so one moving end
  block does not decide it; ``near_value``/``far_value`` are the measured values at the two ends.
* **Units.** Ratios of the metric itself: of a *variance* forward, of a gradient *norm* (not squared) backward.

Verdict (column ``verdict``): by rate, so the same rate gives the same class at any depth
-------------------------------------------------------------------------------------------
``vanish``/``explode`` (defaults :data:`VANISH` = 0.01, :data:`EXPLODE` = 100) are the change over
:data:`REFERENCE_BLOCKS` = 27 blocks (the paper's 56-layer nets); the per-block thresholds are their 27th roots,
x0.843 and x1.186 (:func:`rate_thresholds`):

* ``diverged`` if a block held a non-finite value (``act_nonfinite > 0``, or a NaN/Inf ``act_var`` or
  ``grad_norm``) at that step (at any step for ``step=None``); such a signal is never ``healthy``;
* ``vanishing`` if ``factor`` < the lower threshold, or the signal is zero at every block or at the far end;
* ``exploding`` if ``factor`` > the upper threshold, or the near end is zero while the far end is not;
* ``healthy`` otherwise; ``unknown`` with fewer than two blocks holding a value.

Layout (long format)
--------------------
One row per run x signal (x step), columns :data:`VERDICT_COLUMNS` then the run's config columns when the frame
has them. Frames without a ``run`` column are one run named :data:`DEFAULT_RUN`. The theory columns
(``predicted_factor, measured_factor, agreement, agrees, reference, theory_note``) are filled by
:mod:`gradscope.agreement`, for initialisation frames only.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope.analysis import text as _text
from gradscope.analysis.profiles import (DEFAULT_RUN, POSITION, Fit, Profiles, StepArg, check_frame,
                                         combine_steps, fit_log_slope, profile, profile_pass, run_names,
                                         select_step, steps_of, with_run)
from gradscope.errors import DataError

#: Default thresholds: the change over :data:`REFERENCE_BLOCKS` blocks that counts as vanishing / exploding.
VANISH = 0.01
EXPLODE = 100.0
#: Blocks over which ``vanish``/``explode`` are defined: 27, the blocks of the paper's 56-layer nets.
REFERENCE_BLOCKS = 27

FORWARD, BACKWARD = "forward", "backward"
#: signal -> (metric, direction word used in sentences)
SIGNALS = {FORWARD: (S.ACT_VAR, "toward the output"), BACKWARD: (S.GRAD_NORM, "toward the input")}

VANISHING, HEALTHY, EXPLODING, UNKNOWN, DIVERGED = "vanishing", "healthy", "exploding", "unknown", "diverged"
CLASSES = (HEALTHY, VANISHING, EXPLODING, DIVERGED, UNKNOWN)

# verdict columns
SIGNAL, N_STEPS, N_BLOCKS = "signal", "n_steps", "n_blocks"
FIRST_BLOCK, LAST_BLOCK = "first_block", "last_block"
END_TO_END, FACTOR, R2 = "end_to_end", "factor", "r2"
NEAR_VALUE, FAR_VALUE = "near_value", "far_value"
MIN_VALUE, MIN_BLOCK, MAX_VALUE, MAX_BLOCK = "min_value", "min_block", "max_value", "max_block"
VERDICT, RATE_TEXT, NONFINITE_BLOCK = "verdict", "rate_text", "nonfinite_block"
PREDICTED_FACTOR, MEASURED_FACTOR, AGREES, AGREEMENT = "predicted_factor", "measured_factor", "agrees", "agreement"
REFERENCE, THEORY_NOTE = "reference", "theory_note"
VERDICT_COLUMNS = (S.RUN, S.STEP, N_STEPS, SIGNAL, S.METRIC, N_BLOCKS, FIRST_BLOCK, LAST_BLOCK, END_TO_END, FACTOR,
                   R2, NEAR_VALUE, FAR_VALUE, MIN_VALUE, MIN_BLOCK, MAX_VALUE, MAX_BLOCK, VERDICT, NONFINITE_BLOCK,
                   RATE_TEXT, PREDICTED_FACTOR, MEASURED_FACTOR, AGREEMENT, AGREES, REFERENCE, THEORY_NOTE)

sentence = _text.sentence
rate_text = _text.rate_text
_fmt_factor = _text.factor
# older private names, kept for the renderers
_with_run, _steps_of, _check_frame, _select_step = with_run, steps_of, check_frame, select_step


def rate_thresholds(vanish: float = VANISH, explode: float = EXPLODE,
                    reference_blocks: int = REFERENCE_BLOCKS) -> tuple[float, float]:
    """Per-block factors below / above which a signal is vanishing / exploding: ``vanish**(1/27)`` etc."""
    return vanish ** (1.0 / reference_blocks), explode ** (1.0 / reference_blocks)


def classify(factor: float, *, vanish: float = VANISH, explode: float = EXPLODE,
             reference_blocks: int = REFERENCE_BLOCKS, all_zero: bool = False) -> str:
    """Class of one signal from its fitted per-block ``factor`` (the same rate gives the same class at any depth)."""
    if all_zero:
        return VANISHING
    if factor is None or math.isnan(factor):
        return UNKNOWN
    lo, hi = rate_thresholds(vanish, explode, reference_blocks)
    if factor < lo:
        return VANISHING
    if factor > hi:
        return EXPLODING
    return HEALTHY


def _summarise(values: np.ndarray, blocks: Sequence[str], position: np.ndarray, signal: str,
               vanish: float, explode: float, nonfinite_block: Optional[str]) -> dict[str, Any]:
    """The verdict fields of one signal given per-block values in depth order."""
    present = ~np.isnan(values)
    v, b, x = values[present], [bl for bl, p in zip(blocks, present) if p], position[present]
    out: dict[str, Any] = {N_BLOCKS: int(v.size), FIRST_BLOCK: b[0] if b else None, LAST_BLOCK: b[-1] if b else None,
                           NONFINITE_BLOCK: nonfinite_block}
    empty = {END_TO_END: math.nan, FACTOR: math.nan, R2: math.nan, NEAR_VALUE: math.nan, FAR_VALUE: math.nan,
             MIN_VALUE: math.nan, MIN_BLOCK: None, MAX_VALUE: math.nan, MAX_BLOCK: None}
    if v.size == 0:
        out.update(empty, **{VERDICT: DIVERGED if nonfinite_block else UNKNOWN})
        return out
    near, far = (v[0], v[-1]) if signal == FORWARD else (v[-1], v[0])
    fit = fit_log_slope(x, v)
    sign = 1.0 if signal == FORWARD else -1.0
    factor = math.exp(sign * fit.slope) if not math.isnan(fit.slope) else math.nan
    span = float(x[-1] - x[0]) if v.size >= 2 else 0.0
    if v.size >= 2 and far == 0 and near > 0:
        e2e = 0.0
    elif v.size >= 2 and near == 0 and far != 0:
        e2e = math.inf
    else:
        e2e = factor ** span if not math.isnan(factor) else math.nan
    imin, imax = int(np.argmin(v)), int(np.argmax(v))
    all_zero = bool(np.all(v == 0))
    if nonfinite_block is not None:
        verdict = DIVERGED
    elif v.size < 2 and not all_zero:
        verdict = UNKNOWN
    elif e2e == 0.0:
        verdict = VANISHING
    elif math.isinf(e2e):
        verdict = EXPLODING
    else:
        verdict = classify(factor, vanish=vanish, explode=explode, all_zero=all_zero)
    out.update({END_TO_END: e2e, FACTOR: factor, R2: fit.r2, NEAR_VALUE: float(near), FAR_VALUE: float(far),
                MIN_VALUE: float(v[imin]), MIN_BLOCK: b[imin], MAX_VALUE: float(v[imax]), MAX_BLOCK: b[imax],
                VERDICT: verdict})
    return out


def verdicts(frame: pd.DataFrame, *, step: StepArg = None, vanish: float = VANISH, explode: float = EXPLODE,
             profiles: Optional[Profiles] = None) -> pd.DataFrame:
    """One row per run x signal (x step when asked) saying whether the signal vanishes, explodes, stays healthy
    or diverged.

    ``step``: None (geometric mean per block over all steps), "all", "first", "last" or a recorded step.
    ``vanish``/``explode``: the change over :data:`REFERENCE_BLOCKS` blocks that counts (per-block thresholds are
    their 27th roots). ``profiles``: a :class:`Profiles` of ``frame`` to share (else one is computed).
    Columns: :data:`VERDICT_COLUMNS`; the theory columns stay empty here (:func:`gradscope.agreement.verdicts`).
    """
    if not (0 < vanish < 1 < explode):
        raise DataError(f"thresholds vanish={vanish}, explode={explode} must satisfy 0 < vanish < 1 < explode.")
    check_frame(frame)
    prof_set = profiles if profiles is not None else Profiles(frame)
    rows: list[dict[str, Any]] = []
    for signal, (metric, _) in SIGNALS.items():
        prof = prof_set.get(metric, step)
        for key, g in prof.groupby([S.RUN, S.STEP], sort=False, dropna=False):
            run, st = key
            g = g.sort_values(POSITION)
            n_steps = len(prof_set.steps(run)) if step is None else 1
            bad = prof_set.diverged(run, None if pd.isna(st) else int(st))
            row = {S.RUN: run, S.STEP: st, N_STEPS: n_steps, SIGNAL: signal, S.METRIC: metric}
            row.update(_summarise(g[S.VALUE].to_numpy(dtype=float), list(g[S.BLOCK]),
                                  g[POSITION].to_numpy(dtype=float), signal, vanish, explode, bad))
            row[RATE_TEXT] = rate_text(row[FACTOR], row[R2])
            rows.append(row)
    out = pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))
    out[S.STEP] = out[S.STEP].astype("Int64")
    out[AGREES] = pd.array([pd.NA] * len(out), dtype="boolean")
    order = {r: i for i, r in enumerate(run_names(frame))}
    out = out.sort_values([S.RUN, S.STEP, SIGNAL], key=lambda s: s.map(order) if s.name == S.RUN else
                          (s.map({FORWARD: 0, BACKWARD: 1}) if s.name == SIGNAL else s), kind="stable")
    return _attach_config(out.reset_index(drop=True), frame)


def _attach_config(out: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in S.CONFIG_COLUMNS if c in frame.columns]
    if not cols or S.RUN not in frame.columns or out.empty:
        return out
    per_run = frame.drop_duplicates(S.RUN).assign(**{S.RUN: lambda d: d[S.RUN].astype(str)}).set_index(S.RUN)[cols]
    return out.join(per_run, on=S.RUN)


__all__ = ["BACKWARD", "CLASSES", "DEFAULT_RUN", "DIVERGED", "EXPLODE", "EXPLODING", "FORWARD", "Fit", "HEALTHY",
           "POSITION", "Profiles", "REFERENCE_BLOCKS", "SIGNALS", "UNKNOWN", "VANISH", "VANISHING",
           "VERDICT_COLUMNS", "classify", "combine_steps", "fit_log_slope", "profile", "profile_pass",
           "rate_text", "rate_thresholds", "run_names", "sentence", "verdicts"]
