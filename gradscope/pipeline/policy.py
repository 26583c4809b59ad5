"""What a profile's results mean for a caller: the ``--fail-on`` kinds and the exit status.

``fail_on(results, kinds)`` lists what was met, one line each; :func:`outcome` turns results into the status the
CLI exits with (0 ok, 1 a run failed, 3 a ``--fail-on`` kind was met, 130/143 interrupted) and the lines it
prints. The CLI and :func:`gradscope.profile` (for the provenance record) use these two and nothing else.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from gradscope.errors import GradscopeError
from gradscope.schema import ALERT_KINDS, DIVERGENCE, GRAD_SPIKE, LOSS_SPIKE, UPDATE_BAND
from gradscope.words import DIVERGED, EXPLODING, INIT, PHASE_WORDS, TRAIN, UNKNOWN, VANISHING

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FAIL_ON, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process killed by SIGTERM


def steps_text(steps: List[int], shown: int = 5) -> str:
    """``steps [4, 5, 6, 7, 8] and 1 more (to step 9)``: the first few steps, and how many more up to which."""
    if len(steps) <= shown:
        return f"steps {steps}"
    return f"steps {steps[:shown]} and {len(steps) - shown} more (to step {steps[-1]})"


def _verdicts_met(phase: str, verdict: str) -> Callable[[Any], List[str]]:
    def check(results: Any) -> List[str]:
        v = results.verdicts.get(phase)
        if v is None:
            return []
        hit = v[v["verdict"] == verdict]
        where = hit.groupby(["run", "signal"], sort=False)["step"].agg(lambda s: s.dropna().astype(int).tolist())
        return [f"{run} {sig} {verdict} {PHASE_WORDS[INIT] if phase == INIT else 'at ' + steps_text(steps)}"
                for (run, sig), steps in where.items()]
    return check


def _diverged(results: Any) -> List[str]:
    out = [m for phase in (INIT, TRAIN) for m in _verdicts_met(phase, DIVERGED)(results)]
    out += [f"{run} training loss NaN" for run, loss in results.final_losses.items() if loss != loss]
    return out


def _alerts_met(kind: str) -> Callable[[Any], List[str]]:
    def check(results: Any) -> List[str]:
        a = results.alerts
        if a is None or not len(a):
            return []
        hit = a[a["kind"] == kind]
        return [f"{r['run']} {kind} at step {r['step']}" + (f", block {r['block']}" if isinstance(r["block"], str)
                                                             and r["block"] else "")
                for r in hit.to_dict("records")]
    return check


#: ``--fail-on`` kinds: name -> (help, check(results) -> what was met). Add a kind here and nowhere else.
FAIL_ON: Dict[str, Tuple[str, Callable[[Any], List[str]]]] = {
    VANISHING: ("a verdict at initialisation is vanishing", _verdicts_met(INIT, VANISHING)),
    EXPLODING: ("a verdict at initialisation is exploding", _verdicts_met(INIT, EXPLODING)),
    UNKNOWN: ("a verdict at initialisation is unknown", _verdicts_met(INIT, UNKNOWN)),
    f"{TRAIN}-{VANISHING}": ("a recorded training step is vanishing", _verdicts_met(TRAIN, VANISHING)),
    f"{TRAIN}-{EXPLODING}": ("a recorded training step is exploding", _verdicts_met(TRAIN, EXPLODING)),
    DIVERGED: ("non-finite values in any phase, or a NaN training loss", _diverged),
    # the training alerts (gradscope.engine.alerts; alerts.csv): the same kinds as attach(on_anomaly=...)
    LOSS_SPIKE: ("an alert: the training loss spiked (robust z-score over recent steps)", _alerts_met(LOSS_SPIKE)),
    GRAD_SPIKE: ("an alert: a block's gradient norm spiked", _alerts_met(GRAD_SPIKE)),
    UPDATE_BAND: ("an alert: a block's update ratio left [1e-5, 1e-1]", _alerts_met(UPDATE_BAND)),
    DIVERGENCE: ("an alert: NaN/Inf first seen during training (names the block)", _alerts_met(DIVERGENCE)),
}
assert set(ALERT_KINDS) <= set(FAIL_ON)


def check_kinds(kinds: Sequence[str]) -> List[str]:
    """``kinds`` as a list, refusing names that are not :data:`FAIL_ON` kinds (one message naming them all)."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or ())
    unknown = [k for k in kinds if k not in FAIL_ON]
    if unknown:
        raise GradscopeError(f"--fail-on {','.join(map(str, unknown))}: choose from {', '.join(FAIL_ON)}")
    return kinds


def fail_on(results: Any, kinds: Sequence[str]) -> List[str]:
    """What of ``kinds`` the results meet, one line each (``plain20-nobn-s0 forward vanishing at initialisation``);
    an empty list when none is met."""
    return [m for kind in check_kinds(kinds) for m in FAIL_ON[kind][1](results)]


@dataclass
class Outcome:
    """The exit status of a profile and the lines (for stderr) that explain it."""

    status: int
    lines: List[str] = field(default_factory=list)


def outcome(results: Any, kinds: Sequence[str] = (), stopped_by: Optional[int] = None,
            where: str = "") -> Outcome:
    """The status a profile exits with: interrupted (130, or 143 when ``stopped_by`` is SIGTERM) before a failed
    run (1) before a met ``--fail-on`` kind (3); else 0. ``where``: the report folder, named in the lines."""
    at = f" in {where}" if where else ""
    if results.interrupted:
        status = EXIT_TERMINATED if stopped_by == signal.SIGTERM else EXIT_INTERRUPTED
        return Outcome(status, [f"interrupted; records so far are{at or ' kept'}"])
    if results.failed:
        return Outcome(EXIT_INTERNAL, [f"error: run {run} failed: {why}; its records so far are{at or ' kept'}"
                                       for run, why in results.failed.items()])
    met = fail_on(results, kinds)
    if met:
        return Outcome(EXIT_FAIL_ON, ["--fail-on met: " + "; ".join(met)])
    return Outcome(EXIT_OK)
