"""Theory beside measurement: fill the verdicts' theory columns and the depth profiles' dashed lines.

Pure functions of frames (pandas, no torch). For each run whose config is known (``configs[run]``, else the
frame's config columns ``model, bn, residual, shortcut, init``), :func:`gradscope.theory.predict` gives a
predicted profile over the run's blocks, and both profiles are reduced the same way:

* ``measured_factor`` / ``predicted_factor``: the per-block factor fitted in log space *within stages* (one
  intercept per stage, one common slope; stages = the run's blocks grouped as the model groups them, e.g.
  ``stage1.*``), of act_var for forward and of grad_norm (not squared) toward the input for backward. For
  single-stage nets (MLPs) this is the verdict's ``factor``. Stage boundaries are compared separately and named
  in ``theory_note`` where measurement and theory part there.
* ``agrees``: ``|ln measured - ln predicted| <= tol`` with ``tol = agree_tol + 0.5/width + 2.5 SE``:
  ``agree_tol`` (default :data:`AGREE_TOL` = 0.03 per block) for the mean-field approximations, ``0.5/width``
  for O(1/width) finite-width corrections (width: the narrowest layer, 16 channels for the CIFAR nets), and
  ``SE`` the noise of the difference, estimated from the block-to-block scatter of ``ln(measured/predicted)``
  (a random-walk model: a narrow net with one seed is noisy and gets a wider band, a wide one a tight band).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S
from gradscope import theory as T

AGREE_TOL = 0.03
#: Jumps at stage boundaries that differ from theory by more than this (in ln) are named in the note.
BOUNDARY_TOL = 0.15


def _clean(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    return v.item() if hasattr(v, "item") else v


def run_config(frame: pd.DataFrame, run: str, configs: Optional[Mapping[str, Mapping[str, Any]]]) -> Optional[dict]:
    """The config of ``run``: ``configs[run]`` if given, else the frame's config columns (None if neither)."""
    if configs and run in configs:
        return dict(configs[run])
    cols = [c for c in S.CONFIG_COLUMNS if c in frame.columns]
    if S.MODEL not in cols:
        return None
    rows = A._with_run(frame)
    row = rows[rows[S.RUN] == run].iloc[0]
    return {c: _clean(row[c]) for c in cols}


def _stage_labels(blocks: list[str]) -> list[int]:
    """Stage index per block: blocks that share a parent module name (``stage2`` of ``stage2.3``) share a stage."""
    parents = [b.rsplit(".", 1)[0] if "." in b else "" for b in blocks]
    order = {p: i for i, p in enumerate(dict.fromkeys(parents))}
    return [order[p] for p in parents]


def _prediction(frame: pd.DataFrame, run: str, configs, n_blocks: int) -> tuple[Optional[T.Prediction], str]:
    cfg = run_config(frame, run, configs)
    if cfg is None:
        return None, "no theory: the model's config is unknown (pass configs={run: model.gradscope_config})"
    full = T.complete_config(cfg, n_blocks)
    if full is None:
        return None, f"no theory for model {cfg.get('name') or cfg.get('model')!r}"
    start = A.profile(frame[A._with_run(frame)[S.RUN] == run], S.ACT_VAR)
    first = float(start[S.VALUE].iloc[0]) if len(start) else None
    pred = T.predict(full, forward_start=first, n_blocks=n_blocks)
    if pred is None:
        return None, f"no theory for {full.get('name') or full.get('model')} with this config"
    size = len(pred.forward or pred.backward or ())
    if size != n_blocks:
        return None, f"no comparison: the frame has {n_blocks} blocks of this run, the theory's model {size}"
    return pred, ""


def compare(measured: list[float], predicted: list[float], stages: list[int], *, backward: bool,
            width: Optional[int], agree_tol: float) -> dict[str, Any]:
    """Measured and predicted within-stage factors, the tolerance, and whether they agree."""
    mf = T.fit_factor(measured, stages, backward=backward)
    pf = T.fit_factor(predicted, stages, backward=backward)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(np.asarray(measured, float)) - np.log(np.asarray(predicted, float))
    inc = [r[k + 1] - r[k] for k in range(len(r) - 1)
           if stages[k] == stages[k + 1] and np.isfinite(r[k]) and np.isfinite(r[k + 1])]
    se = float(np.std(inc, ddof=1) * math.sqrt(1.2 / len(inc))) if len(inc) > 2 else 0.0
    tol = agree_tol + (0.5 / width if width else 0.0) + 2.5 * se
    diff = abs(math.log(mf) - math.log(pf)) if mf > 0 and pf > 0 else math.nan
    return {"measured": mf, "predicted": pf, "diff": diff, "tol": tol, "agrees": bool(diff <= tol)
            if not math.isnan(diff) else None, "r": r}


def _boundaries(r: np.ndarray, stages: list[int], blocks: list[str], backward: bool) -> list[str]:
    out = []
    for k in range(1, len(stages)):
        if stages[k] != stages[k - 1] and np.isfinite(r[k]) and np.isfinite(r[k - 1]):
            jump = (r[k - 1] - r[k]) if backward else (r[k] - r[k - 1])
            if abs(jump) > BOUNDARY_TOL:
                out.append(f"measurement and theory part at the stage boundary {blocks[k]}: the measured step "
                           f"there is x{math.exp(jump):.2f} the predicted one")
    return out


def verdicts(frame: pd.DataFrame, *, step: A.StepArg = None, vanish: float = A.VANISH, explode: float = A.EXPLODE,
             configs: Optional[Mapping[str, Mapping[str, Any]]] = None, theory: bool = True,
             agree_tol: Optional[float] = None) -> pd.DataFrame:
    """Measured verdicts (:func:`gradscope.analysis.verdicts`) with what theory predicts beside them.

    ``configs``: ``{run: gradscope_config}`` for theory predictions; otherwise the frame's config columns are used
    when present. ``theory=False`` gives the measurement alone. ``agree_tol``: see :data:`AGREE_TOL`.
    """
    out = A.verdicts(frame, step=step, vanish=vanish, explode=explode)
    return annotate(out, frame, configs=configs, agree_tol=agree_tol) if theory else out


def annotate(verdicts: pd.DataFrame, frame: pd.DataFrame, *, configs=None,
             agree_tol: Optional[float] = None) -> pd.DataFrame:
    """Fill ``predicted_factor, measured_factor, agrees, reference, theory_note`` of a verdicts frame."""
    out = verdicts.copy()
    out[A.AGREES] = pd.array([pd.NA] * len(out), dtype="boolean")
    for col in (A.REFERENCE, A.THEORY_NOTE):
        out[col] = out[col].astype(object)
    tol0 = AGREE_TOL if agree_tol is None else float(agree_tol)
    cache: dict[str, tuple[Optional[T.Prediction], str]] = {}
    profiles: dict[tuple[str, bool], pd.DataFrame] = {}
    for i, row in out.iterrows():
        run, signal = row[S.RUN], row[A.SIGNAL]
        metric, backward = A.SIGNALS[signal][0], signal == A.BACKWARD
        per_step = not pd.isna(row[S.STEP])
        if (metric, per_step) not in profiles:
            profiles[(metric, per_step)] = A.profile(frame, metric, step="all" if per_step else None)
        prof = profiles[(metric, per_step)]
        prof = prof[(prof[S.RUN] == run) & ((prof[S.STEP] == row[S.STEP]) if per_step else True)]
        prof = prof.sort_values(A.POSITION)
        n = int(prof[A.POSITION].max()) + 1 if len(prof) else 0
        if run not in cache:
            cache[run] = _prediction(frame, run, configs, n)
        pred, why = cache[run]
        profile = None if pred is None else (pred.backward if backward else pred.forward)
        if profile is None:
            reason = why or (pred.why_none if pred and pred.why_none else f"no {signal} theory for this model")
            out.at[i, A.THEORY_NOTE] = reason
            continue
        measured = [math.nan] * n
        for pos, val in zip(prof[A.POSITION], prof[S.VALUE]):
            measured[int(pos)] = float(val)
        blocks = list(prof[S.BLOCK])
        stages = _stage_labels(blocks) if len(blocks) == n else list(pred.stages)
        cfg = T.complete_config(run_config(frame, run, configs) or {}, n) or {}
        c = compare(measured, list(profile), stages, backward=backward, width=cfg.get("width"), agree_tol=tol0)
        out.at[i, A.MEASURED_FACTOR], out.at[i, A.PREDICTED_FACTOR] = c["measured"], c["predicted"]
        out.at[i, A.AGREES] = c["agrees"]
        out.at[i, A.REFERENCE] = pred.reference
        word = "agrees" if c["agrees"] else "PARTS"
        where = " within stages" if len(set(stages)) > 1 else ""
        note = (f"{word}: measured x{A._fmt_factor(c['measured'])} vs theory x{A._fmt_factor(c['predicted'])} "
                f"per block{where} "
                f"(|Δ ln| {c['diff']:.3f} {'<=' if c['agrees'] else '>'} tolerance {c['tol']:.3f})")
        extra = _boundaries(c["r"], stages, blocks, backward) if len(blocks) == n else []
        model_tol = tol0 + (0.5 / cfg["width"] if cfg.get("width") else 0.0)
        if c["agrees"] and c["diff"] > model_tol:
            extra.insert(0, f"agreement only within the noise band: |Δ ln| exceeds the model tolerance "
                            f"{model_tol:.3f}; more seeds or steps would tell")
        if not c["agrees"] or extra:
            extra += list(pred.notes)
        out.at[i, A.THEORY_NOTE] = "; ".join([note] + extra)
    return out


def predicted_profiles(frame: pd.DataFrame, metric: str, *, configs=None) -> Optional[dict[str, list[float]]]:
    """Predicted value per block travelled from the reference end (first block for act_var, last for grad_norm),
    relative to that end, per run with a prediction; None if no run has one. For the depth profiles' dashed line.
    """
    if metric not in (S.ACT_VAR, S.GRAD_NORM):
        return None
    prof = A.profile(frame, metric)
    out: dict[str, list[float]] = {}
    for run in A.run_names(frame):
        n = int((prof[prof[S.RUN] == run][A.POSITION].max() + 1) if (prof[S.RUN] == run).any() else 0)
        if n == 0:
            continue
        pred, _ = _prediction(frame, run, configs, n)
        p = None if pred is None else (pred.forward if metric == S.ACT_VAR else pred.backward)
        if p is not None:
            out[run] = list(p) if metric == S.ACT_VAR else list(p)[::-1]
    return out or None
