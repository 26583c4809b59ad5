"""Verdicts over training and over seeds: a trajectory summary per run, a pooled verdict per configuration.

* :func:`trajectory`: from per-step verdicts (``verdicts(frame, step="all")``), one row per run x signal with the
  fraction of recorded steps in each class, the first and last step's class and rate, and which end of the net
  moved between them. Never one average over steps.
* :func:`pool_seeds`: runs of one configuration (the ``config`` column: ``plain56-bn`` for ``plain56-bn-s0``,
  ``plain56-bn-s1``, ...) pooled per signal:
  the per-block factor as a geometric mean with its spread (sd of ln factor, SE), n, and how many seeds landed in
  each class. Diverged seeds are counted and named, never averaged in.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope import analysis as A

GROUP = "group"
TRAJECTORY_COLUMNS = ("run", "signal", "n_steps", "frac_healthy", "frac_vanishing", "frac_exploding",
                      "frac_diverged", "frac_unknown", "first_step", "first_verdict", "first_factor",
                      "first_end_to_end", "last_step", "last_verdict", "last_factor", "last_end_to_end",
                      "near_change", "far_change", "moved")
POOLED_COLUMNS = ("group", "signal", "n", "runs", "factor", "ln_sd", "ln_se", "factor_min", "factor_max",
                  "verdict", "counts", "diverged_runs", "n_blocks", "layers", "layer_factor", "unit")


def configurations(frame: pd.DataFrame) -> pd.Series:
    """The configuration of each row: its ``config`` column (a run's fact, the same for all its seeds), or the
    run itself where the frame has none (each run its own configuration; names are never parsed)."""
    if S.CONFIG in frame.columns:
        return frame[S.CONFIG].where(frame[S.CONFIG].notna(), frame[S.RUN]).astype(str)
    return frame[S.RUN].astype(str)


def config_of(configs: Mapping[str, Mapping[str, Any]], run: str) -> str:
    """The configuration of ``run`` from a study's configs (its ``config`` fact), else the run itself."""
    return str((configs.get(run) or {}).get(S.CONFIG) or run)


def _moved(near: float, far: float) -> str:
    """Which end's value changed more (in log) between the first and last step."""
    ln = [abs(math.log(x)) if x > 0 and math.isfinite(x) else math.inf if x == 0 or math.isinf(x) else math.nan
          for x in (near, far)]
    if any(math.isnan(x) for x in ln):
        return "n/a"
    if abs(ln[0] - ln[1]) < 0.1 * max(ln[0], ln[1], 1e-12):
        return "both ends"
    return "near end" if ln[0] > ln[1] else "far end"


def trajectory(per_step: pd.DataFrame) -> pd.DataFrame:
    """One row per run x signal summarising per-step verdicts (columns :data:`TRAJECTORY_COLUMNS`).

    ``near_change``/``far_change``: measured value at the near / far end, last step over first step;
    ``moved``: which of them changed more ("near end", "far end" or "both ends").
    """
    rows: list[dict[str, Any]] = []
    per_step = per_step[per_step[S.STEP].notna()]
    for (run, signal), g in per_step.groupby([S.RUN, A.SIGNAL], sort=False):
        g = g.sort_values(S.STEP)
        counts = g[A.VERDICT].value_counts()
        first, last = g.iloc[0], g.iloc[-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            near = float(np.float64(last[A.NEAR_VALUE]) / np.float64(first[A.NEAR_VALUE]))
            far = float(np.float64(last[A.FAR_VALUE]) / np.float64(first[A.FAR_VALUE]))
        row = {"run": run, "signal": signal, "n_steps": len(g)}
        row.update({f"frac_{c}": float(counts.get(c, 0)) / len(g) for c in A.CLASSES})
        for tag, r in (("first", first), ("last", last)):
            row.update({f"{tag}_step": int(r[S.STEP]), f"{tag}_verdict": r[A.VERDICT], f"{tag}_factor": r[A.FACTOR],
                        f"{tag}_end_to_end": r[A.END_TO_END]})
        row.update({"near_change": near, "far_change": far, "moved": _moved(near, far)})
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TRAJECTORY_COLUMNS))


def pool_seeds(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Runs that differ only by seed, pooled per signal (columns :data:`POOLED_COLUMNS`).

    ``factor`` is the geometric mean of the finite per-seed factors, ``ln_sd`` the sd of their logs (ddof 1),
    ``ln_se = ln_sd / sqrt(n)``; ``layer_factor``: the pooled factor per layer in amplitude units. ``verdict``
    (:func:`pooled_verdict`): ``diverged`` when any seed diverged (``diverged_runs`` names them), else the class
    every seed has on its own (each from its own fit interval, :func:`gradscope.analysis.classify`), or
    ``unknown`` when the seeds disagree or none settled its class; ``counts`` maps each class to its number of
    seeds.
    """
    v = verdicts.assign(**{GROUP: configurations(verdicts).to_numpy()})
    rows: list[dict[str, Any]] = []
    for (group, signal), g in v.groupby([GROUP, A.SIGNAL], sort=False):
        ok = g[(g[A.VERDICT] != A.DIVERGED) & np.isfinite(g[A.FACTOR].astype(float)) & (g[A.FACTOR] > 0)]
        ln = np.log(ok[A.FACTOR].to_numpy(dtype=float))
        n = int(ln.size)
        sd = float(np.std(ln, ddof=1)) if n >= 2 else math.nan
        factor = float(math.exp(ln.mean())) if n else math.nan
        diverged = [str(r) for r in g[g[A.VERDICT] == A.DIVERGED][S.RUN]]
        layers = float(g[A.LAYERS].iloc[0]) if A.LAYERS in g.columns and len(g) else 1.0
        verdict = pooled_verdict(g[A.VERDICT].tolist())
        rows.append({"group": group, "signal": signal, "n": n, "runs": [str(r) for r in g[S.RUN]],
                     "factor": factor, "ln_sd": sd, "ln_se": sd / math.sqrt(n) if n >= 2 else math.nan,
                     "factor_min": float(np.exp(ln.min())) if n else math.nan,
                     "factor_max": float(np.exp(ln.max())) if n else math.nan, "verdict": verdict,
                     "counts": {str(k): int(c) for k, c in g[A.VERDICT].value_counts().items()},
                     "diverged_runs": diverged, "n_blocks": int(g[A.N_BLOCKS].max() or 0), "layers": layers,
                     "layer_factor": A.layer_factor(factor, signal, layers),
                     "unit": str(g[A.UNIT].iloc[0]) if A.UNIT in g.columns and len(g) else "per block"})
    return pd.DataFrame(rows, columns=list(POOLED_COLUMNS))


def pooled_verdict(seed_verdicts: Sequence[str]) -> str:
    """The class of a configuration from its seeds' own classes: ``diverged`` if any seed diverged, else the one
    class all seeds share, else ``unknown``.

    Why not the class of the pooled factor: a geometric mean of a healthy seed and an exploding one can sit inside
    the healthy band, and a claim built on it would say "healthy" while half the evidence says otherwise. Each
    seed's class already carries its own fit interval (a seed whose interval straddles a threshold is ``unknown``),
    so a configuration has a class only when every seed settled on the same one.
    """
    classes = [str(v) for v in seed_verdicts]
    if A.DIVERGED in classes:
        return A.DIVERGED
    agreed = classes[0] if classes and all(c == classes[0] for c in classes) else A.UNKNOWN
    return agreed if agreed in A.CLASSES else A.UNKNOWN  # a missing verdict (NaN) is no class
