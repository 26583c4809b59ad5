"""From what a study measured to the one :class:`~gradscope.analysis.results.Results` every renderer reads.

One :class:`~gradscope.analysis.Profiles` pass per phase; verdicts at initialisation (one row per run, with
theory, pooled over seeds) and over training (one row per recorded step, summarised as a trajectory, no theory);
the claims from those and from the losses (a recipe study's training claims from its final errors).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, List, Mapping, Optional

from gradscope import agreement as G
from gradscope import analysis as A
from gradscope.analysis.results import Claim, Results
from gradscope.analysis.trajectory import pool_seeds, trajectory
from gradscope.study.alerts import study_alerts
from gradscope.study.claims import all_claims, final_losses
from gradscope.study.error_claims import recipe_errors
from gradscope.study.run_noise import batch_noise
from gradscope.study.runs import Settings, StudyResult
from gradscope.study.training_claims import final_accuracy
from gradscope.words import FINISHED, INIT, PHASE, TRAIN


def evaluate(study: StudyResult, settings: Settings, title: Optional[str] = None, claims: bool = True) -> Results:
    """The results of ``study``: verdicts of both phases, pooled seeds, the training trajectory, the claims.

    ``claims``: False for studies the paper's claims do not speak about (a user's own model): no claims at all.
    Claims about training are left out when nothing trained (an initialisation-only study).
    """
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
    ran = [r for r in study.configs if len(study.losses) and (study.losses["run"] == r).any()]
    # a run that crashed or was stopped mid-training has no final loss to set beside the others' (its steps still
    # count for the alerts): only runs that ran every planned step make the final losses and training claims
    trained = [r for r in ran if r not in study.failed and (study.configs.get(r) or {}).get(FINISHED)]
    finals = final_losses(study.losses, trained, settings.final_window)
    accuracy = final_accuracy(study.losses, trained, settings.final_window)
    noise = batch_noise(study.losses, trained, settings.final_window) if trained else None
    # a recipe study (its settings name an error window) decides its training claims on the final errors
    errors = recipe_errors(study.losses, trained, getattr(settings, "error_window", None), study.configs)
    answered = (all_claims(pooled, study.configs, finals, settings.describe(), traj, accuracy, errors, noise)
                if claims and pooled is not None else [])
    notes = [f"run {run} failed: {why}; its records so far are kept" for run, why in study.failed.items()]
    if study.interrupted:
        notes.append("interrupted: the results cover the steps recorded before the interruption")
    decay = (settings.lr, settings.weight_decay, settings.momentum)
    # nothing trained (--init-only, --steps 0): no alerts checked, so no "no alerts over training" either
    alerts = study_alerts(frames[TRAIN], study.losses, decay=decay) \
        if frames[TRAIN] is not None and len(frames[TRAIN]) and ran else None
    return Results(title=title or profile_title(study.configs), frames=frames, profiles=profiles,
                   verdicts=verdicts, pooled=pooled, trajectory=traj, losses=study.losses, final_losses=finals,
                   claims=applicable(answered, trained=bool(trained)), configs=study.configs,
                   settings=asdict(settings), notes=notes,
                   failed=dict(study.failed), interrupted=study.interrupted, planned=len(study.planned),
                   thresholds={"vanish": A.VANISH, "explode": A.EXPLODE,
                               "reference_blocks": A.REFERENCE_LAYERS}, alerts=alerts)


def applicable(claims: List[Claim], trained: bool) -> List[Claim]:
    """The claims that apply: those about training only when something trained."""
    return [c for c in claims if trained or c.phase != TRAIN]


def profile_title(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """The page title of a profile: its runs by name while they are few, else how many runs of which configurations
    (each run's ``config`` fact; a run without one is its own configuration)."""
    runs = list(configs)
    if len(runs) <= 4:
        return "gradscope profile: " + ", ".join(runs)
    bases = list(dict.fromkeys(str(configs[run].get("config") or run) for run in runs))
    shown = ", ".join(bases[:8]) + (f" and {len(bases) - 8} more" if len(bases) > 8 else "")
    return f"gradscope profile: {len(runs)} runs of {shown}"
