"""Compare two runs against their own noise: did a change (init, norm, lr, architecture) change how signals travel?

Pure functions of frames (pandas and numpy; no torch, no plotting). :func:`compare` takes two sides, A and B, each a
frame, a records folder (``attach(out=)``, a report folder, a ``gradscope profile`` folder) or a list of those, and
treats every run on one side as a seed of one configuration.

For each block and metric (default: ``act_var`` and ``grad_norm``, the two verdict signals):

* **The value of a run** is the mean over the compared steps (the steps both sides recorded) of ``ln value`` for
  positive metrics (variances, norms, ratios: their changes are multiplicative), of the value itself for the others
  (``act_mean``, ``act_zero_frac``, ...). Only ``call == 0`` rows are read.
* **The difference** ``diff = mean(B) - mean(A)`` (for log metrics ``ratio = exp(diff)``: B is ``ratio`` times A).
* **Its noise** comes from the seed spread when both sides have two or more runs (Welch: ``SE = sqrt(sA^2/nA +
  sB^2/nB)``, Welch-Satterthwaite degrees of freedom); when one side has a single run, from the other side's seed
  spread (``SE = s * sqrt(1/nA + 1/nB)``, ``n - 1`` degrees of freedom); when both sides are single runs, from the
  step-to-step spread of each run over the compared steps (``spread = "steps"``: consecutive training steps are
  correlated, so this interval is narrower than a seed interval would be: use seeds for a decision that matters).
  With neither (one run, one step) there is no interval and the answer is ``unclear``.
* **Many comparisons at once.** Each (block, metric) gets a two-sided Welch t-test p-value; p-values are adjusted
  for the number of comparisons ``m`` (blocks x metrics) by Holm's step-down method (default; controls the chance
  of *any* false "differs" at ``alpha``) or Bonferroni, and the interval printed is the Bonferroni-corrected one,
  ``diff +- t(1 - alpha/(2m), df) SE``, so that an interval excluding 0 and a "differs" agree (Holm can only decide
  more, never fewer, than that interval).
* **Verdicts.** Per (block, metric): ``differs`` (adjusted p < alpha), ``same`` (no evidence of a difference:
  not proof of equality; the interval says how large a difference the data still allow) or ``unclear`` (no
  interval). Per block: ``differs`` if any of its metrics differs, ``same`` if all are ``same``, else ``unclear``.
  A block present on only one side is ``only in A`` / ``only in B``.
* **Values a mean of logs cannot hold.** A log metric exactly zero at a compared step (a dead block, a gradient cut
  off), or a value that is NaN/inf, is not dropped silently: a side zero (or non-finite) at every compared step of
  every run against a side positive and finite everywhere ``differs`` (``ratio`` 0 when B is the zero side, inf when
  A is); both sides zero everywhere is ``same``; zeros or NaN at the same steps in every run of both sides (a
  zero-initialised branch at step 0) leave those steps out of the comparison; any other mix is ``unclear``. The
  ``note`` column says which.
* **No spread, no judgement.** Runs (or steps) that repeat each other exactly (a run passed twice, a constant
  metric) give a zero standard error: a nonzero difference is then ``unclear``, never a certain ``differs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope.analysis.stats import t_cdf, t_quantile
from gradscope.errors import DataError

__all__ = ["Comparison", "DIFFERS", "SAME", "UNCLEAR", "compare", "holm", "t_cdf", "t_quantile"]

DIFFERS, SAME, UNCLEAR = "differs", "same", "unclear"
ONLY_A, ONLY_B = "only in A", "only in B"
#: metrics compared on a log scale (positive quantities whose changes are multiplicative)
LOG_METRICS = frozenset((S.ACT_VAR, S.ACT_RMS, S.ACT_MAX_ABS, S.BRANCH_VAR, S.SHORTCUT_VAR, S.GRAD_NORM,
                         S.GRAD_IN_NORM, S.PARAM_NORM, S.PARAM_GRAD_NORM, S.UPDATE_RATIO, S.ADAM_M_NORM,
                         S.ADAM_V_NORM))
DEFAULT_COMPARED = (S.ACT_VAR, S.GRAD_NORM)
PHASE = "phase"
#: columns of :attr:`Comparison.table`
COLUMNS = ("block", "depth", "metric", "scale", "n_a", "n_b", "spread", "mean_a", "mean_b", "diff", "ratio", "low",
           "high", "se", "df", "p", "p_adjusted", "verdict", "note")
#: what a run's value is at the compared steps: usable, exactly zero somewhere (log metrics), NaN/inf somewhere
OK, ZERO, NONFINITE = "ok", "zero", "non-finite"
Side = Union[pd.DataFrame, str, Path, Sequence[Union[pd.DataFrame, str, Path]]]


# Student's t: gradscope.analysis.stats (t_cdf, t_quantile), shared with every interval


def holm(p: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted): controls the family-wise error."""
    idx = [i for i, v in enumerate(p) if v is not None and not math.isnan(v)]
    m = len(idx)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# ---- inputs -----------------------------------------------------------------------------------------------------
def _one_frame(item: Union[pd.DataFrame, str, Path], label: str) -> pd.DataFrame:
    if isinstance(item, pd.DataFrame):
        frame = item.copy()
    elif isinstance(item, (str, Path)):
        label = Path(item).name if label in ("A", "B") else label
        from gradscope.store import load, read_records

        frame = read_records(item) if Path(item).is_file() else load(item)
    else:
        raise DataError(f"compare: {label} is a {type(item).__name__}; pass a frame, a records folder, or a list of "
                        f"those (one per seed)")
    missing = [c for c in (S.STEP, S.BLOCK, S.METRIC, S.VALUE) if c not in frame.columns]
    if missing:
        raise DataError(f"compare: {label} has no column(s) {missing}: it is not a gradscope frame")
    if S.RUN not in frame.columns:
        frame[S.RUN] = label
    frame[S.RUN] = frame[S.RUN].astype(str)
    return frame


def side_frame(side: Side, name: str) -> pd.DataFrame:
    """One frame of a side: a list's items become runs (seeds) ``<i>:<run>`` (``<i>:<folder name>`` for folders)."""
    if isinstance(side, (list, tuple)):
        if not side:
            raise DataError(f"compare: side {name} is an empty list")
        frames = []
        for i, item in enumerate(side):
            f = _one_frame(item, Path(item).name if isinstance(item, (str, Path)) else f"{name}{i}")
            f[S.RUN] = f"{i}:" + f[S.RUN]
            frames.append(f)
        return pd.concat(frames, ignore_index=True)
    return _one_frame(side, name)


def _run_values(frame: pd.DataFrame, metrics: Sequence[str], steps: Optional[Sequence[int]]) -> pd.DataFrame:
    """Per (run, block, metric, step): the value on the comparison's scale (ln for :data:`LOG_METRICS`)."""
    rows = frame[frame[S.METRIC].isin(list(metrics))]
    if S.CALL in rows.columns:
        rows = rows[rows[S.CALL].fillna(0) == 0]
    if steps is not None:
        rows = rows[rows[S.STEP].isin(list(steps))]
    cols = [S.RUN, S.BLOCK, S.METRIC, S.STEP, S.VALUE] + ([S.DEPTH] if S.DEPTH in rows.columns else [])
    rows = rows[cols].copy()
    value = rows[S.VALUE].astype(float)
    logs = rows[S.METRIC].isin(list(LOG_METRICS))
    with np.errstate(divide="ignore", invalid="ignore"):
        rows[S.VALUE] = np.where(logs, np.log(value.where(value > 0)), value)
    # kept, not dropped: a block that went to zero or NaN is a difference to report (see the module doc)
    rows["state"] = np.where(~np.isfinite(value), NONFINITE, np.where(logs & (value <= 0), ZERO, OK))
    return rows


# ---- one comparison -----------------------------------------------------------------------------------------------
def _welch(a: np.ndarray, b: np.ndarray) -> Tuple[float, float]:
    """``(se, df)`` of mean(b) - mean(a) from two samples of two or more values each."""
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return 0.0, float(a.size + b.size - 2)
    df = (va + vb) ** 2 / ((va ** 2 / (a.size - 1) if va else 0.0) + (vb ** 2 / (b.size - 1) if vb else 0.0))
    return se, df


def _noise(a_runs: np.ndarray, b_runs: np.ndarray, a_steps: np.ndarray, b_steps: np.ndarray
           ) -> Tuple[float, float, str]:
    """``(se, df, spread)`` of the difference of the two sides' means (see the module doc)."""
    if a_runs.size >= 2 and b_runs.size >= 2:
        se, df = _welch(a_runs, b_runs)
        return se, df, "seeds"
    if a_runs.size >= 2 or b_runs.size >= 2:
        many = a_runs if a_runs.size >= 2 else b_runs
        s = many.std(ddof=1)
        return s * math.sqrt(1.0 / a_runs.size + 1.0 / b_runs.size), float(many.size - 1), "seeds (one side)"
    if a_steps.size >= 2 and b_steps.size >= 2:
        se, df = _welch(a_steps, b_steps)
        return se, df, "steps"
    return math.nan, math.nan, "none"


def _p_value(diff: float, se: float, df: float) -> float:
    """Two-sided p of ``diff`` against ``t(df)``; NaN without an interval, and NaN for a nonzero difference over a
    zero spread (runs that repeat each other are no evidence, see the module doc)."""
    if not (math.isfinite(se) and math.isfinite(df)) or df <= 0:
        return math.nan
    if se == 0:
        return math.nan if diff != 0 else 1.0
    return 2.0 * (1.0 - t_cdf(abs(diff) / se, df))


def _bad_steps(d: pd.DataFrame) -> Dict[Any, frozenset]:
    """Each run's compared steps whose value has no logarithm to average: ``{run: {(step, state), ...}}``."""
    bad = d[d["state"] != OK]
    out: Dict[Any, frozenset] = {run: frozenset() for run in pd.unique(d[S.RUN])}
    for run, g in bad.groupby(S.RUN, sort=False):
        out[run] = frozenset(zip(g[S.STEP], g["state"]))
    return out


def _degenerate(da: pd.DataFrame, db: pd.DataFrame,
                labels: Tuple[str, str]) -> Optional[Tuple[str, float, str, Optional[frozenset]]]:
    """How a (block, metric) with a zero or NaN value is decided (see the module doc): ``(verdict, diff, note,
    None)`` when the zeros decide it, ``("", nan, note, steps)`` when ``steps`` (zero or NaN at the same steps in
    every run of both sides) are left out and the rest is compared as usual; None when every value is usable."""
    bad_a, bad_b = _bad_steps(da), _bad_steps(db)
    clean = {labels[0]: not any(bad_a.values()), labels[1]: not any(bad_b.values())}
    if all(clean.values()):
        return None
    every = {label: {state for state in (ZERO, NONFINITE) if (d["state"] == state).all()}
             for label, d in ((labels[0], da), (labels[1], db))}
    if every[labels[0]] == every[labels[1]] == {ZERO}:
        return SAME, 0.0, "exactly zero at every compared step of both sides", None
    if every[labels[0]] == every[labels[1]] == {NONFINITE}:
        return UNCLEAR, math.nan, "NaN or inf at every compared step of both sides", None
    for side, other, sign in ((labels[1], labels[0], -1.0), (labels[0], labels[1], 1.0)):
        if every[side] and clean[other]:
            zero = ZERO in every[side]
            what = "exactly zero" if zero else "NaN or inf"
            return (DIFFERS, sign * math.inf if zero else math.nan,
                    f"{side} is {what} at every compared step of every run, {other} positive and finite", None)
    shared = set(bad_a.values()) | set(bad_b.values())
    if len(shared) == 1:  # the same steps in every run of both sides (a zero-initialised branch at step 0)
        steps = next(iter(shared))
        if len({step for step, _ in steps}) < da[S.STEP].nunique():
            words = ", ".join(f"{step} ({state})" for step, state in sorted(steps, key=str)[:6])
            return "", math.nan, f"step(s) {words} left out: the same in every run of both sides", steps
    counts = [f"{sum(len(v) for v in bad.values())} of {len(d)} value(s) of {side}"
              for side, bad, d in ((labels[0], bad_a, da), (labels[1], bad_b, db)) if any(bad.values())]
    return UNCLEAR, math.nan, (f"zero or NaN at {' and '.join(counts)}, not at the same steps: no mean of logs "
                               f"decides it; compare the steps where both are positive (steps=...) or read the "
                               f"values"), None


@dataclass
class Comparison:
    """What :func:`compare` found.

    Attributes:
        table: one row per (phase,) block and metric, columns :data:`COLUMNS` (``phase`` first when the sides have
            phases); ``diff``/``low``/``high`` on the comparison scale (ln for log metrics), ``ratio`` = B/A.
        blocks: one row per (phase,) block: ``block, depth, verdict, metrics_differing``.
        alpha, correction, m: the error rate, the correction (``holm``/``bonferroni``) and the number of
            comparisons it was corrected for.
        runs_a, runs_b: the runs (seeds) of each side; steps: the steps compared.
        one_sided: with ``metrics="all"``, each metric recorded on one side only (not compared) -> that side's label.
    """

    table: pd.DataFrame
    blocks: pd.DataFrame
    alpha: float
    correction: str
    m: int
    runs_a: List[str] = field(default_factory=list)
    runs_b: List[str] = field(default_factory=list)
    steps: List[int] = field(default_factory=list)
    labels: Tuple[str, str] = ("A", "B")
    one_sided: Dict[str, str] = field(default_factory=dict)

    @property
    def differs(self) -> bool:
        """Whether any block differs."""
        return bool((self.blocks["verdict"] == DIFFERS).any())

    def summary(self) -> str:
        """One paragraph: how many blocks differ, which, and by how much at most."""
        a, b = self.labels
        n_diff = int((self.blocks["verdict"] == DIFFERS).sum())
        head = (f"{b} vs {a}: {n_diff} of {len(self.blocks)} blocks differ ({len(self.runs_a)} vs {len(self.runs_b)} "
                f"run(s), {len(self.steps)} step(s); {self.m} comparisons, {self.correction}-corrected at alpha "
                f"{self.alpha:g})")
        hits = self.table[self.table["verdict"] == DIFFERS]
        if hits.empty:
            unclear = int((self.blocks["verdict"] == UNCLEAR).sum())
            return head + (f"; {unclear} block(s) unclear ({self._unclear_why()})" if unclear
                           else ": no difference beyond the noise") + self._one_sided() + self._caveat()
        categorical = hits[hits["note"] != ""]
        if len(categorical):  # a block gone to zero or NaN on one side outweighs any finite ratio
            worst = categorical.iloc[0]
            return (head + f"; {worst['metric']} at block {worst['block']!r}: {worst['note']}" +
                    (f" ({len(categorical)} such)" if len(categorical) > 1 else "") + self._one_sided() +
                    self._caveat())
        worst = hits.loc[hits["diff"].abs().idxmax()]
        size = (f"x{worst['ratio']:.3g} [{math.exp(worst['low']):.3g}, {math.exp(worst['high']):.3g}]"
                if worst["scale"] == "log" else f"{worst['diff']:+.3g} [{worst['low']:+.3g}, {worst['high']:+.3g}]")
        return (head + f"; largest: {worst['metric']} at block {worst['block']!r}, {b}/{a} {size}" +
                self._one_sided() + self._caveat())

    def _unclear_why(self) -> str:
        """Why the unclear comparisons have no answer: their distinct notes, the first two."""
        notes = list(dict.fromkeys(n for n in self.table.loc[self.table["verdict"] == UNCLEAR, "note"] if n))
        return "; ".join(notes[:2]) + (f"; and {len(notes) - 2} other reason(s)" if len(notes) > 2 else "") or \
            "no interval"

    def _one_sided(self) -> str:
        """Which metrics ``metrics="all"`` could not compare, so the summary never reads as covering them."""
        if not self.one_sided:
            return ""
        return ". Not compared, recorded on one side only: " + ", ".join(
            f"{m} (only {side})" for m, side in self.one_sided.items())

    def _caveat(self) -> str:
        """What the summary must add when the noise came from steps, not seeds (one run per side): two seeds of one
        configuration can then 'differ', since seed-to-seed differences are not in the interval."""
        if "spread" not in self.table.columns or not (self.table["spread"] == "steps").any():
            return ""
        return (". Caution: one run per side, so the noise is each run's step-to-step spread, which leaves out "
                "seed-to-seed differences (two seeds of one configuration can differ by it): compare several seeds "
                "per side before concluding")


def _phases(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return PHASE in a.columns and PHASE in b.columns


def compare(a: Side, b: Side, *, metrics: Union[str, Sequence[str]] = DEFAULT_COMPARED,
            steps: Union[None, str, Sequence[int]] = None, alpha: float = 0.05, correction: str = "holm",
            labels: Tuple[str, str] = ("A", "B")) -> Comparison:
    """Compare the signals of two configurations, block by block, against seed (or step-to-step) noise.

    Args:
        a: side A: a frame, a records folder or file (``records.parquet``/``.csv``), or a list of them (each item a seed); every run in a side counts as
            a seed of that side's configuration.
        b: side B, the same kinds.
        metrics: the metrics compared (default ``act_var`` and ``grad_norm``), or ``"all"`` (every metric both
            sides recorded).
        steps: the steps compared (default: every step both sides recorded; ``"first"``/``"last"``: that one).
        alpha: the family-wise error rate.
        correction: ``"holm"`` (default) or ``"bonferroni"``.
        labels: names of the two sides in the summary and figure.

    Returns:
        a :class:`Comparison` (``.table``, ``.blocks``, ``.differs``, ``.summary()``).
    """
    if correction not in ("holm", "bonferroni"):
        raise DataError(f"correction={correction!r}: use 'holm' or 'bonferroni'")
    if not 0 < alpha < 1:
        raise DataError(f"alpha={alpha!r} is not in (0, 1)")
    fa, fb = side_frame(a, labels[0]), side_frame(b, labels[1])
    common = sorted(set(fa[S.METRIC]) & set(fb[S.METRIC]))
    one_sided: Dict[str, str] = {}
    if metrics == "all":
        chosen = [m for m in S.ALL_METRICS if m in common]
        for label, mine, other in ((labels[0], fa, fb), (labels[1], fb, fa)):
            alone = set(mine[S.METRIC]) - set(other[S.METRIC])
            one_sided.update((m, label) for m in S.ALL_METRICS if m in alone)
    else:
        chosen = [metrics] if isinstance(metrics, str) else list(metrics)
        absent = [m for m in chosen if m not in common]
        if absent:
            raise DataError(f"compare: metric(s) {absent} are not recorded on both sides; both have {common}")
    step_list = _steps(fa, fb, steps)
    va, vb = _run_values(fa, chosen, step_list), _run_values(fb, chosen, step_list)
    keys = ([PHASE] if _phases(fa, fb) else [])
    if keys:
        va, vb = va.join(fa[PHASE]), vb.join(fb[PHASE])
    table = _table(va, vb, keys, alpha, correction, tuple(labels))
    blocks = _block_verdicts(table, keys)
    if blocks["verdict"].isin([ONLY_A, ONLY_B]).all():  # nothing was compared: "no difference" would be false
        names = lambda f: sorted(set(f[S.BLOCK].astype(str)))[:6]  # noqa: E731
        raise DataError(f"compare: no block is recorded on both sides, so nothing can be compared ({labels[0]} has "
                        f"{names(fa)}..., {labels[1]} has {names(fb)}...); compare runs of the same model, whose "
                        f"block names match")
    return Comparison(table, blocks, alpha, correction, int(table["p"].notna().sum()),
                      sorted(set(fa[S.RUN])), sorted(set(fb[S.RUN])), step_list, tuple(labels), one_sided)


def _steps(fa: pd.DataFrame, fb: pd.DataFrame, steps: Union[None, str, Sequence[int]]) -> List[int]:
    common = sorted(set(int(s) for s in fa[S.STEP].dropna()) & set(int(s) for s in fb[S.STEP].dropna()))
    if not common:
        raise DataError(f"compare: the two sides share no recorded step (A: {sorted(set(fa[S.STEP]))[:5]}..., "
                        f"B: {sorted(set(fb[S.STEP]))[:5]}...)")
    if steps is None:
        return common
    if steps in ("first", "last"):
        return [common[0] if steps == "first" else common[-1]]
    if isinstance(steps, int):
        steps = [steps]
    chosen = [int(s) for s in steps]
    missing = [s for s in chosen if s not in common]
    if missing:
        raise DataError(f"compare: step(s) {missing} are not recorded on both sides; common steps: "
                        f"{common[:10]}{' ...' if len(common) > 10 else ''} ({len(common)} in all)")
    return chosen


def _table(va: pd.DataFrame, vb: pd.DataFrame, keys: List[str], alpha: float, correction: str,
           labels: Tuple[str, str] = ("A", "B")) -> pd.DataFrame:
    group = keys + [S.BLOCK, S.METRIC]
    rows: List[dict] = []
    ga, gb = dict(tuple(va.groupby(group, sort=False))), dict(tuple(vb.groupby(group, sort=False)))
    for key in list(dict.fromkeys(list(ga) + list(gb))):
        key_t = key if isinstance(key, tuple) else (key,)
        row = dict(zip(group, key_t))
        metric = row[S.METRIC]
        row["scale"] = "log" if metric in LOG_METRICS else "linear"
        da, db = ga.get(key), gb.get(key)
        both = [d for d in (da, db) if d is not None]
        row["depth"] = int(min(d[S.DEPTH].min() for d in both)) if S.DEPTH in both[0].columns else -1
        if da is None or db is None:
            row.update(verdict=ONLY_B if da is None else ONLY_A, p=math.nan)
            rows.append(row)
            continue
        decided = _degenerate(da, db, labels)
        if decided is not None:
            verdict, diff, note, left_out = decided
            if left_out is None:
                row.update(n_a=da[S.RUN].nunique(), n_b=db[S.RUN].nunique(), spread="none", diff=diff,
                           verdict=verdict, note=note, p=math.nan)
                rows.append(row)
                continue
            row["note"] = note
            da, db = da[da["state"] == OK], db[db["state"] == OK]
        a_runs = da.groupby(S.RUN)[S.VALUE].mean().to_numpy()
        b_runs = db.groupby(S.RUN)[S.VALUE].mean().to_numpy()
        a_steps, b_steps = da[S.VALUE].to_numpy(), db[S.VALUE].to_numpy()
        diff = float(b_runs.mean() - a_runs.mean())
        se, df, spread = _noise(a_runs, b_runs, a_steps, b_steps)
        row.update(n_a=int(a_runs.size), n_b=int(b_runs.size), spread=spread, mean_a=float(a_runs.mean()),
                   mean_b=float(b_runs.mean()), diff=diff, se=se, df=df, p=_p_value(diff, se, df))
        why = (f"no spread: the {'steps' if spread == 'steps' else 'runs'} of a side repeat each other exactly (a "
               f"run passed twice, a constant value), so the difference cannot be judged against any noise"
               if se == 0 and diff != 0 else "no interval: one run and one step per side" if spread == "none" else "")
        row["note"] = "; ".join(n for n in (row.get("note", ""), why) if n)  # after any steps left out
        rows.append(row)
    table = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in table.columns:
            table[col] = math.nan
    m = int(table["p"].notna().sum())
    adjusted = holm(list(table["p"])) if correction == "holm" else \
        [min(1.0, p * m) if not math.isnan(p) else math.nan for p in table["p"]]
    table["p_adjusted"] = adjusted
    half = [t_quantile(1 - alpha / (2 * max(m, 1)), df) * se if math.isfinite(df) and math.isfinite(se) and df > 0
            else math.nan for df, se in zip(table["df"], table["se"])]
    table["low"], table["high"] = table["diff"] - half, table["diff"] + half
    with np.errstate(over="ignore"):
        table["ratio"] = np.where(table["scale"] == "log", np.exp(table["diff"].astype(float)), math.nan)
    table["note"] = [n if isinstance(n, str) else "" for n in table["note"]]
    verdict = [v if isinstance(v, str) else (UNCLEAR if math.isnan(pa) else (DIFFERS if pa < alpha else SAME))
               for v, pa in zip(table["verdict"], table["p_adjusted"])]
    table["verdict"] = verdict
    table = table.sort_values(keys + ["depth", S.BLOCK, S.METRIC], kind="stable").reset_index(drop=True)
    return table[keys + list(COLUMNS)]


def _block_verdicts(table: pd.DataFrame, keys: List[str]) -> pd.DataFrame:
    rows = []
    for key, g in table.groupby(keys + [S.BLOCK], sort=False):
        key_t = key if isinstance(key, tuple) else (key,)
        words = set(g["verdict"])
        if DIFFERS in words:
            verdict = DIFFERS
        elif words <= {SAME}:
            verdict = SAME
        elif words <= {ONLY_A} or words <= {ONLY_B}:
            verdict = words.pop()
        else:
            verdict = UNCLEAR
        row = dict(zip(keys + [S.BLOCK], key_t))
        row.update(depth=int(g["depth"].min()), verdict=verdict,
                   metrics_differing=" ".join(g.loc[g["verdict"] == DIFFERS, S.METRIC]))
        rows.append(row)
    return pd.DataFrame(rows, columns=keys + [S.BLOCK, "depth", "verdict", "metrics_differing"])
