"""Every table a report shows, as text cells (header first), built once and rendered by Markdown, HTML and rich.

Cells are plain text from the data; each renderer escapes them for its own format.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S
from gradscope import words as W
from gradscope.analysis import stats
from gradscope.analysis.text import agreement_word, factor, is_missing, num, pm, times
from gradscope.render.groups import by_configuration

Rows = List[List[str]]


def verdict_rows(v: pd.DataFrame, *, theory: bool = True) -> Rows:
    """One row per verdict: run, step, signal, verdict, rate, R², end to end (fit), near -> far end, theory."""
    head = ["run", "step", "signal", "verdict", "per block", "R²", "end to end (fit)", "near -> far end (measured)"]
    if theory:
        head += ["theory (per block)", "measured* (within stages)", "agreement"]
    rows = [head]
    for _, r in v.iterrows():
        st = "" if is_missing(r[S.STEP]) else str(int(r[S.STEP]))
        cells = [str(r[S.RUN]), st or "—", f"{r[A.SIGNAL]} ({r[S.METRIC]})", str(r[A.VERDICT]), _rate_cell(r),
                 num(r[A.R2], ".2f"), num(r[A.END_TO_END]) + ("" if is_missing(r[A.END_TO_END]) else "x"),
                 f"{num(r[A.NEAR_VALUE])} -> {num(r[A.FAR_VALUE])}"]
        if theory:
            cells += [times(r.get(A.PREDICTED_FACTOR)), times(r.get(A.MEASURED_FACTOR)),
                      agreement_word(r.get(A.AGREEMENT)) if not is_missing(r.get(A.PREDICTED_FACTOR)) else "—"]
        rows.append(cells)
    return rows


def _rate_cell(r: Any) -> str:
    """The fitted per-block factor with its 95% interval (``x0.86 (x0.49 to x1.48)``), when the row has one."""
    low, high = r.get(A.FACTOR_LOW), r.get(A.FACTOR_HIGH)
    rate = times(r[A.FACTOR])
    return rate if is_missing(low) or is_missing(high) or is_missing(r[A.FACTOR]) else \
        f"{rate} ({times(low)} to {times(high)})"


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
    rows = [["run", "signal", "steps", "healthy", "vanishing", "exploding", "diverged", "unknown", "first step",
             "last step", "end that moved"]]
    for r in traj.to_dict("records"):  # the five shares add up to 100% (unknown: the fit did not settle a class)
        pct = [f"{100 * r.get(f'frac_{c}', 0.0):.0f}%"
               for c in (W.HEALTHY, W.VANISHING, W.EXPLODING, W.DIVERGED, W.UNKNOWN)]
        rows.append([str(r["run"]), str(r["signal"]), str(r["n_steps"])] + pct + [
            f"{r['first_step']}: {r['first_verdict']} {times(r['first_factor'])}",
            f"{r['last_step']}: {r['last_verdict']} {times(r['last_factor'])}",
            f"{r['moved']} (near x{factor(r['near_change'])}, far x{factor(r['far_change'])})"])
    return rows


def loss_rows(results: Any) -> Rows:
    """One row per configuration: final training loss over seeds (mean ± sd, n) and accuracy of the last steps."""
    from gradscope.analysis.trajectory import config_of

    rows = [["configuration", "final loss (mean ± sd, n)", "per seed", "left out (why)"]]
    groups: Dict[str, List[str]] = {}
    failed = getattr(results, "failed", {}) or {}
    losses = getattr(results, "losses", None)
    ran = [str(r) for r in pd.unique(losses[S.RUN])] if losses is not None and len(losses) else []
    cut = [r for r in ran if r not in results.final_losses]  # crashed, or stopped before its last step
    listed = [*results.final_losses, *cut]
    for run in listed + [r for r in failed if r not in listed]:
        groups.setdefault(config_of(results.configs, run), []).append(run)
    for group, runs in groups.items():
        finished = [r for r in runs if r in results.final_losses]  # a run cut off part-way has no final loss
        values = [results.final_losses[r] for r in finished]
        mean, sd, _, n = stats.mean_sd_se(values)
        bad = [f"{r} (diverged)" for r, v in zip(finished, values) if is_missing(v)] + \
            [f"{r} ({'failed' if r in failed else 'stopped early'})" for r in runs if r not in finished]
        rows.append([group, pm(mean, sd, n, ".3f"), ", ".join(num(v, ".3f", "NaN") for v in values) or "—",
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
    lo, hi = A.layer_thresholds(thresholds.get("vanish", A.VANISH), thresholds.get("explode", A.EXPLODE))
    n = int(thresholds.get("reference_blocks", A.REFERENCE_LAYERS))
    return (f"Per-block factor: a line fitted to log values across depth (call-0 rows). Classes are judged per layer "
            f"in amplitude units (column layer_factor: the factor's root over the block's layers, and the square "
            f"root of a variance ratio forward), so a net gets one class whatever is called a block: vanishing "
            f"below x{lo:.3f} and exploding above x{hi:.3f} per layer (x{thresholds.get('vanish', A.VANISH):g} and "
            f"x{thresholds.get('explode', A.EXPLODE):g} in amplitude over {n} layers); diverged when a block held "
            f"NaN/Inf. End to end is read from the fit; near/far end are the measured values at the first/last block "
            f"in the signal's direction (forward: first -> last block; backward: last -> first). Where the fit "
            f"is healthy or unknown but the ends differ by more than the whole band beyond the profile's noise (a "
            f"cliff at one block), the ends decide, end to end is their ratio and the reason says so.")


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
    first affected, the metric and its value against the threshold. See :mod:`gradscope.engine.alerts`."""
    rows = [["run", "step", "kind", "block", "metric", "value", "threshold", "also affected"]]
    for r in alerts.head(limit).to_dict("records"):
        block = r["block"] if isinstance(r["block"], str) and r["block"] else "(loss)"
        origin = r.get("origin")
        if isinstance(origin, str) and origin:  # a divergence traced to its operator (gradscope.engine.oporigin)
            block += f" (made by {origin})"
        others = r["others"].split() if isinstance(r["others"], str) else []
        metric = r.get("metric") if isinstance(r.get("metric"), str) and r.get("metric") else "loss"
        rows.append([str(r[S.RUN]), str(r[S.STEP]), str(r["kind"]), block, metric, num(r["value"], ".4g"),
                     num(r["threshold"], ".4g"), f"{len(others)} block(s)" if others else ""])
    if len(alerts) > limit:
        rows.append(["...", "", f"{len(alerts) - limit} more in alerts.csv", "", "", "", "", ""])
    return rows


def alert_metrics(alerts: pd.DataFrame) -> str:
    """Which metric each kind of alert in ``alerts`` reads (``update_band: update_ratio``), for a table too narrow
    for a metric column."""
    pairs = dict.fromkeys((str(k), str(m) if isinstance(m, str) and m else "loss")
                          for k, m in zip(alerts["kind"], alerts.get("metric", [""] * len(alerts))))
    return "value: " + "; ".join(f"{k} reads {m}" for k, m in pairs)


def alerts_sentence(alerts: Any) -> str:
    """One line on the training alerts: how many of each kind, or that there were none."""
    if alerts is None:
        return "no training run: no alerts checked"
    if not len(alerts):
        return "no alerts over training (loss and gradient spikes, update ratios out of band, divergence)"
    counts = alerts["kind"].value_counts()
    notes = alerts["note"].dropna() if "note" in alerts.columns else pd.Series([], dtype=object)
    said = "".join(f"; {k} in {n} of them: {note}" for (k, note), n in
                   alerts.loc[notes.index[notes.astype(str) != ""]].groupby(["kind", "note"], sort=False).size().items())
    return f"{len(alerts)} alert(s) over training: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + said


# --- per configuration (the seeds of a configuration as one row) -----------------------------------------------

def claim_number(claim: Any) -> tuple[str, str]:
    """``(key number, 95% interval)`` of a claim as text, or dashes when the claim carries no number."""
    est = getattr(claim, "estimate", None)
    if is_missing(est):
        return "—", "—"
    unit = f" {claim.unit}" if getattr(claim, "unit", "") else ""
    lo, hi = getattr(claim, "low", None), getattr(claim, "high", None)
    interval = "—" if is_missing(lo) or is_missing(hi) else f"{float(lo):+.3g} .. {float(hi):+.3g}{unit}"
    return f"{float(est):+.3g}{unit}", interval


def claim_rows(claims: List[Any]) -> Rows:
    """One row per claim: the claim, its answer, the key number and its 95% interval, the phase."""
    rows = [["claim", "answer", "key number", "95% interval", "phase"]]
    for c in claims:
        rows.append([str(c.statement), str(c.answer), *claim_number(c), str(c.phase)])
    return rows


def _geo(values: Any) -> float:
    v = pd.to_numeric(pd.Series(values), errors="coerce").astype(float)
    v = v[(v > 0) & np.isfinite(v)]
    return float(np.exp(np.log(v).mean())) if len(v) else float("nan")


#: the footnote of every theory table: what the starred column is, and why it differs from the verdict's factor
MEASURED_STAR = ("measured*: the per-block factor fitted within stages, as the theory counts it, geometric mean over "
                 "seeds; the verdicts' per-block factor is fitted through all blocks, stage boundaries included, so "
                 "the two differ where a stage boundary changes the signal")
#: the footnote of the per-configuration verdicts: the units of "per block" and "per layer"
PER_BLOCK_UNITS = ("per block: forward as a ratio of variances (act_var), backward of norms (grad_norm); per layer: "
                   "both as an amplitude (a variance's square root) per weight layer, the unit the classes are cut in")


def theory_rows(v: pd.DataFrame, config_of: Dict[str, str]) -> Rows:
    """Theory beside measurement at initialisation, one row per configuration and signal (its seeds judged
    together): seeds, the predicted per-block factor, the measured one fitted the same way (geometric mean over
    seeds), the agreement word and the reference. Configurations without a prediction are left out."""
    rows = [["configuration", "signal", "seeds", "theory (per block)", "measured* (geo. mean)", "agreement",
             "reference"]]
    if A.PREDICTED_FACTOR not in v.columns:
        return rows
    v = v.assign(_config=[config_of.get(str(r), str(r)) for r in v[S.RUN]])
    for (config, signal), g in v.groupby(["_config", A.SIGNAL], sort=False):
        g = g[g[A.PREDICTED_FACTOR].notna()]
        if g.empty:
            continue
        words = [w for w in g.get(A.AGREEMENT, pd.Series(dtype=object)) if isinstance(w, str)]
        word = max(set(words), key=words.count) if words else "—"
        ref = next((r for r in g.get(A.REFERENCE, pd.Series(dtype=object)) if isinstance(r, str) and r), "—")
        measured = g[A.MEASURED_FACTOR] if A.MEASURED_FACTOR in g.columns else g[A.FACTOR]
        rows.append([str(config), str(signal), str(len(g)), times(_geo(g[A.PREDICTED_FACTOR])),
                     times(_geo(measured)), agreement_word(word), ref])
    return rows


def theory_notes_by_configuration(v: pd.DataFrame, config_of: Dict[str, str]) -> List[str]:
    """Where measurement and theory part, once per configuration and signal (the seeds are judged together, so the
    pooled sentence is said once); a clause that only some seeds add follows, naming those runs."""
    out: List[str] = []
    seen: Dict[tuple, set] = {}
    for _, r in v.iterrows():
        note = r.get(A.THEORY_NOTE)
        if not (isinstance(note, str) and note):
            continue
        run = str(r[S.RUN])
        key = (config_of.get(run, run), str(r[A.SIGNAL]))
        clauses = [c.strip() for c in note.split("; ") if c.strip()]
        if key not in seen:
            seen[key] = set(clauses)
            out.append(f"{key[0]} ({key[1]}): {note}")
            continue
        extra = [c for c in clauses if c not in seen[key]]
        seen[key].update(extra)
        if extra:
            out.append(f"{key[0]} ({key[1]}), {run} also: {'; '.join(extra)}")
    return out


def trajectory_config_rows(traj: pd.DataFrame, config_of: Dict[str, str]) -> Rows:
    """Over training, one row per configuration and signal: seeds, recorded steps per seed, the share of steps in
    each class (mean over seeds; ``unknown``: the step's fit settled no class, so the five shares add up) and the
    class of each seed at its last recorded step."""
    rows = [["configuration", "signal", "seeds", "steps", "healthy", "vanishing", "exploding", "diverged",
             "unknown", "at the last step"]]
    t = traj.assign(_config=[config_of.get(str(r), str(r)) for r in traj["run"]])
    classes = ("healthy", "vanishing", "exploding", "diverged", "unknown")  # the five add up to 100%
    for (config, signal), g in t.groupby(["_config", "signal"], sort=False):
        pct = [f"{100 * g[f'frac_{c}'].mean():.0f}%" if f"frac_{c}" in g.columns else "—" for c in classes]
        last = g["last_verdict"].astype(str).value_counts()
        rows.append([str(config), str(signal), str(len(g)), str(int(g["n_steps"].max()))] + pct
                    + [", ".join(f"{k} {n}" for k, n in last.items())])
    return rows


def no_claim_line(results: Any) -> str:
    """What the claims section says when there is no claim."""
    why = getattr(results, "no_claims_why", None)
    return f"No claim: {why}" if why else "No claim: the frame is not a study (claims need the built-in nets at two depths)."


def config_overview(results: Any, config_of: Dict[str, str]) -> str:
    """``24 runs in 8 configurations (3 seeds each); initialisation and training`` for a report's header."""
    groups = by_configuration(config_of)
    sizes = sorted({len(r) for r in groups.values()})
    seeds = "" if sizes == [1] else (f" ({sizes[0]} seeds each)" if len(sizes) == 1 else
                                     f" ({sizes[0]}-{sizes[-1]} seeds each)")
    return (f"{len(config_of)} run{'s' if len(config_of) != 1 else ''} in {len(groups)} configuration"
            f"{'s' if len(groups) != 1 else ''}{seeds}; measured {_phases_said(results, len(config_of))}.")


def _phases_said(results: Any, runs: int) -> str:
    """``at initialisation and over training``, or how many runs trained when only some did (a default study trains
    its BN nets and measures their no-BN twins at initialisation only)."""
    phases = results.phases()
    if phases == [W.INIT, W.TRAIN]:
        trained = results.frames[W.TRAIN]
        count = trained[S.RUN].nunique() if S.RUN in trained.columns else runs
        if count < runs:
            return f"{W.PHASE_WORDS[W.INIT]}, {count} of them also {W.PHASE_WORDS[W.TRAIN]}"
    return " and ".join(W.PHASE_WORDS[p] for p in phases)
