"""Every table a report shows, as text cells (header first), built once and rendered by Markdown, HTML and rich.

Cells are plain text from the data; each renderer escapes them for its own format.
"""
from __future__ import annotations

from typing import Any, Dict, List

import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.analysis import stats
from gradscope.analysis.text import agreement_word, factor, is_missing, num, pm, times

Rows = List[List[str]]


def verdict_rows(v: pd.DataFrame, *, theory: bool = True) -> Rows:
    """One row per verdict: run, step, signal, verdict, rate, R², end to end (fit), near -> far end, theory."""
    head = ["run", "step", "signal", "verdict", "per block", "R²", "end to end (fit)", "near -> far end (measured)"]
    if theory:
        head += ["theory (per block)", "measured* (within stages)", "agreement"]
    rows = [head]
    for _, r in v.iterrows():
        st = "" if is_missing(r[S.STEP]) else str(int(r[S.STEP]))
        cells = [str(r[S.RUN]), st or "—", f"{r[A.SIGNAL]} ({r[S.METRIC]})", str(r[A.VERDICT]), times(r[A.FACTOR]),
                 num(r[A.R2], ".2f"), num(r[A.END_TO_END]) + ("" if is_missing(r[A.END_TO_END]) else "x"),
                 f"{num(r[A.NEAR_VALUE])} -> {num(r[A.FAR_VALUE])}"]
        if theory:
            cells += [times(r.get(A.PREDICTED_FACTOR)), times(r.get(A.MEASURED_FACTOR)),
                      agreement_word(r.get(A.AGREEMENT)) if not is_missing(r.get(A.PREDICTED_FACTOR)) else "—"]
        rows.append(cells)
    return rows


def pooled_rows(pooled: pd.DataFrame) -> Rows:
    """One row per configuration and signal at initialisation, pooled over seeds."""
    rows = [["configuration", "signal", "seeds", "per block (geo. mean)", "sd of ln", "range", "verdict",
             "seeds per class"]]
    for r in pooled.to_dict("records"):
        counts = ", ".join(f"{k} {c}" for k, c in r["counts"].items())
        rows.append([str(r["group"]), str(r["signal"]), str(r["n"]), times(r["factor"]), num(r["ln_sd"], ".3f"),
                     f"{times(r['factor_min'])} .. {times(r['factor_max'])}", str(r["verdict"]), counts])
    return rows


def trajectory_rows(traj: pd.DataFrame) -> Rows:
    """One row per run and signal over training: fraction of recorded steps per class, first and last step."""
    rows = [["run", "signal", "steps", "healthy", "vanishing", "exploding", "diverged", "first step",
             "last step", "end that moved"]]
    for r in traj.to_dict("records"):
        pct = [f"{100 * r[f'frac_{c}']:.0f}%" for c in ("healthy", "vanishing", "exploding", "diverged")]
        rows.append([str(r["run"]), str(r["signal"]), str(r["n_steps"])] + pct + [
            f"{r['first_step']}: {r['first_verdict']} {times(r['first_factor'])}",
            f"{r['last_step']}: {r['last_verdict']} {times(r['last_factor'])}",
            f"{r['moved']} (near x{factor(r['near_change'])}, far x{factor(r['far_change'])})"])
    return rows


def loss_rows(results: Any) -> Rows:
    """One row per configuration: final training loss over seeds (mean ± sd, n) and accuracy of the last steps."""
    from gradscope.analysis.trajectory import run_group

    rows = [["configuration", "final loss (mean ± sd, n)", "per seed", "diverged"]]
    groups: Dict[str, List[str]] = {}
    for run in results.final_losses:
        groups.setdefault(run_group(run), []).append(run)
    for group, runs in groups.items():
        values = [results.final_losses[r] for r in runs]
        mean, sd, _, n = stats.mean_sd_se(values)
        bad = [r for r, v in zip(runs, values) if is_missing(v)]
        rows.append([group, pm(mean, sd, n, ".3f"), ", ".join(num(v, ".3f", "NaN") for v in values),
                     ", ".join(bad) or "—"])
    return rows


def overview(frame: pd.DataFrame) -> str:
    """``60 records, 1 run(s), 3 recorded step(s) (0..2), 10 blocks at most per run; metrics: ...``."""
    steps = A.steps_of(frame)
    blocks = frame.groupby(A.with_run(frame)[S.RUN])[S.BLOCK].nunique()
    rng = f"{int(steps[0])}..{int(steps[-1])}" if steps.size else "none"
    return (f"{len(frame)} records, {len(blocks)} run(s), {steps.size} recorded step(s) ({rng}), "
            f"{int(blocks.max()) if len(blocks) else 0} blocks at most per run; metrics: "
            f"{', '.join(sorted(map(str, pd.unique(frame[S.METRIC]))))}.")


def how_text(thresholds: Dict[str, float]) -> str:
    """How verdicts are decided, in one paragraph (shown above every verdict table)."""
    lo, hi = A.rate_thresholds(thresholds.get("vanish", A.VANISH), thresholds.get("explode", A.EXPLODE))
    n = int(thresholds.get("reference_blocks", A.REFERENCE_BLOCKS))
    return (f"Per-block factor: a line fitted to log values across depth (call-0 rows); a signal is vanishing "
            f"below x{lo:.3f} and exploding above x{hi:.3f} per block (x{thresholds.get('vanish', A.VANISH):g} and "
            f"x{thresholds.get('explode', A.EXPLODE):g} over {n} blocks), so one rate gets one class at any depth; "
            f"diverged when a block held NaN/Inf. End to end is read from the fit; near/far end are the measured "
            f"values at the first/last block in the signal's direction (forward: first -> last block; backward: "
            f"last -> first).")


def theory_notes(v: pd.DataFrame) -> List[str]:
    """Where measurement and theory part, or where no theory applies: one sentence each."""
    out = []
    for _, r in v.iterrows():
        note = r.get(A.THEORY_NOTE)
        if isinstance(note, str) and note:
            out.append(f"{r[S.RUN]} ({r[A.SIGNAL]}): {note}")
    return out


def alert_rows(alerts: pd.DataFrame, limit: int = 20) -> Rows:
    """One row per training alert (the first ``limit``; a last row says how many more): run, step, kind, block
    first affected, value against threshold. See :mod:`gradscope.engine.alerts`."""
    rows = [["run", "step", "kind", "block", "value", "threshold", "also affected"]]
    for r in alerts.head(limit).to_dict("records"):
        block = r["block"] if isinstance(r["block"], str) and r["block"] else "(loss)"
        origin = r.get("origin")
        if isinstance(origin, str) and origin:  # a divergence traced to its operator (gradscope.engine.oporigin)
            block += f" (made by {origin})"
        others = r["others"].split() if isinstance(r["others"], str) else []
        rows.append([str(r[S.RUN]), str(r[S.STEP]), str(r["kind"]), block, num(r["value"], ".4g"),
                     num(r["threshold"], ".4g"), f"{len(others)} block(s)" if others else ""])
    if len(alerts) > limit:
        rows.append(["...", "", f"{len(alerts) - limit} more in alerts.csv", "", "", "", ""])
    return rows


def alerts_sentence(alerts: Any) -> str:
    """One line on the training alerts: how many of each kind, or that there were none."""
    if alerts is None:
        return "no training run: no alerts checked"
    if not len(alerts):
        return "no alerts over training (loss and gradient spikes, update ratios out of band, divergence)"
    counts = alerts["kind"].value_counts()
    return f"{len(alerts)} alert(s) over training: " + ", ".join(f"{n} {k}" for k, n in counts.items())
