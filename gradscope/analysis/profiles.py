"""Per-block profiles: the values of one metric across depth, computed in ONE pass over a frame and shared.

:class:`Profiles` reads a frame once (:func:`profile_pass`: ``call == 0`` rows of the verdict metrics, one value
per run, step and block, plus which steps held non-finite values) and hands every consumer (verdicts, agreement,
figures) the same tables, per step or combined over steps, without reading the frame again.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope import words as W
from gradscope.analysis.stats import t975
from gradscope.errors import DataError

#: Run label for frames without a ``run`` column.
DEFAULT_RUN = "run"
POSITION = "position"
NONFINITE = "nonfinite"
StepArg = Union[None, int, str]
PROFILE_COLUMNS = (S.RUN, S.STEP, S.BLOCK, S.DEPTH, POSITION, S.VALUE)


@dataclass(frozen=True)
class Fit:
    """A geometric fit ``value ~ a * factor**position`` in log space: slope (nepers per block), r2, points used,
    the slope's standard error ``se`` and its 95% interval ``[slope_low, slope_high]``.

    ``se`` is NaN and the interval ``(-inf, inf)`` with two points (a line through two points has no residual to
    measure its error by: n - 2 = 0 degrees of freedom), NaN with fewer.
    """

    slope: float
    r2: float
    n: int
    se: float = math.nan
    slope_low: float = math.nan
    slope_high: float = math.nan


def fit_log_slope(position: Sequence[float], values: Sequence[float]) -> Fit:
    """Least-squares slope of ``ln(values)`` against ``position`` over the finite, positive values, with its
    standard error and 95% interval (ordinary least squares).

    ``se = sqrt(SS_res / (n - 2) / Sxx)`` and ``slope ± t(0.975, n - 2) * se``
    (:func:`gradscope.analysis.stats.t975`), so a line that explains little of the values (a low r2 over few
    blocks) gives a wide interval: the verdicts call a rate only where its whole interval is on one side of a
    threshold. NaN slope and r2 with fewer than two usable points at distinct positions; a flat series has r2 = 1.0.
    """
    x = np.asarray(position, dtype=float)
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(v) & (v > 0) & np.isfinite(x)
    x, y = x[keep], np.log(v[keep])
    n = int(x.size)
    if n < 2 or np.ptp(x) == 0:
        return Fit(math.nan, math.nan, n)
    xc = x - x.mean()
    sxx = float((xc * xc).sum())
    slope = float((xc * (y - y.mean())).sum() / sxx)
    resid = y - (y.mean() + slope * xc)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float((resid ** 2).sum())
    flat = ss_tot <= 1e-24 * max(1.0, float((y * y).sum()))
    r2 = 1.0 if flat else 1.0 - ss_res / ss_tot
    if n < 3:
        return Fit(slope, r2, n, math.nan, -math.inf, math.inf)
    se = 0.0 if flat else math.sqrt(max(ss_res, 0.0) / (n - 2) / sxx)
    half = t975(n - 2) * se
    return Fit(slope, r2, n, se, slope - half, slope + half)


def check_frame(frame: pd.DataFrame) -> None:
    """Raise :class:`DataError` naming the missing columns when ``frame`` is not a gradscope frame."""
    missing = [c for c in (S.STEP, S.BLOCK, S.DEPTH, S.METRIC, S.VALUE) if c not in frame.columns]
    if missing:
        raise DataError(f"frame lacks columns {missing}; got {list(frame.columns)}. "
                        f"Pass a gradscope frame (columns {list(S.COLUMNS)}), e.g. scope.frame().")


def check_one_phase(frame: pd.DataFrame) -> None:
    """Raise :class:`DataError` when ``frame`` holds several phases (a profile folder's records, as
    :func:`gradscope.load` returns them): initialisation and training share step numbers, and a verdict over both
    would mix them."""
    phases = sorted(set(frame["phase"].astype(str))) if "phase" in frame.columns else []
    if len(phases) > 1:
        raise DataError(f"frame holds the phases {', '.join(phases)} (a gradscope profile folder's records), whose "
                        f"steps would be mixed; pass one, e.g. frame[frame.phase == {phases[-1]!r}] (gradscope.report "
                        f"takes both and splits them)")


def run_names(frame: pd.DataFrame) -> list[str]:
    """Runs in order of first appearance (:data:`DEFAULT_RUN` for a frame without a ``run`` column)."""
    if S.RUN not in frame.columns:
        return [DEFAULT_RUN]
    return [str(r) for r in pd.unique(frame[S.RUN].astype(str))]


def with_run(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a string ``run`` column (:data:`DEFAULT_RUN` when it had none)."""
    out = frame if S.RUN in frame.columns else frame.assign(**{S.RUN: DEFAULT_RUN})
    return out.assign(**{S.RUN: out[S.RUN].astype(str)})


def steps_of(frame: pd.DataFrame) -> np.ndarray:
    """The recorded steps of ``frame``, sorted."""
    return np.sort(pd.unique(frame[S.STEP].to_numpy()))


def select_step(frame: pd.DataFrame, step: StepArg) -> pd.DataFrame:
    """Rows of the requested step (None and "all" keep every step); a step not recorded is a DataError."""
    if step is None or step == "all":
        return frame
    steps = steps_of(frame)
    if step == "first" or step == "last":
        if steps.size == 0:
            return frame
        step = int(steps[0] if step == "first" else steps[-1])
    if isinstance(step, str) or isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise DataError(f"step={step!r} is not understood; use None (geometric mean over steps), 'all', "
                        f"'first', 'last' or one recorded step number.")
    if step not in set(steps.tolist()):
        raise DataError(f"step={step} was not recorded; recorded steps start {steps[:10].tolist()} "
                        f"({steps.size} in all). Pass one of them, or step=None to average.")
    return frame[frame[S.STEP] == step]


def combine_steps(values: np.ndarray, iterations: int = 100) -> np.ndarray:
    """One value per block from a ``(steps, blocks)`` matrix: the geometric mean over steps, robust to gaps.

    Fits ``ln v[s, k] = a_s + b_k`` over the finite positive cells and returns ``exp(b_k + mean_s a_s)``: with
    every cell present, exactly the geometric mean of each column. A column with a zero gives 0, with +inf inf,
    all-NaN NaN.
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


def profile_pass(frame: pd.DataFrame, metrics: Iterable[str]) -> pd.DataFrame:
    """THE pass over a frame: ``call == 0`` rows of ``metrics``, one value per (run, step, block, metric).

    Columns ``run, step, block, depth, metric, value, position`` (position: rank of the block's depth within its
    run). Everything a report needs about depth profiles is derived from this table.
    """
    check_frame(frame)
    f = frame[frame[S.METRIC].isin(list(metrics))]
    if S.CALL in f.columns:
        f = f[f[S.CALL] == 0]
    f = with_run(f)[[S.RUN, S.STEP, S.BLOCK, S.DEPTH, S.METRIC, S.VALUE]]
    if f.empty:
        return pd.DataFrame({c: pd.Series([], dtype=float if c == S.VALUE else object)
                             for c in (S.RUN, S.STEP, S.BLOCK, S.DEPTH, S.METRIC, S.VALUE, NONFINITE, POSITION)})
    f = f.astype({S.VALUE: float})
    v = f[S.VALUE].to_numpy(dtype=float)
    m = f[S.METRIC].to_numpy()
    signal = np.isin(m, [S.ACT_VAR, S.GRAD_NORM, S.PARAM_GRAD_NORM])  # an fp16 weight gradient may overflow alone
    negative = signal & (v < 0)
    if negative.any():  # a variance or a norm below 0 is no measurement (a hand-made frame): a class would be a guess
        at = f[negative].iloc[0]
        raise DataError(f"{at[S.METRIC]} is {at[S.VALUE]} at run {at[S.RUN]!r}, block {at[S.BLOCK]!r}, step "
                        f"{at[S.STEP]} ({int(negative.sum())} negative value(s)): variances and norms cannot be "
                        f"negative; is this a gradscope frame?")
    f = f.assign(**{NONFINITE: np.where(m == S.ACT_NONFINITE, v > 0, signal & ~np.isfinite(v))})
    g = f.groupby([S.RUN, S.STEP, S.BLOCK, S.METRIC], sort=False).agg(
        depth=(S.DEPTH, "min"), value=(S.VALUE, "mean"), nonfinite=(NONFINITE, "max")).reset_index()
    depth_of = g.groupby([S.RUN, S.BLOCK], sort=False)[S.DEPTH].min()
    ranks = (depth_of.groupby(level=0, sort=False).rank(method="dense").astype("int64") - 1).rename(POSITION)
    g = g.join(ranks, on=[S.RUN, S.BLOCK])
    g[S.DEPTH] = g[S.DEPTH].astype("int64")
    g[S.STEP] = g[S.STEP].astype("int64")
    return g


#: The metrics whose NaN/Inf make each signal diverge (:class:`Profiles`).
_FORWARD_SIGNS = (S.ACT_VAR, S.ACT_NONFINITE)
_BACKWARD_SIGNS = (S.GRAD_NORM, S.PARAM_GRAD_NORM)


class Profiles:
    """Depth profiles of a frame, from one :func:`profile_pass`, cached per (metric, step).

    ``get(metric, step)`` returns what :func:`profile` returns; ``nonfinite`` maps ``(run, step, signal)`` to the
    block where that signal first held NaN/Inf: forward, a block output with ``act_nonfinite > 0`` or a non-finite
    ``act_var``, the shallowest first (the order the forward pass runs); backward, a non-finite ``grad_norm`` or
    ``param_grad_norm``, the deepest first (the order backward runs). A NaN loss spoils every gradient and no
    activation: the backward signal diverged, the forward one did not (both were called diverged before).
    """

    def __init__(self, frame: pd.DataFrame,
                 metrics: Iterable[str] = (S.ACT_VAR, S.GRAD_NORM, S.PARAM_GRAD_NORM)) -> None:
        self.metrics = tuple(dict.fromkeys(list(metrics) + [S.ACT_NONFINITE]))
        self.table = profile_pass(frame, self.metrics)
        self.runs = run_names(frame)
        self._cache: dict[tuple[str, StepArg], pd.DataFrame] = {}
        bad = self.table[self.table[NONFINITE].astype(bool)]
        self.nonfinite: dict[tuple[str, int, str], str] = {}
        for signal, metrics, deepest_first in ((W.FORWARD, _FORWARD_SIGNS, False),
                                               (W.BACKWARD, _BACKWARD_SIGNS, True)):
            hits = bad[bad[S.METRIC].isin(metrics)].sort_values([S.RUN, S.STEP, POSITION],
                                                                ascending=[True, True, not deepest_first])
            for run, step, block in zip(hits[S.RUN], hits[S.STEP], hits[S.BLOCK]):
                self.nonfinite.setdefault((str(run), int(step), signal), str(block))

    def steps(self, run: str) -> list[int]:
        """Recorded steps of ``run`` (any verdict metric)."""
        t = self.table
        return sorted(int(s) for s in pd.unique(t[t[S.RUN] == run][S.STEP]))

    def diverged(self, run: str, step: Optional[int], signal: str) -> Optional[str]:
        """The first block of ``signal`` with non-finite values in ``run`` at ``step`` (the earliest such step:
        None); None when that signal stayed finite."""
        if step is not None:
            return self.nonfinite.get((run, int(step), signal))
        hits = [(s, b) for (r, s, sig), b in self.nonfinite.items() if r == run and sig == signal]
        return min(hits)[1] if hits else None

    def get(self, metric: str, step: StepArg = None) -> pd.DataFrame:
        """Columns ``run, step, block, depth, position, value`` in depth order (``step`` <NA> when combined)."""
        key = (metric, step)
        if key not in self._cache:
            self._cache[key] = self._compute(metric, step)
        return self._cache[key]

    def _compute(self, metric: str, step: StepArg) -> pd.DataFrame:
        t = self.table[self.table[S.METRIC] == metric]
        if t.empty:
            return pd.DataFrame({c: pd.Series([], dtype=float if c == S.VALUE else object) for c in PROFILE_COLUMNS})
        t = select_step(t, step)
        if step is not None:
            g = t.assign(**{S.STEP: t[S.STEP].astype("Int64")})
        else:
            parts = []
            for run, fr in t.groupby(S.RUN, sort=False):
                wide = fr.pivot_table(index=S.STEP, columns=S.BLOCK, values=S.VALUE, aggfunc="mean", dropna=False)
                meta = fr.groupby(S.BLOCK)[[S.DEPTH, POSITION]].min()
                parts.append(pd.DataFrame({S.RUN: run, S.BLOCK: wide.columns,
                                           S.DEPTH: meta.loc[wide.columns, S.DEPTH].to_numpy(),
                                           POSITION: meta.loc[wide.columns, POSITION].to_numpy(),
                                           S.VALUE: combine_steps(wide.to_numpy(dtype=float))}))
            g = pd.concat(parts, ignore_index=True)
            g[S.STEP] = pd.array([pd.NA] * len(g), dtype="Int64")
        g = g.assign(**{S.DEPTH: g[S.DEPTH].astype("int64"), POSITION: g[POSITION].astype("int64")})
        order = {r: i for i, r in enumerate(self.runs)}
        g = g.assign(_o=g[S.RUN].map(order)).sort_values(["_o", S.STEP, POSITION], kind="stable")
        return g[list(PROFILE_COLUMNS)].reset_index(drop=True)


def profile(frame: pd.DataFrame, metric: str, *, step: StepArg = None) -> pd.DataFrame:
    """Per-block values of one metric, in depth order, combined over steps as the verdicts combine them.

    Columns ``run, step, block, depth, position, value`` (``call == 0`` rows only); ``step`` is ``<NA>`` when
    steps are combined (``step=None``: geometric mean per block). For several metrics or consumers build one
    :class:`Profiles` and share it.
    """
    return Profiles(frame, (metric,)).get(metric, step)
