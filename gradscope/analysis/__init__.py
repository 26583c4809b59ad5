"""Verdicts: how the forward signal and the backward gradient change across depth, as a plain DataFrame.

Pure functions from a frame (see :mod:`gradscope.schema`) to a frame; no torch, no plotting.

What is measured
----------------
Two signals per run, each read from one metric of the frame:

========== ========== ================================ =========================================
signal     metric     near end -> far end              ``end_to_end``
========== ========== ================================ =========================================
forward    act_var    first block -> last block        act_var(last) / act_var(first)
backward   grad_norm  last block -> first block        grad_norm(first) / grad_norm(last)
========== ========== ================================ =========================================

So both ratios read "far end over near end, in the direction the signal travels": a ratio above 1 means the
signal grows on its way (forward toward the output, backward toward the input).

* **Rows used.** Only ``call == 0`` rows (the first call of a block in a step, the one that sits at the block's
  depth); later calls of a shared module are ignored rather than mixed in.
* **Steps.** ``step=None`` (default) combines all recorded steps by the *geometric mean per block* (mean of
  log values, then exp), which keeps a per-block factor that is the same at every step exactly that factor.
  ``step="all"`` gives one row per recorded step, ``step=<int>`` one step, ``"first"``/``"last"`` the first or
  last recorded step.
* **Position.** Blocks are placed at ``position`` = rank of their ``depth`` within the run (0, 1, 2, ...), so a
  factor is "per block" even when depths are not contiguous.
* **Per-block factor.** A least-squares line through ``(position, ln value)`` over the blocks whose value is
  finite and positive; ``factor = exp(slope)`` for forward and ``exp(-slope)`` for backward (growth toward the
  input), with the line's ``r2`` (1.0 when all values are equal: a constant is fitted exactly). Fewer than two
  such blocks: factor and r2 are NaN.
* **Units.** ``factor`` and ``end_to_end`` are ratios of the metric itself: of a *variance* for forward, of a
  gradient *norm* (not squared) for backward. Predictions from :mod:`gradscope.theory` are converted to the same
  quantities (``predicted_factor``).
* **NaN values** are missing measurements and are dropped; ``+inf`` is an overflow and counts as growth.

Verdict (column ``verdict``)
----------------------------
From the measured ``end_to_end`` ratio, thresholds ``vanish`` (default :data:`VANISH` = 0.01) and ``explode``
(default :data:`EXPLODE` = 100), i.e. two orders of magnitude between the two ends:

* ``vanishing`` if ``end_to_end < vanish``, or if the signal is zero at every block;
* ``exploding`` if ``end_to_end > explode`` (``inf`` included: near end zero or far end overflowed);
* ``healthy`` otherwise;
* ``unknown`` if fewer than two blocks hold a value (one block has no depth to travel across).

Layout (long format)
--------------------
One row per run x signal (x step for ``step="all"``/int), columns :data:`VERDICT_COLUMNS` then the run's config
columns when the frame has them. ``step`` is a nullable integer, ``<NA>`` for rows averaged over steps.
Frames without a ``run`` column are one run named :data:`DEFAULT_RUN`.
Theory columns come from :mod:`gradscope.agreement` when a run's config is known (``configs={run: config}`` or
the frame's config columns): ``predicted_factor`` and ``measured_factor`` (the same quantity as ``factor``, but
fitted within stages, one intercept per stage, so stage boundaries do not enter the rate), ``agrees`` (nullable
boolean), ``reference`` and ``theory_note`` (agreement with its tolerance, where they part, or "no theory").
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope.errors import DataError

#: Default thresholds on ``end_to_end`` (far end / near end), see the module docstring.
VANISH = 0.01
EXPLODE = 100.0
#: Run label for frames without a ``run`` column.
DEFAULT_RUN = "run"

FORWARD, BACKWARD = "forward", "backward"
#: signal -> (metric, direction word used in sentences)
SIGNALS = {FORWARD: (S.ACT_VAR, "toward the output"), BACKWARD: (S.GRAD_NORM, "toward the input")}

VANISHING, HEALTHY, EXPLODING, UNKNOWN = "vanishing", "healthy", "exploding", "unknown"

# verdict columns
SIGNAL, N_STEPS, N_BLOCKS = "signal", "n_steps", "n_blocks"
FIRST_BLOCK, LAST_BLOCK = "first_block", "last_block"
END_TO_END, FACTOR, R2 = "end_to_end", "factor", "r2"
MIN_VALUE, MIN_BLOCK, MAX_VALUE, MAX_BLOCK = "min_value", "min_block", "max_value", "max_block"
VERDICT, RATE_TEXT = "verdict", "rate_text"
PREDICTED_FACTOR, MEASURED_FACTOR, AGREES = "predicted_factor", "measured_factor", "agrees"
REFERENCE, THEORY_NOTE = "reference", "theory_note"
POSITION = "position"
VERDICT_COLUMNS = (S.RUN, S.STEP, N_STEPS, SIGNAL, S.METRIC, N_BLOCKS, FIRST_BLOCK, LAST_BLOCK, END_TO_END, FACTOR,
                   R2, MIN_VALUE, MIN_BLOCK, MAX_VALUE, MAX_BLOCK, VERDICT, RATE_TEXT, PREDICTED_FACTOR,
                   MEASURED_FACTOR, AGREES, REFERENCE, THEORY_NOTE)

StepArg = Union[None, int, str]


@dataclass(frozen=True)
class Fit:
    """A geometric fit ``value ~ a * factor**position`` in log space.

    ``slope`` is d ln(value) / d position (nepers per block); ``r2`` the coefficient of determination of the
    line in log space; ``n`` the number of points used.
    """

    slope: float
    r2: float
    n: int


def fit_log_slope(position: Sequence[float], values: Sequence[float]) -> Fit:
    """Least-squares slope of ``ln(values)`` against ``position`` over the finite, positive values.

    Returns NaN slope and r2 with fewer than two usable points at distinct positions. A perfectly flat series
    has r2 = 1.0 (the line fits it exactly), not 0/0.
    """
    x = np.asarray(position, dtype=float)
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(v) & (v > 0) & np.isfinite(x)
    x, y = x[keep], np.log(v[keep])
    n = int(x.size)
    if n < 2 or np.ptp(x) == 0:
        return Fit(math.nan, math.nan, n)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - (y.mean() + slope * xc)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float((resid ** 2).sum())
    r2 = 1.0 if ss_tot <= 1e-24 * max(1.0, float((y * y).sum())) else 1.0 - ss_res / ss_tot
    return Fit(slope, r2, n)


def classify(end_to_end: float, *, vanish: float = VANISH, explode: float = EXPLODE,
             all_zero: bool = False) -> str:
    """Class of one signal from its end-to-end ratio (far end / near end); see the module docstring."""
    if all_zero:
        return VANISHING
    if math.isnan(end_to_end):
        return UNKNOWN
    if end_to_end < vanish:
        return VANISHING
    if end_to_end > explode:
        return EXPLODING
    return HEALTHY


def _check_frame(frame: pd.DataFrame) -> None:
    missing = [c for c in (S.STEP, S.BLOCK, S.DEPTH, S.METRIC, S.VALUE) if c not in frame.columns]
    if missing:
        raise DataError(f"frame lacks columns {missing}; got {list(frame.columns)}. "
                        f"Pass a gradscope frame (columns {list(S.COLUMNS)}), e.g. scope.frame().")


def run_names(frame: pd.DataFrame) -> list[str]:
    """Runs in order of first appearance (:data:`DEFAULT_RUN` for a frame without a ``run`` column)."""
    if S.RUN not in frame.columns:
        return [DEFAULT_RUN]
    return [str(r) for r in pd.unique(frame[S.RUN].astype(str))]


def _with_run(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame if S.RUN in frame.columns else frame.assign(**{S.RUN: DEFAULT_RUN})
    return out.assign(**{S.RUN: out[S.RUN].astype(str)})


def _steps_of(frame: pd.DataFrame) -> np.ndarray:
    return np.sort(pd.unique(frame[S.STEP].to_numpy()))


def _select_step(frame: pd.DataFrame, step: StepArg) -> pd.DataFrame:
    """Rows of the requested step (None and "all" keep every step)."""
    if step is None or step == "all":
        return frame
    steps = _steps_of(frame)
    if step == "first" or step == "last":
        if steps.size == 0:
            return frame
        step = int(steps[0] if step == "first" else steps[-1])
    if isinstance(step, str) or isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise DataError(f"step={step!r} is not understood; use None (geometric mean over steps), 'all', "
                        f"'first', 'last' or one recorded step number.")
    if step not in set(steps.tolist()):
        shown = steps[:10].tolist()
        raise DataError(f"step={step} was not recorded; recorded steps start {shown} "
                        f"({steps.size} in all). Pass one of them, or step=None to average.")
    return frame[frame[S.STEP] == step]


def combine_steps(values: np.ndarray, iterations: int = 100) -> np.ndarray:
    """One value per block from a ``(steps, blocks)`` matrix: the geometric mean over steps, robust to gaps.

    Fits ``ln v[s, k] = a_s + b_k`` by least squares over the finite positive cells (alternating means) and
    returns ``exp(b_k + mean_s a_s)``. With every cell present this is exactly the geometric mean of each
    column; when a block misses some steps, the per-step level ``a_s`` keeps those steps' overall scale from
    biasing it. A column with a zero anywhere gives 0, one with +inf gives inf (no fit can stand in for either);
    an all-NaN column gives NaN.
    """
    v = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(np.isfinite(v) & (v > 0), np.log(np.where(v > 0, v, 1.0)), np.nan)
    present = ~np.isnan(y)
    rows_ok, cols_ok = present.any(axis=1), present.any(axis=0)
    a = np.zeros(v.shape[0])
    b = np.full(v.shape[1], np.nan)
    if present.any():
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN column is NaN, on purpose
            b = np.nanmean(y, axis=0)
            if not present.all():
                for _ in range(iterations):
                    a_new = np.where(rows_ok, np.nanmean(y - b[None, :], axis=1), 0.0)
                    a_new -= a_new[rows_ok].mean()
                    b_new = np.nanmean(y - a_new[:, None], axis=0)
                    done = np.nanmax(np.abs(b_new - b)) < 1e-13 if cols_ok.any() else True
                    a, b = a_new, b_new
                    if done:
                        break
                b = b + a[rows_ok].mean()
    out = np.exp(b)
    out[(v == 0).any(axis=0)] = 0.0
    out[np.isposinf(v).any(axis=0)] = np.inf
    return out


def profile(frame: pd.DataFrame, metric: str, *, step: StepArg = None) -> pd.DataFrame:
    """Per-block values of one metric, in depth order, combined over steps as the verdicts combine them.

    Returns columns ``run, step, block, depth, position, value`` (``call == 0`` rows only). ``step`` is ``<NA>``
    when steps are combined (``step=None``: geometric mean per block, zeros give 0, NaN values are skipped).
    ``position`` is the 0-based rank of the block's depth within its run.
    """
    _check_frame(frame)
    f = _with_run(frame)
    f = f[f[S.METRIC] == metric]
    if S.CALL in f.columns:
        f = f[f[S.CALL] == 0]
    f = _select_step(f, step)
    cols = [S.RUN, S.STEP, S.BLOCK, S.DEPTH, POSITION, S.VALUE]
    if f.empty:
        return pd.DataFrame({c: pd.Series([], dtype=float if c == S.VALUE else object) for c in cols})
    keys = [S.RUN, S.BLOCK] + ([S.STEP] if step is not None else [])
    f = f[[S.RUN, S.BLOCK, S.STEP, S.DEPTH, S.VALUE]].copy()
    f[S.VALUE] = f[S.VALUE].astype(float)
    if step is None:
        parts = []
        for run, fr in f.groupby(S.RUN, sort=False):
            wide = fr.pivot_table(index=S.STEP, columns=S.BLOCK, values=S.VALUE, aggfunc="mean", dropna=False)
            depth = fr.groupby(S.BLOCK)[S.DEPTH].min()
            parts.append(pd.DataFrame({S.RUN: run, S.BLOCK: wide.columns, S.DEPTH: depth[wide.columns].to_numpy(),
                                       S.VALUE: combine_steps(wide.to_numpy(dtype=float))}))
        g = pd.concat(parts, ignore_index=True)
        g[S.STEP] = pd.array([pd.NA] * len(g), dtype="Int64")
    else:
        g = f.groupby(keys, sort=False).agg(depth=(S.DEPTH, "min"), value=(S.VALUE, "mean")).reset_index()
        g[S.STEP] = g[S.STEP].astype("Int64")
    depth_of = g.groupby([S.RUN, S.BLOCK], sort=False)[S.DEPTH].min()
    ranks = depth_of.groupby(level=0, sort=False).rank(method="dense").astype("int64") - 1
    g[POSITION] = [int(ranks[(r, b)]) for r, b in zip(g[S.RUN], g[S.BLOCK])]
    g[S.DEPTH] = g[S.DEPTH].astype("int64")
    return g.sort_values([S.RUN, S.STEP, POSITION], kind="stable")[cols].reset_index(drop=True)


def _summarise(values: np.ndarray, blocks: Sequence[str], position: np.ndarray, signal: str,
               vanish: float, explode: float) -> dict[str, Any]:
    """The verdict fields of one signal given per-block values in depth order."""
    present = ~np.isnan(values)
    v, b, x = values[present], [bl for bl, p in zip(blocks, present) if p], position[present]
    out: dict[str, Any] = {N_BLOCKS: int(v.size), FIRST_BLOCK: b[0] if b else None, LAST_BLOCK: b[-1] if b else None}
    if v.size == 0:
        out.update({END_TO_END: math.nan, FACTOR: math.nan, R2: math.nan, MIN_VALUE: math.nan, MIN_BLOCK: None,
                    MAX_VALUE: math.nan, MAX_BLOCK: None, VERDICT: UNKNOWN})
        return out
    near, far = (v[0], v[-1]) if signal == FORWARD else (v[-1], v[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        e2e = float(np.float64(far) / np.float64(near)) if v.size >= 2 else math.nan
    fit = fit_log_slope(x, v)
    sign = 1.0 if signal == FORWARD else -1.0
    imin, imax = int(np.argmin(v)), int(np.argmax(v))
    all_zero = bool(v.size >= 1 and np.all(v == 0))
    verdict = UNKNOWN if v.size < 2 and not all_zero else classify(e2e, vanish=vanish, explode=explode,
                                                                   all_zero=all_zero)
    if v.size >= 2 and np.isposinf(v).any():
        verdict = EXPLODING
    out.update({END_TO_END: e2e, FACTOR: math.exp(sign * fit.slope) if not math.isnan(fit.slope) else math.nan,
                R2: fit.r2, MIN_VALUE: float(v[imin]), MIN_BLOCK: b[imin], MAX_VALUE: float(v[imax]),
                MAX_BLOCK: b[imax], VERDICT: verdict})
    return out


def rate_text(factor: float, r2: float) -> str:
    """``"x1.12 per block (R² 0.97)"``, or a note when no rate could be fitted."""
    if factor is None or (isinstance(factor, float) and math.isnan(factor)):
        return "no per-block rate (fewer than two blocks with a positive value)"
    r2s = "" if r2 is None or (isinstance(r2, float) and math.isnan(r2)) else f" (R² {r2:.2f})"
    return f"x{_fmt_factor(factor)} per block{r2s}"


def _fmt_factor(f: float) -> str:
    """Per-block factors near 1 need two decimals (x1.12); others three significant digits."""
    return f"{f:.2f}" if 0.1 <= f < 10 else f"{f:.3g}"


def verdicts(frame: pd.DataFrame, *, step: StepArg = None, vanish: float = VANISH,
             explode: float = EXPLODE) -> pd.DataFrame:
    """One row per run x signal (x step when asked) saying whether the signal vanishes, explodes or stays healthy.

    ``step``: None (geometric mean per block over all steps), "all", "first", "last" or a recorded step.
    ``vanish``/``explode``: thresholds on the end-to-end ratio (far end / near end), defaults 0.01 and 100.
    Columns: see the module docstring and :data:`VERDICT_COLUMNS`; the theory columns stay empty here (measurement
    only): :func:`gradscope.agreement.verdicts` fills them.
    """
    if not (0 < vanish < 1 < explode):
        raise DataError(f"thresholds vanish={vanish}, explode={explode} must satisfy 0 < vanish < 1 < explode.")
    _check_frame(frame)
    rows: list[dict[str, Any]] = []
    n_steps_of = _with_run(frame).groupby(S.RUN, sort=False)[S.STEP].nunique()
    for signal, (metric, _) in SIGNALS.items():
        prof = profile(frame, metric, step=step)
        for key, g in prof.groupby([S.RUN, S.STEP], sort=False, dropna=False):
            run, st = key
            g = g.sort_values(POSITION)
            row = {S.RUN: run, S.STEP: st, N_STEPS: int(n_steps_of.get(run, 0)) if step is None else 1,
                   SIGNAL: signal, S.METRIC: metric}
            row.update(_summarise(g[S.VALUE].to_numpy(dtype=float), list(g[S.BLOCK]),
                                  g[POSITION].to_numpy(dtype=float), signal, vanish, explode))
            row[RATE_TEXT] = rate_text(row[FACTOR], row[R2])
            rows.append(row)
    out = pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))
    out[S.STEP] = out[S.STEP].astype("Int64")
    order = {r: i for i, r in enumerate(run_names(frame))}
    out = out.sort_values([S.RUN, S.STEP, SIGNAL], key=lambda s: s.map(order) if s.name == S.RUN else
                          (s.map({FORWARD: 0, BACKWARD: 1}) if s.name == SIGNAL else s), kind="stable")
    out = out.reset_index(drop=True)
    return _attach_config(out, frame)


def _attach_config(out: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in S.CONFIG_COLUMNS if c in frame.columns]
    if not cols or S.RUN not in frame.columns or out.empty:
        return out
    per_run = frame.drop_duplicates(S.RUN).assign(**{S.RUN: lambda d: d[S.RUN].astype(str)}).set_index(S.RUN)[cols]
    return out.join(per_run, on=S.RUN)


def _fmt_ratio(r: float) -> str:
    if math.isnan(r):
        return "n/a"
    if math.isinf(r):
        return "inf"
    return f"{r:.3g}"


def sentence(row: Union[Mapping[str, Any], pd.Series]) -> str:
    """The verdict of one row in plain language, with its measured per-block rate.

    e.g. ``"resnet56-bn: backward gradients explode toward the input: x1.12 per block (R² 0.97), 340x over
    27 blocks"``.
    """
    r = dict(row)
    signal = r.get(SIGNAL)
    what = "forward activation variance" if signal == FORWARD else "backward gradients"
    where = SIGNALS.get(signal, ("", ""))[1]
    step = r.get(S.STEP)
    at = "" if step is None or pd.isna(step) else f" at step {int(step)}"
    head = f"{r.get(S.RUN, DEFAULT_RUN)}{at}: {what}"
    verdict, n = r.get(VERDICT), int(r.get(N_BLOCKS) or 0)
    if verdict == UNKNOWN:
        return f"{head} cannot be judged: {n} block(s) with a value, a rate needs two or more."
    if verdict == VANISHING and r.get(MAX_VALUE) == 0:
        return f"{head} is zero at every one of {n} blocks (vanished)."
    plural = signal != FORWARD
    verb = {VANISHING: "vanish" if plural else "vanishes", EXPLODING: "explode" if plural else "explodes",
            HEALTHY: "stay healthy" if plural else "stays healthy"}[verdict]
    text = f"{head} {verb}{' ' + where if verdict != HEALTHY else ''}: {r.get(RATE_TEXT) or rate_text(r[FACTOR], r[R2])}"
    text += f", {_fmt_ratio(float(r[END_TO_END]))}x over {n} blocks"
    if r.get(MIN_VALUE) == 0 and verdict != HEALTHY:
        text += f"; zero at {r.get(MIN_BLOCK)}"
    pred = r.get(PREDICTED_FACTOR)
    if pred is not None and not pd.isna(pred):
        agrees, measured = r.get(AGREES), r.get(MEASURED_FACTOR)
        judged = "" if agrees is None or pd.isna(agrees) else ", agreeing" if bool(agrees) else ", NOT agreeing"
        cite = str(r.get(REFERENCE) or "theory").split(" (")[0]
        text += (f"; theory ({cite}) predicts x{_fmt_factor(float(pred))} per block against a measured "
                 f"x{_fmt_factor(float(measured))}{' within stages' if abs(measured - r[FACTOR]) > 1e-9 else ''}"
                 f"{judged}")
    return text + "."
