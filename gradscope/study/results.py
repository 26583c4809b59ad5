"""From what a study measured to the one :class:`~gradscope.analysis.results.Results` every renderer reads.

One :class:`~gradscope.analysis.Profiles` pass per phase; verdicts at initialisation (one row per run, with
theory, pooled over seeds) and over training (one row per recorded step, summarised as a trajectory, no theory);
the claims from those and from the losses.
"""
from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any, Mapping, Optional

from gradscope import agreement as G
from gradscope import analysis as A
from gradscope.analysis.results import INIT, PHASE, TRAIN, Results
from gradscope.analysis.trajectory import pool_seeds, trajectory
from gradscope.study.alerts import study_alerts
from gradscope.study.claims import all_claims, final_accuracy, final_losses
from gradscope.study.runs import Settings, StudyResult


def evaluate(study: StudyResult, settings: Settings, title: Optional[str] = None) -> Results:
    """The results of ``study``: verdicts of both phases, pooled seeds, the training trajectory, the claims."""
    frames = {INIT: study.phase(INIT), TRAIN: study.phase(TRAIN) if PHASE in study.frame.columns else None}
    profiles = {p: A.Profiles(f) for p, f in frames.items() if f is not None and len(f)}
    verdicts: dict[str, Any] = {}
    if INIT in profiles:
        v = G.verdicts(frames[INIT], step=None, configs=study.configs, batch_size=settings.batch_size,
                       profiles=profiles[INIT])
        verdicts[INIT] = v.assign(**{PHASE: INIT})
    if TRAIN in profiles:
        v = A.verdicts(frames[TRAIN], step="all", profiles=profiles[TRAIN], configs=study.configs)
        verdicts[TRAIN] = v.assign(**{PHASE: TRAIN})
    pooled = pool_seeds(verdicts[INIT]) if INIT in verdicts else None
    traj = trajectory(verdicts[TRAIN]) if TRAIN in verdicts else None
    trained = [r for r in study.configs if len(study.losses) and (study.losses["run"] == r).any()]
    finals = final_losses(study.losses, trained, settings.final_window)
    accuracy = final_accuracy(study.losses, trained, settings.final_window)
    claims = (all_claims(pooled, study.configs, finals, settings.describe(), traj, accuracy)
              if pooled is not None else [])
    notes = [f"run {run} failed: {why}; its records so far are kept" for run, why in study.failed.items()]
    if study.interrupted:
        notes.append("interrupted: the results cover the steps recorded before the interruption")
    alerts = study_alerts(frames[TRAIN], study.losses) if frames[TRAIN] is not None else None
    return Results(title=title or profile_title(study.configs), frames=frames, profiles=profiles,
                   verdicts=verdicts, pooled=pooled, trajectory=traj, losses=study.losses, final_losses=finals,
                   claims=claims, configs=study.configs, settings=asdict(settings), notes=notes,
                   failed=dict(study.failed), interrupted=study.interrupted,
                   thresholds={"vanish": A.VANISH, "explode": A.EXPLODE,
                               "reference_blocks": A.REFERENCE_LAYERS}, alerts=alerts)


def profile_title(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """The page title of a profile: its runs by name while they are few, else how many runs of which configurations
    (run names less their seed suffix ``-sN``)."""
    runs = list(configs)
    if len(runs) <= 4:
        return "gradscope profile: " + ", ".join(runs)
    bases = list(dict.fromkeys(re.sub(r"-s\d+$", "", run) for run in runs))
    shown = ", ".join(bases[:8]) + (f" and {len(bases) - 8} more" if len(bases) > 8 else "")
    return f"gradscope profile: {len(runs)} runs of {shown}"
