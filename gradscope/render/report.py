"""The ONE writer of a report folder: every file from one :class:`~gradscope.analysis.results.Results`.

Folder layout (names are fixed, so scripts and tests can rely on them)::

    report.html            claims first, then loss curves, verdicts at initialisation and over training, figures
    summary.md             the same in Markdown (names escaped); claims.md: the claims alone
    summary.json           the same as data (Results.summary())
    verdicts.csv           every verdict with its phase (init: per run, with theory; train: per recorded step)
    init_verdicts.csv      the init rows alone; trajectory.csv, pooled.csv, losses.csv when a study made them
    records.parquet/.csv   the main phase's frame (training when there is one) + records.dtypes.json
    init_records.parquet   the frame at initialisation (studies)
    heatmap_<metric>.png   block x step, log10 colour, one panel per run   (grad_norm, act_var, param_grad_norm)
    runs_<metric>.png      depth x run at one step (frames with several runs only)
    profile_<metric>.png   metric vs depth, log y, one line per run, rate thresholds and (init) theory

Every file is written atomically (:func:`gradscope.store.atomic_write`); files others hand in
(``Results.extra_files`` or ``extra_files=``, e.g. a provenance record) are written the same way, by this writer.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import pandas as pd

from gradscope import agreement as G
from gradscope import analysis as A
from gradscope import schema as S
from gradscope.analysis.curves import curves, has_curves, table6
from gradscope.analysis.results import INIT, PHASE, TRAIN, Results
from gradscope.analysis.trajectory import pool_seeds, trajectory
from gradscope.errors import DataError, OutputError
from gradscope.store import ALERTS_FILE, CSV, DTYPES, INIT_PARQUET, PARQUET, atomic_write, write_records

VERDICTS_CSV, SUMMARY, HTML, CLAIMS, SUMMARY_JSON = "verdicts.csv", "summary.md", "report.html", "claims.md", \
    "summary.json"
INIT_VERDICTS_CSV, TRAJECTORY_CSV, POOLED_CSV, LOSSES_CSV = "init_verdicts.csv", "trajectory.csv", "pooled.csv", \
    "losses.csv"
INIT_RECORDS = INIT_PARQUET
#: what a step of a frame at initialisation is, on the heatmaps' step axis
INIT_STEPS = "batch at initialisation (no update between batches)"
ALERTS_CSV = ALERTS_FILE  # the training alerts of every run: run + gradscope.schema.ALERT_COLUMNS
#: A recipe study's error curves (analysis.curves.CURVE_COLUMNS), their figure, and the Table 6 comparison.
ERROR_CURVES_CSV, ERROR_CURVES_PNG, TABLE6_CSV = "error_curves.csv", "error_curves.png", "table6.csv"
__all__ = ["CSV", "DTYPES", "HTML", "PARQUET", "SUMMARY", "VERDICTS_CSV", "draw_figures", "results_of_frame",
           "write_folder", "write_report"]


def _save(fig: Any, path: Path, dpi: int) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    return path


def draw_figures(frame: pd.DataFrame, out: Path, *, configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 step: A.StepArg = None, runs_step: A.StepArg = "first", vanish: float = A.VANISH,
                 explode: float = A.EXPLODE, dpi: int = 100, profiles: Optional[A.Profiles] = None,
                 theory: bool = True, steps_label: str = "training step") -> tuple[list[dict[str, str]], list[str]]:
    """Draw every figure the frame allows; return ``(figures, notes)``.

    Labels from data are escaped for matplotlib's math text (a ``$`` in a block name is drawn as itself), which
    stays on for matplotlib's own log-axis tick labels. Depth profiles draw one line per configuration (the
    ``config`` of ``configs`` or of the frame) with its seeds as a band.
    """
    from gradscope.render import plots as P

    profiles = profiles if profiles is not None else A.Profiles(frame)
    runs = A.run_names(frame)
    colors = P.run_colors(runs)
    groups = P.run_configurations(frame, P.configurations_of(configs))
    config_colors = P.run_colors(list(dict.fromkeys(groups.values())))
    present = set(pd.unique(frame[S.METRIC]))
    figures: list[dict[str, str]] = []
    notes: list[str] = []
    for metric in P.REPORT_METRICS:
        names = [f"heatmap_{metric}.png", f"profile_{metric}.png"] + ([f"runs_{metric}.png"] if len(runs) > 1
                                                                      else [])
        if metric not in present:
            notes.append(f"{metric} is not in the frame, so {', '.join(names)} were not drawn.")
            continue
        what = P.metric_label(metric)
        _save(P.heatmap_figure(frame, metric, colors=colors, xlabel=steps_label), out / names[0], dpi)
        figures.append({"file": names[0], "metric": metric,
                        "caption": f"log10 {metric} ({what}) per block (rows, depth order) and step, per run."})
        if len(runs) > 1:
            _save(P.runs_figure(frame, metric, step=runs_step, colors=colors), out / names[2], dpi)
            figures.append({"file": names[2], "metric": metric,
                            "caption": f"log10 {metric} by depth (rows) and run (columns) at step "
                                       f"{P.chosen_step(frame, metric, runs_step)}."})
        predicted = G.predicted_profiles(frame, metric, configs=configs, profiles=profiles) if theory else None
        use_profiles = profiles if metric in profiles.metrics else None
        _save(P.profile_figure(frame, metric, step=step, vanish=vanish, explode=explode, colors=config_colors,
                               predicted=predicted, profiles=use_profiles, groups=groups, configs=configs),
              out / names[1], dpi)
        ref = P.REFERENCE_END.get(metric)
        at = "geometric mean over the recorded batches" if step is None else f"step {step}"
        each = "one line per configuration (seeds: geometric mean, band: their range)"
        cap = (f"{metric} across depth ({at}), relative to the {ref} block, {each}; dotted/dash-dot: "
               f"the per-block rate thresholds" + ("; dashed: theory at initialisation." if predicted else ".")
               if ref else f"{metric} across depth (absolute, log scale, {at}), {each}.")
        figures.append({"file": names[1], "metric": metric, "caption": cap})
    return figures, notes


def results_of_frame(frame: pd.DataFrame, *, configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                     phase: str = TRAIN, vanish: float = A.VANISH, explode: float = A.EXPLODE,
                     title: str = "gradscope report", batch_size: Optional[int] = None) -> Results:
    """The Results of a plain frame: ``phase="init"`` (one verdict per run, with theory and seeds pooled) or
    ``"train"`` (one verdict per recorded step and a trajectory, no theory). No claims: those need a study."""
    if phase not in (INIT, TRAIN):
        raise DataError(f"phase={phase!r}: use 'init' (a frame at initialisation) or 'train'")
    profiles = A.Profiles(frame)
    if phase == INIT:
        v = G.verdicts(frame, step=None, vanish=vanish, explode=explode, configs=configs, batch_size=batch_size,
                       profiles=profiles)
        pooled, traj = pool_seeds(v), None
    else:
        v = A.verdicts(frame, step="all", vanish=vanish, explode=explode, profiles=profiles, configs=configs)
        pooled, traj = None, trajectory(v)
    return Results(title=title, frames={phase: frame}, profiles={phase: profiles},
                   verdicts={phase: v.assign(**{PHASE: phase})}, pooled=pooled, trajectory=traj,
                   configs={k: dict(c) for k, c in (configs or {}).items()},
                   thresholds={"vanish": vanish, "explode": explode, "reference_blocks": A.REFERENCE_BLOCKS})


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def write_folder(results: Results, out: Union[str, Path], *, format: str = "full", dpi: int = 100,
                 runs_step: A.StepArg = "first",
                 extra_files: Optional[Dict[str, Callable[[Any], None]]] = None) -> Path:
    """Write every file of the report folder ``out`` from ``results``; return the folder.

    ``format="records"`` leaves out figures and the HTML page. ``extra_files``: name -> ``fn(tmp_path)`` writers
    (added to ``results.extra_files``), each written atomically into the folder.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create report folder {str(out)!r}: {exc}. Pass a writable path.") from exc
    phases = results.phases()
    if not phases:
        raise DataError("the frame is empty: nothing to report. Record at least one step (scope.step()) first.")
    main = TRAIN if TRAIN in phases else phases[0]
    write_records(results.frames[main], out)
    if INIT in phases and main != INIT:
        atomic_write(out / INIT_RECORDS, lambda tmp: results.frames[INIT].to_parquet(tmp, index=False))
    all_v = pd.concat([results.verdicts[p] for p in phases if p in results.verdicts], ignore_index=True)
    _write_csv(out / VERDICTS_CSV, all_v)
    if INIT in results.verdicts:
        _write_csv(out / INIT_VERDICTS_CSV, results.verdicts[INIT])
    for name, df in ((TRAJECTORY_CSV, results.trajectory), (POOLED_CSV, results.pooled),
                     (LOSSES_CSV, results.losses)):
        if df is not None and len(df):
            _write_csv(out / name, df)
    if results.alerts is not None:  # written even when empty: "checked, none" is an answer
        _write_csv(out / ALERTS_CSV, results.alerts)
    from gradscope.render.markdown import claims_markdown, summary_markdown

    figures: list[dict[str, str]] = []
    notes: list[str] = []
    if format == "full":
        figures, notes = draw_figures(results.frames[main], out, configs=results.configs,
                                      step=None if main == INIT else "last", runs_step=runs_step,
                                      vanish=results.thresholds.get("vanish", A.VANISH),
                                      explode=results.thresholds.get("explode", A.EXPLODE), dpi=dpi,
                                      profiles=results.profiles.get(main), theory=main == INIT,
                                      steps_label=INIT_STEPS if main == INIT else "training step")
    if has_curves(results.losses):  # a recipe study: Fig. 6's error curves and Table 6's comparison
        curve_rows = curves(results.losses, results.configs)
        _write_csv(out / ERROR_CURVES_CSV, curve_rows)
        _write_csv(out / TABLE6_CSV, table6(curve_rows))
        if format == "full":
            from gradscope.render.curves import error_figure

            _save(error_figure(curve_rows), out / ERROR_CURVES_PNG, dpi)
            figures.append({"file": ERROR_CURVES_PNG, "metric": "error",
                            "caption": "Training error (dashed) and test error (bold) over iterations, as in He et "
                                       "al. 2016, Fig. 6; bands span the seeds. Final test errors beside the "
                                       f"paper's Table 6: {TABLE6_CSV}."})
    _write_text(out / SUMMARY, summary_markdown(results, figures, notes))
    _write_text(out / CLAIMS, claims_markdown(results))
    summary = {"report": str(out), **results.summary()}
    _write_text(out / SUMMARY_JSON, json.dumps(summary, indent=1, default=str) + "\n")
    if format == "full":
        from gradscope.render import interactive
        from gradscope.render.page import report_html

        charts = interactive.figures(results)
        js = interactive.plotly_js() if any(charts.values()) else ""
        _write_text(out / HTML, report_html(results, figures, notes, out, charts, js))
    for name, writer in {**results.extra_files, **(extra_files or {})}.items():
        atomic_write(out / name, writer)
    return out


#: recorded losses whose mean is a finished run's final loss, for a run of ``attach()`` or a callback
FINAL_WINDOW = 10


def run_findings(alerts: Optional[pd.DataFrame], losses: Mapping[int, float], finished: bool,
                 run: str = A.DEFAULT_RUN) -> Dict[str, Any]:
    """:func:`write_report` keywords for what one run found and was given while training: its alerts (columns
    :data:`gradscope.schema.ALERT_COLUMNS`; None: not checked), its losses (``{step: loss}``) and, when it finished,
    its final loss: the mean of its last :data:`FINAL_WINDOW` recorded losses, NaN when any loss of the run is."""
    out: Dict[str, Any] = {} if alerts is None else {"alerts": alerts.assign(**{S.RUN: run})}
    pairs = sorted(losses.items())
    if pairs:
        out["losses"] = pd.DataFrame({S.RUN: run, S.STEP: [s for s, _ in pairs], "loss": [v for _, v in pairs]})
        if finished:
            tail = [v for _, v in pairs[-FINAL_WINDOW:]]
            nan = any(v != v for _, v in pairs)
            out["final_losses"] = {run: float("nan") if nan else sum(tail) / len(tail)}
    return out


def write_report(frame: pd.DataFrame, out: Union[str, Path] = "gradscope-report", *,
                 configs: Optional[Mapping[str, Mapping[str, Any]]] = None, step: A.StepArg = None,
                 runs_step: A.StepArg = "first", vanish: float = A.VANISH, explode: float = A.EXPLODE,
                 title: str = "gradscope report", dpi: int = 100, phase: Optional[str] = None,
                 batch_size: Optional[int] = None, notes: Sequence[str] = (), interrupted: bool = False,
                 planned: int = 0, no_claims_why: Optional[str] = None,
                 finished: Optional[Sequence[str]] = None, alerts: Optional[pd.DataFrame] = None,
                 losses: Optional[pd.DataFrame] = None,
                 final_losses: Optional[Mapping[str, float]] = None) -> Path:
    """Write the report folder ``out`` for a frame and return its path (:func:`write_folder` does the writing).

    ``notes``, ``interrupted``, ``planned`` (runs a study meant to measure), ``no_claims_why`` and ``finished``
    (runs known to have finished) go to the results as they are (``gradscope report`` on a profile's folder says
    with them what it could not rebuild). ``alerts`` (columns ``run`` + :data:`gradscope.schema.ALERT_COLUMNS`),
    ``losses`` (``run, step, loss``) and ``final_losses`` (run -> loss) are what a run found and was given while
    training (``gradscope report`` on an ``attach(out=...)`` folder reads them from it).

    ``phase``: "init" for a frame measured at initialisation (verdicts per run, with theory from ``configs``),
    "train" for a training frame (verdicts per recorded step, a trajectory, no theory); None: "init" when the frame
    has a single recorded step and ``configs`` are given, else "train". A frame with a ``phase`` column (a study's)
    is split into both. ``step`` is no longer used (verdicts are per step or per run as above); passing it warns.
    """
    if step is not None:
        warnings.warn("write_report(step=...) is ignored: a training frame gets one verdict per recorded step and a "
                      "trajectory summary, an initialisation frame one verdict per run (phase=...)",
                      DeprecationWarning, stacklevel=2)
    A.check_frame(frame)
    if frame.empty:
        raise DataError("the frame is empty: nothing to report. Record at least one step (scope.step()) first.")
    if PHASE in frame.columns:
        parts = {p: frame[frame[PHASE] == p].drop(columns=PHASE) for p in (INIT, TRAIN)}
        parts = {p: f.reset_index(drop=True) for p, f in parts.items() if len(f)}
        res = [results_of_frame(f, configs=configs, phase=p, vanish=vanish, explode=explode, title=title,
                                batch_size=batch_size) for p, f in parts.items()]
        results = res[0]
        for r in res[1:]:
            results.frames.update(r.frames), results.profiles.update(r.profiles), results.verdicts.update(r.verdicts)
            results.pooled = results.pooled if results.pooled is not None else r.pooled
            results.trajectory = results.trajectory if results.trajectory is not None else r.trajectory
    else:
        if phase is None:
            phase = INIT if configs and A.steps_of(frame).size == 1 else TRAIN
        results = results_of_frame(frame, configs=configs, phase=phase, vanish=vanish, explode=explode,
                                   title=title, batch_size=batch_size)
    results.notes = list(results.notes) + list(notes)
    results.interrupted, results.planned, results.no_claims_why = interrupted, planned, no_claims_why
    results.finished_known = None if finished is None else list(finished)
    if alerts is not None:
        results.alerts = alerts[[S.RUN] + [c for c in alerts.columns if c != S.RUN]].reset_index(drop=True)
    if losses is not None:
        results.losses = losses.reset_index(drop=True)
    if final_losses:
        results.final_losses = dict(final_losses)
    return write_folder(results, out, dpi=dpi, runs_step=runs_step)
