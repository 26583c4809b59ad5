"""``gradscope report DIR`` on a profile's folder: what the records alone can rebuild, and what they cannot.

A profile's folder holds its records (``records/<run>/<phase>/`` parts, or ``records.parquet``) and its
``provenance.json`` (the runs it planned, the runs its results covered, whether it was interrupted). The records hold
no training losses and none of the run facts measured while running (number of classes, image size), so a report
rebuilt from them has no claims, no ``losses.csv`` and no alerts. Rather than say "the frame is not a study", the
rebuilt report says so plainly, keeps the profile's own answers beside it, covers the same runs as the profile's
results (not the runs cut off before they returned anything) and says when the study was interrupted.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

from gradscope import schema as S



def _profile_record(folder: Path) -> Dict[str, Any]:
    from gradscope.engine.provenance import PROVENANCE_FILE

    try:
        record = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if record.get("made_by") == "profile" else {}


def profile_rebuild(frame: Any, folder: Path, out: Path) -> Tuple[Any, Dict[str, Any]]:
    """``frame`` restricted to the runs the profile's results covered, and ``write_report`` keywords that say
    what could not be rebuilt and whether the study was interrupted; ``(frame, {})`` for a folder no profile
    wrote. When ``out`` is the profile's folder, its claims.md and summary.json are first copied to
    :data:`KEPT` names so that rebuilding never loses the profile's answers."""
    from gradscope.pipeline.core import FACTS, KEPT

    record = _profile_record(folder)
    if not record:
        return frame, {}
    runs = record.get("runs")
    notes = []
    if runs and S.RUN in frame.columns:
        cut = sorted(set(frame[S.RUN].astype(str)) - set(runs))
        frame = frame[frame[S.RUN].astype(str).isin(runs)].reset_index(drop=True)
        if cut:
            notes.append(f"left out {len(cut)} run(s) the profile's results did not cover (cut off before they "
                         f"returned): {', '.join(cut)}")
    kept = []
    if out.resolve() == folder.resolve():
        for name, copy in KEPT.items():
            if (folder / name).exists() and not (folder / copy).exists():
                shutil.copyfile(folder / name, folder / copy)
        kept = [copy for copy in KEPT.values() if (folder / copy).exists()]
    where = f"; the profile's own answers are kept in {' and '.join(kept)}" if kept else \
        "; the profile's own claims.md and summary.json (in its folder) hold them"
    why = ("this report is rebuilt from the profile's records alone, which hold no training losses and none of "
           "the run facts measured while running (number of classes, image size): the claims, the training "
           "losses (losses.csv) and the alerts over training (alerts.csv) are not rebuilt (a losses.csv or "
           "alerts.csv the profile wrote is left as it was)" + where)
    status = record.get("status")
    interrupted = bool(record.get("interrupted")) or status in ("running", "interrupted")
    if status == "running":
        notes.append("the profile never finished writing (killed): its provenance still says 'running'")
    return frame, {"notes": [why] + notes, "no_claims_why": why, "interrupted": interrupted,
                   "planned": len(record.get(FACTS) or {}), "finished": finished_runs(folder)}


def attach_rebuild(frame: Any, folder: Path) -> Dict[str, Any]:
    """``write_report`` keywords for a folder ``attach(out=...)`` wrote: the alerts it found (``alerts.csv``) and
    the losses given to ``scope.step(loss=...)`` (``losses-*.parquet``), so that the report shows what the run
    showed. The run's final loss (:func:`gradscope.render.report.run_findings`) only when its
    ``provenance.json`` says it finished. A Lightning or Hugging Face callback's folder keeps them in
    ``records/``. Files that cannot be read are left out with a note. ``{}`` for a profile's folder or a frame of
    several runs."""
    from gradscope import store
    from gradscope.analysis import DEFAULT_RUN
    from gradscope.errors import DataError
    from gradscope.render.report import run_findings

    if _profile_record(folder) or (S.RUN in frame.columns and frame[S.RUN].nunique() != 1):
        return {}
    run = str(frame[S.RUN].iloc[0]) if S.RUN in frame.columns else DEFAULT_RUN
    where = next((f for f in (folder, folder / "records") if (f / store.ALERTS_FILE).exists()
                  or any(f.glob(store.LOSS_PART_GLOB))), None)
    if where is None:
        return {}
    alerts, losses, notes = None, {}, []
    try:
        if (where / store.ALERTS_FILE).exists():
            alerts = store.read_alerts(where)
    except DataError as exc:
        notes.append(f"the run's alerts are not shown: {exc}")
    try:
        read = store.read_losses(where)
        losses = dict(zip(read[S.STEP].tolist(), read["loss"].tolist()))
    except DataError as exc:
        notes.append(f"the run's losses are not shown: {exc}")
    about = run_findings(alerts, losses, finished=_status(where, folder) == "finished", run=run)
    if notes:
        about["notes"] = notes
    return about


def _status(*places: Path) -> Any:
    """The ``status`` of the first readable ``provenance.json`` among ``places`` (None without one)."""
    from gradscope.engine.provenance import PROVENANCE_FILE

    for place in places:
        try:
            return json.loads((place / PROVENANCE_FILE).read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def finished_runs(folder: Path) -> list:
    """The runs of a profile's folder whose finished snapshot is complete (what ``--resume`` would load)."""
    from gradscope.study.executors import is_finished

    records = folder / "records"
    return sorted(p.name for p in records.iterdir() if p.is_dir() and is_finished(folder, p.name)) \
        if records.is_dir() else []
