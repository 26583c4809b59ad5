"""Theory beside measurement: fill the verdicts' theory columns and the depth profiles' dashed lines.

Pure functions of frames (pandas, no torch), meant for frames at initialisation (the theory is about a freshly
initialised net). For each run whose config is known (``configs[run]``, else the frame's config columns),
:func:`gradscope.theory.predict` gives a predicted profile over the run's blocks, with the run's batch size and
image size: ``batch_size=`` here, else the batch the frame recorded (its ``batch_size`` rows), else the config's
``batch_size``; ``image_size`` from the config:

* ``measured_factor`` / ``predicted_factor``: the per-block factor fitted in log space *within stages* (one
  intercept per stage, one slope), of act_var forward and of grad_norm (not squared) toward the input backward.
* ``agreement`` (``agrees`` / ``disagrees`` / ``inconclusive``; ``agrees`` is the same as a nullable boolean), with
  ``Δ = |ln measured - ln predicted|`` and the tolerance ``model + noise``:

  - ``model`` = :data:`AGREE_TOL` (0.03 per block, the mean-field approximations) + ``0.5/width`` (O(1/width)
    finite-width corrections; width: the narrowest layer);
  - ``noise``, the measurement's own uncertainty: with several seeds of one configuration (runs ``x``, ``x-s1``,
    ...), ``t(0.975, n-1) · SE`` of the seeds' ln factors, and the seeds are judged together (one answer for the
    configuration, from the mean of their ln factors); with one seed, 2.5 SE from the block-to-block scatter of
    ``ln(measured/predicted)`` (a random-walk model), which needs three within-stage steps (fewer: the scatter is
    unknown and the answer ``inconclusive``). Seeds that measured exactly the same factor count as one run
    (identical runs are no independent evidence), and a seed that diverged is judged ``inconclusive`` on its own
    row, its configuration's other seeds without it.
  - ``disagrees`` when Δ > tolerance; ``inconclusive`` when Δ is within a tolerance wider than :data:`MAX_TOL`, or
    from one seed of a net narrower than :data:`WIDE` channels, whose seed-to-seed spread is not estimated, or
    where the prediction names an effect it leaves out (``backward_limit``: zero padding under BN); ``agrees``
    otherwise.

  The theory gives the *mean* over initialisations, the log-space fit the *typical* value; at 16 channels the two
  differ (Hanin & Rolnick 2018): plain-56 without BN measures x0.805 ± 0.060 per block over 8 seeds against a
  predicted x0.922. That gap is reported as a disagreement (it is real), not hidden in a wide single-seed band.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import numpy as np
import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S
from gradscope import theory as T
from gradscope.analysis import stats
from gradscope.analysis.text import factor as _factor
from gradscope.analysis.trajectory import configurations

AGREE_TOL = 0.03
#: Below this width (channels or units) one seed cannot show agreement: the seed-to-seed spread is too large.
WIDE = 64
#: A tolerance (in ln per block) wider than this cannot confirm agreement: the answer is "inconclusive".
MAX_TOL = 0.15
#: Jumps at stage boundaries that differ from theory by more than this (in ln) are named in the note.
BOUNDARY_TOL = 0.15
from gradscope.words import AGREES, DISAGREES, INCONCLUSIVE  # noqa: E402  (defined once, in gradscope.words)


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
    rows = A.with_run(frame)
    rows = rows[rows[S.RUN] == run]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return {c: _clean(row[c]) for c in cols}


def _stage_labels(blocks: list[str]) -> list[int]:
    """Stage index per block: blocks that share a parent module name (``stage2`` of ``stage2.3``) share a stage."""
    parents = [b.rsplit(".", 1)[0] if "." in b else "" for b in blocks]
    order = {p: i for i, p in enumerate(dict.fromkeys(parents))}
    return [order[p] for p in parents]


def _prediction(cfg: Optional[dict], first: Optional[float], n_blocks: int
                ) -> tuple[Optional[T.Prediction], str, dict]:
    if cfg is None:
        return None, "no theory: the model's config is unknown (pass configs={run: model.gradscope_config})", {}
    full = T.complete_config(cfg, n_blocks)
    if full is None:
        return None, f"no theory for model {cfg.get('name') or cfg.get('model')!r}", {}
    try:
        pred = T.predict(full, forward_start=first, n_blocks=n_blocks)
    except ValueError as exc:  # a setting outside the theory (a BN batch under 4 samples): the verdict stands
        return None, f"no theory: {exc}", full
    if pred is None:
        return None, f"no theory for {full.get('name') or full.get('model')} with this config", full
    size = len(pred.forward or pred.backward or ())
    if size != n_blocks:
        return None, f"no comparison: the frame has {n_blocks} blocks of this run, the theory's model {size}", full
    return pred, "", full


def compare(measured: list[float], predicted: list[float], stages: list[int], *, backward: bool) -> dict[str, Any]:
    """Measured and predicted within-stage factors, ``diff = |Δ ln|`` and the block-scatter SE of the difference."""
    mf = T.fit_factor(measured, stages, backward=backward)
    pf = T.fit_factor(predicted, stages, backward=backward)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(np.asarray(measured, float)) - np.log(np.asarray(predicted, float))
    inc = [r[k + 1] - r[k] for k in range(len(r) - 1)
           if stages[k] == stages[k + 1] and np.isfinite(r[k]) and np.isfinite(r[k + 1])]
    # fewer than three within-stage steps estimate no scatter: NaN (unknown), never 0 (certain)
    se = float(np.std(inc, ddof=1) * math.sqrt(1.2 / len(inc))) if len(inc) > 2 else math.nan
    diff = abs(math.log(mf) - math.log(pf)) if mf > 0 and pf > 0 else math.nan
    return {"measured": mf, "predicted": pf, "diff": diff, "se": se, "r": r}


def decide(diff: float, model_tol: float, noise: float, can_agree: bool = True) -> str:
    """``disagrees`` if ``diff > model_tol + noise``; ``inconclusive`` if the tolerance is wider than
    :data:`MAX_TOL` or ``can_agree`` is False; else ``agrees``."""
    if diff is None or math.isnan(diff):
        return INCONCLUSIVE
    tol = model_tol + noise
    if diff > tol:
        return DISAGREES
    return AGREES if can_agree and tol <= MAX_TOL else INCONCLUSIVE


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
             agree_tol: Optional[float] = None, batch_size: Optional[int] = None,
             profiles: Optional[A.Profiles] = None,
             layers_per_block: Union[None, float, Mapping[str, float]] = None) -> pd.DataFrame:
    """Measured verdicts (:func:`gradscope.analysis.verdicts`) with what theory predicts beside them.

    ``configs``: ``{run: gradscope_config}`` (with ``batch_size``/``image_size`` where known); otherwise the frame's
    config columns. ``batch_size``: overrides the batch of the measurement, which is otherwise read from the frame's
    ``batch_size`` rows (finite-batch BN rates, Yang et al. 2019 Theorem 8). ``theory=False`` gives the measurement
    alone. ``profiles``: a shared :class:`gradscope.analysis.Profiles` of ``frame``. ``layers_per_block``: how many
    weight layers a block spans (a number, or ``{run: number}``), where the block kind does not say
    (:func:`gradscope.analysis.block_layers`).
    """
    profiles = profiles if profiles is not None else A.Profiles(frame)
    out = A.verdicts(frame, step=step, vanish=vanish, explode=explode, profiles=profiles, configs=configs,
                     layers_per_block=layers_per_block)
    if not theory:
        return out
    return annotate(out, frame, configs=configs, agree_tol=agree_tol, batch_size=batch_size, profiles=profiles)


#: a block's ``param_norm`` that moved by more than this (relative) from its first recorded step was trained
PARAM_MOVED = 1e-6


def trained_from(frame: pd.DataFrame) -> dict[str, int]:
    """``{run: the last step whose forward saw the weights of initialisation}``: steps after it measure trained
    weights, which theory at initialisation does not describe.

    Read from a positive ``update_ratio`` row (the optimizer step of that step changed the weights), or, for a run
    recorded without the optimizer, from ``param_norm``: the recorded step before the first one at which some
    block's parameter norm moved from its first recorded value (by more than :data:`PARAM_MOVED`, relative). A run
    with neither stays as it comes."""
    if S.METRIC not in frame.columns:
        return {}
    out: dict[str, int] = {}
    rows = frame[(frame[S.METRIC] == S.UPDATE_RATIO) & (frame[S.VALUE] > 0)]
    if len(rows):
        out = {str(run): int(g[S.STEP].min()) for run, g in A.with_run(rows).groupby(S.RUN, sort=False)}
    norms = frame[frame[S.METRIC] == S.PARAM_NORM]
    for run, g in (A.with_run(norms).groupby(S.RUN, sort=False) if len(norms) else ()):
        wide = g.pivot_table(index=S.STEP, columns=S.BLOCK, values=S.VALUE, aggfunc="first").sort_index()
        if len(wide) < 2:
            continue
        first = wide.iloc[0]
        moved = ((wide - first).abs() > PARAM_MOVED * first.abs()).any(axis=1).to_numpy()
        if moved.any():
            before = int(wide.index[int(moved.argmax()) - 1])
            out[str(run)] = min(out.get(str(run), before), before)
    return out


def frame_batch_sizes(frame: pd.DataFrame) -> dict[str, int]:
    """``{run: batch size}`` from the frame's ``batch_size`` rows (the hooks saw every recorded batch): the most
    common value over the run's recorded steps (a last, smaller batch does not move it)."""
    if S.METRIC not in frame.columns:
        return {}
    rows = frame[frame[S.METRIC] == S.BATCH_SIZE]
    if rows.empty:
        return {}
    rows = A.with_run(rows)
    return {str(run): int(g[S.VALUE].mode().iloc[0]) for run, g in rows.groupby(S.RUN, sort=False)}


def _configs_with_batch(frame, configs, batch_size) -> dict[str, dict]:
    """Each run's config with the batch size the theory uses: ``batch_size=`` if given, else the one the frame
    recorded, else the config's own (none: the large-batch limit, said in the theory note)."""
    out = {}
    seen = frame_batch_sizes(frame)
    for run in A.run_names(frame):
        cfg = run_config(frame, run, configs)
        if cfg is not None:
            batch = batch_size or seen.get(run)
            if batch:
                cfg = {**cfg, "batch_size": int(batch)}
        out[run] = cfg
    return out


def annotate(verdicts: pd.DataFrame, frame: pd.DataFrame, *, configs=None, agree_tol: Optional[float] = None,
             batch_size: Optional[int] = None, profiles: Optional[A.Profiles] = None) -> pd.DataFrame:
    """Fill ``predicted_factor, measured_factor, agreement, agrees, reference, theory_note`` of a verdicts frame."""
    out = verdicts.copy()
    for col in (A.REFERENCE, A.THEORY_NOTE, A.AGREEMENT):
        out[col] = out[col].astype(object)
    tol0 = AGREE_TOL if agree_tol is None else float(agree_tol)
    profiles = profiles if profiles is not None else A.Profiles(frame)
    cfgs = _configs_with_batch(frame, configs, batch_size)
    first_var = profiles.get(S.ACT_VAR, None)
    preds: dict[str, tuple] = {}
    found: list[dict[str, Any]] = []
    trained = trained_from(frame)
    last = {str(run): int(g[S.STEP].max()) for run, g in A.with_run(frame).groupby(S.RUN, sort=False)} \
        if trained else {}
    for i, row in out.iterrows():
        run, signal = row[S.RUN], row[A.SIGNAL]
        metric, backward = A.SIGNALS[signal][0], signal == A.BACKWARD
        per_step = not pd.isna(row[S.STEP])
        update = trained.get(str(run))
        if update is not None and (row[S.STEP] if per_step else last.get(str(run), 0)) > update:
            out.at[i, A.THEORY_NOTE] = (f"no theory: the weights were updated at step {update} (an update_ratio row, "
                                        f"or param_norm moving after it) before what this verdict measured, and the "
                                        f"theory describes initialisation; judge a frame's first step "
                                        f"(step='first')")
            continue
        prof = profiles.get(metric, "all" if per_step else None)
        prof = prof[(prof[S.RUN] == run) & ((prof[S.STEP] == row[S.STEP]) if per_step else True)]
        n = int(prof[A.POSITION].max()) + 1 if len(prof) else 0
        if run not in preds:
            fv = first_var[first_var[S.RUN] == run][S.VALUE]
            preds[run] = _prediction(cfgs.get(run), float(fv.iloc[0]) if len(fv) else None, n)
        pred, why, full = preds[run]
        predicted = None if pred is None else (pred.backward if backward else pred.forward)
        if predicted is None:
            out.at[i, A.THEORY_NOTE] = why or (pred.why_none if pred and pred.why_none else
                                               f"no {signal} theory for this model")
            continue
        measured = [math.nan] * n
        for pos, val in zip(prof[A.POSITION], prof[S.VALUE]):
            measured[int(pos)] = float(val)
        blocks = list(prof[S.BLOCK])
        stages = _stage_labels(blocks) if len(blocks) == n else list(pred.stages)
        c = compare(measured, list(predicted), stages, backward=backward)
        width = full.get("width")
        c.update(i=i, run=run, signal=signal, width=width, pred=pred, per_step=per_step,
                 limit=pred.backward_limit if backward else "",
                 model_tol=tol0 + (0.5 / width if width else 0.0),
                 boundaries=_boundaries(c["r"], stages, blocks, backward) if len(blocks) == n else [],
                 diverged=row[A.VERDICT] == A.DIVERGED)
        found.append(c)
    for group in _groups(found, dict(zip(verdicts[S.RUN].astype(str), configurations(verdicts)))):
        _judge(out, group)
    out[A.AGREES] = pd.array([{AGREES: True, DISAGREES: False}.get(a, pd.NA) for a in out[A.AGREEMENT]],
                             dtype="boolean")
    return out


def _groups(found: list[dict[str, Any]], config: dict[str, str]) -> list[list[dict[str, Any]]]:
    """Comparisons judged together: seeds of one configuration and signal (init frames); per-step rows alone."""
    groups: dict[tuple, list] = {}
    for c in found:
        key = (c["i"],) if c["per_step"] else (config.get(str(c["run"]), str(c["run"])), c["signal"])
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def _distinct(values: list[float]) -> list[float]:
    """``values`` without those equal to an earlier one up to float rounding (:func:`stats.identical`): seeds that
    repeat a run exactly add no evidence and must not shrink the spread."""
    kept: list[float] = []
    for v in values:
        if not any(stats.identical(abs(v - k) / math.sqrt(2), [v, k]) for k in kept):
            kept.append(v)
    return kept


def _judge(out: pd.DataFrame, group: list[dict[str, Any]]) -> None:
    ok = [c for c in group if not c["diverged"] and c["measured"] > 0 and math.isfinite(c["measured"])]
    head = group[0]
    pf, model_tol, width, limit = head["predicted"], head["model_tol"], head["width"], head.get("limit", "")
    ln = _distinct([math.log(c["measured"]) for c in ok])
    mean, sd, se, n = stats.mean_sd_se(ln)
    repeated = ""
    if len(ln) < len(ok):  # identical runs are no independent evidence: each value counts once
        repeated = (f"; {len(ok) - len(ln)} of its {len(ok)} seeds measured exactly the factor of another, so "
                    f"{len(ln)} distinct run(s) count: identical runs are no independent evidence")
    if n >= 2:
        noise = stats.band(se, n)
        diff = abs(mean - math.log(pf))
        word = decide(diff, model_tol, noise, can_agree=not limit)
        how = (f"pooled over {n} seeds: measured x{_factor(math.exp(mean))} (sd of ln {sd:.3f}, SE {se:.3f}) vs "
               f"theory x{_factor(pf)} per block; |Δ ln| {diff:.3f} {'>' if word == DISAGREES else '<='} tolerance "
               f"{model_tol + noise:.3f} (model {model_tol:.3f} + t·SE {noise:.3f})")
    elif n == 1 and not math.isfinite(ok[0]["se"]):  # (one distinct run: the first seed stands for it)
        word, how = INCONCLUSIVE, (f"one seed: measured x{_factor(ok[0]['measured'])} vs theory x{_factor(pf)} per "
                                   f"block, but fewer than three within-stage steps between blocks estimate no block "
                                   f"scatter, so no tolerance for the noise is known")
    elif n == 1:
        c = ok[0]
        noise, diff = 2.5 * c["se"], c["diff"]
        narrow = bool(width) and width < WIDE
        word = decide(diff, model_tol, noise, can_agree=not narrow and not limit)
        how = (f"one seed: measured x{_factor(c['measured'])} vs theory x{_factor(pf)} per block; |Δ ln| "
               f"{diff:.3f} {'>' if word == DISAGREES else '<='} tolerance {model_tol + noise:.3f} (model "
               f"{model_tol:.3f} + 2.5 SE of the block scatter {noise:.3f})")
        if narrow and word == INCONCLUSIVE:
            how += (f"; a single seed of a {width}-channel net cannot show agreement: seeds spread by more than "
                    f"the tolerance (Hanin & Rolnick 2018); run several seeds")
    else:
        word, how = INCONCLUSIVE, "no finite measured factor (diverged or empty)"
    how += repeated
    notes = [f"{word}: {how}"] + ([limit] if limit else [])
    if width and width < WIDE and n >= 2:
        notes.append("theory gives the mean over initialisations, the log-space fit the typical value, lower at "
                     f"{width} channels (Hanin & Rolnick 2018); a gap from that is counted, not absorbed")
    judged = {id(c) for c in ok}
    left_out = [str(c["run"]) for c in group if id(c) not in judged]
    if left_out and ok:
        notes.append(f"left out (diverged or no finite factor): {', '.join(left_out)}")
    for c in group:
        i = c["i"]
        out.at[i, A.MEASURED_FACTOR], out.at[i, A.PREDICTED_FACTOR] = c["measured"], c["predicted"]
        own = word if id(c) in judged else INCONCLUSIVE  # a seed left out is not part of what agreed
        out.at[i, A.AGREEMENT] = own
        out.at[i, A.REFERENCE] = c["pred"].reference
        extra = list(c["boundaries"]) + list(c["pred"].notes)  # the theory's own limits, also beside "agrees"
        head_note = ([f"{INCONCLUSIVE}: this seed diverged or has no finite factor; the configuration's other seeds, "
                      f"judged without it"] if id(c) not in judged and ok else [])
        out.at[i, A.THEORY_NOTE] = "; ".join(head_note + notes + extra)


def predicted_profiles(frame: pd.DataFrame, metric: str, *, configs=None,
                       profiles: Optional[A.Profiles] = None) -> Optional[dict[str, list[float]]]:
    """Predicted value per block travelled from the reference end (first block for act_var, last for grad_norm),
    relative to that end, per run with a prediction; None if no run has one. For the depth profiles' dashed line.
    """
    if metric not in (S.ACT_VAR, S.GRAD_NORM):
        return None
    profiles = profiles if profiles is not None else A.Profiles(frame)
    prof = profiles.get(metric, None)
    first_var = profiles.get(S.ACT_VAR, None)
    out: dict[str, list[float]] = {}
    for run in A.run_names(frame):
        mine = prof[prof[S.RUN] == run]
        n = int(mine[A.POSITION].max() + 1) if len(mine) else 0
        if n == 0:
            continue
        fv = first_var[first_var[S.RUN] == run][S.VALUE]
        pred, _, _ = _prediction(run_config(frame, run, configs), float(fv.iloc[0]) if len(fv) else None, n)
        p = None if pred is None else (pred.forward if metric == S.ACT_VAR else pred.backward)
        if p is not None:
            out[run] = list(p) if metric == S.ACT_VAR else list(p)[::-1]
    return out or None
