"""The ONE results object a report folder, the terminal and ``summary.json`` are all rendered from.

Plain containers (pandas frames and dataclasses), filled by :func:`gradscope.study.evaluate.evaluate` for a study and
by :func:`gradscope.render.folder.results_of_frame` for a frame; read by :mod:`gradscope.render`.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from gradscope.words import FINISHED, INIT, PHASE, PHASE_WORDS, TRAIN  # noqa: F401  (the phase words, defined once)


@dataclass(frozen=True)
class Claim:
    """One claim: its statement, the answer (yes / no / unclear) and what decided it.

    ``phase``: "init", "train" or "init+train"; ``how``: the rule and how sure; ``caveat``: the short-run caveat
    that every training answer carries. ``estimate`` (in ``unit``) and its 95% interval ``low``..``high``: the one
    number that decided the answer, for the dashboards' claim tables (None where a claim has no such number).
    """

    key: str
    statement: str
    answer: str
    evidence: str
    phase: str = INIT
    how: str = ""
    caveat: str = ""
    estimate: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    unit: str = ""

    def line(self) -> str:
        """The claim as one line: statement [phase]: answer — evidence (rule) caveat."""
        tail = f" [rule: {self.how}]" if self.how else ""
        cav = f" Caveat: {self.caveat}." if self.caveat else ""
        return f"{self.statement} [{self.phase}]: {self.answer} — {self.evidence}.{tail}{cav}"

    def as_dict(self) -> Dict[str, str]:
        return asdict(self)


@dataclass
class Results:
    """Everything a report says, computed once.

    ``frames``/``profiles``/``verdicts``: per phase ("init", "train"); init verdicts are one row per run with the
    theory columns, train verdicts one row per run x recorded step (no theory: it describes initialisation).
    ``pooled``: init verdicts pooled over seeds; ``trajectory``: the training summary per run; ``losses``: run,
    step, loss, accuracy; ``alerts``: the training alerts (run + :data:`gradscope.schema.ALERT_COLUMNS`; None when
    nothing was trained); ``final_losses``: run -> mean of the last steps; ``extra_files``: name -> writer
    ``fn(path)`` for files others add to the folder (e.g. provenance), written atomically with the rest.
    """

    title: str
    frames: Dict[str, Any]
    profiles: Dict[str, Any]
    verdicts: Dict[str, Any]
    pooled: Any = None
    trajectory: Any = None
    losses: Any = None
    final_losses: Dict[str, float] = field(default_factory=dict)
    claims: List[Claim] = field(default_factory=list)
    configs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    extra_files: Dict[str, Callable[[Any], None]] = field(default_factory=dict)
    thresholds: Dict[str, float] = field(default_factory=dict)
    alerts: Any = None
    planned: int = 0  # runs the study meant to measure (0: unknown, e.g. a report rebuilt from records)
    #: why there is no claim, when it is not "the frame is not a study" (a report rebuilt from a profile's records)
    no_claims_why: Optional[str] = None
    #: runs known to have finished when the configs cannot say (a report rebuilt from a profile's records reads the
    #: ``records/<run>/finished/`` snapshots); None: not known
    finished_known: Optional[List[str]] = None

    def finished_runs(self) -> List[str]:
        """Runs whose every planned step ran (their ``finished`` config fact)."""
        return [r for r, c in self.configs.items() if (c or {}).get(FINISHED)]

    def interruption(self) -> Optional[str]:
        """One line for the top of every output of an interrupted study: how many runs of how many finished;
        None when the study was not interrupted."""
        if not self.interrupted:
            return None
        done, recorded = len(self.finished_runs()), len(self.configs)
        of = f" of {self.planned}" if self.planned else ""
        if not recorded:  # rebuilt from records: the configs cannot say which runs finished
            held = {str(r) for f in self.frames.values() if f is not None and "run" in f.columns for r in f["run"]}
            which = ("which of them finished is not in the records" if self.finished_known is None else
                     f"{len(set(self.finished_known) & held)} of them finished: their snapshots are what --resume "
                     f"loads")
            return (f"INTERRUPTED: the study was stopped before it finished; the records hold {len(held)}{of} runs "
                    f"({which}). Every answer below covers only what was recorded.")
        cut = recorded - done
        part = f" ({cut} more cut off part-way: counted in the results up to where it stopped)" if cut == 1 else \
            f" ({cut} more cut off part-way: counted in the results up to where they stopped)" if cut else ""
        return (f"INTERRUPTED: the study was stopped before it finished; {done}{of} runs finished{part}. "
                f"Every answer below covers only what was recorded.")

    def phases(self) -> List[str]:
        """Phases that hold records, in order."""
        return [p for p in (INIT, TRAIN) if p in self.frames and self.frames[p] is not None
                and len(self.frames[p])]

    def summary(self) -> Dict[str, Any]:
        """The JSON-able summary (``summary.json``, ``--json``): claims, verdicts per phase, losses."""
        import json

        def records(df: Any) -> Any:
            return [] if df is None else json.loads(df.to_json(orient="records", default_handler=str))

        return {"title": self.title, "interrupted": self.interrupted, "interruption": self.interruption(),
                "planned_runs": self.planned, "finished_runs": self.finished_runs(), "failed": dict(self.failed),
                "settings": dict(self.settings), "claims": [c.as_dict() for c in self.claims],
                "verdicts": {p: records(self.verdicts.get(p)) for p in self.phases()},
                "pooled": records(self.pooled), "trajectory": records(self.trajectory),
                "final_loss": {k: (v if math.isfinite(v) else None) for k, v in self.final_losses.items()},
                "alerts": records(self.alerts), "notes": list(self.notes)}
