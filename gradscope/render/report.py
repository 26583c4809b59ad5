"""Write a report folder from a frame: the records, verdicts, figures, ``summary.md`` and ``report.html``.

Folder layout (names are fixed, so scripts and tests can rely on them)::

    records.parquet        the frame (pyarrow); dtypes stored in its schema metadata
    records.csv            the frame as CSV; dtypes in records.dtypes.json beside it
    records.dtypes.json    {column: dtype} so that read_records() restores the exact dtypes of the CSV
    verdicts.csv           gradscope.verdicts(frame): measurement and theory
    heatmap_<metric>.png   block x step, log10 colour, one panel per run   (grad_norm, act_var, param_grad_norm)
    runs_<metric>.png      depth x run at one step (frames with several runs only)
    profile_<metric>.png   metric vs depth, log y, one line per run, thresholds and theory
    summary.md             verdicts in sentences, a table, the figures, and what could not be drawn
    report.html            the same, self-contained: figures as base64 PNG, no network, no external script

A metric missing from the frame is reported as missing (in summary.md and report.html); it never stops the report.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.agreement import verdicts
from gradscope.store import CSV, DTYPES, PARQUET, write_records
from gradscope.errors import DataError, OutputError

VERDICTS_CSV, SUMMARY, HTML = "verdicts.csv", "summary.md", "report.html"
_META_KEY = b"gradscope_dtypes"



# --- figures --------------------------------------------------------------------------------------------------

def _save(fig: Any, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)  # a pyplot-free Figure (plots.new_figure): nothing to close, no backend switched
    return path


def draw_figures(frame: pd.DataFrame, out: Path, *, configs: Optional[Mapping[str, Mapping[str, Any]]] = None, step: A.StepArg = None,
                 runs_step: A.StepArg = "first", vanish: float = A.VANISH, explode: float = A.EXPLODE,
                 dpi: int = 100) -> tuple[list[dict[str, str]], list[str]]:
    """Draw every figure the frame allows; return ``(figures, notes)``.

    ``figures``: ``{"file", "metric", "caption"}`` in report order; ``notes``: one sentence per figure that could
    not be drawn and why.
    """
    from gradscope.render import plots as P
    from gradscope.agreement import predicted_profiles

    runs = A.run_names(frame)
    colors = P.run_colors(runs)
    present = set(pd.unique(frame[S.METRIC]))
    figures: list[dict[str, str]] = []
    notes: list[str] = []
    for metric in P.REPORT_METRICS:
        names = [f"heatmap_{metric}.png", f"profile_{metric}.png"] + ([f"runs_{metric}.png"] if len(runs) > 1 else [])
        if metric not in present:
            notes.append(f"{metric} is not in the frame, so {', '.join(names)} were not drawn.")
            continue
        what = P.metric_label(metric)
        _save(P.heatmap_figure(frame, metric, colors=colors), out / names[0], dpi)
        figures.append({"file": names[0], "metric": metric,
                        "caption": f"log10 {metric} ({what}) per block (rows, depth order) and step, per run."})
        if len(runs) > 1:
            _save(P.runs_figure(frame, metric, step=runs_step, colors=colors), out / names[2], dpi)
            figures.append({"file": names[2], "metric": metric,
                            "caption": f"log10 {metric} by depth (rows) and run (columns) at step "
                                       f"{P.chosen_step(frame, metric, runs_step)}."})
        predicted = predicted_profiles(frame, metric, configs=configs)
        _save(P.profile_figure(frame, metric, step=step, vanish=vanish, explode=explode, colors=colors,
                               predicted=predicted), out / names[1], dpi)
        ref = P.REFERENCE_END.get(metric)
        cap = (f"{metric} across depth, relative to the {ref} block, one line per run; dotted/dash-dot lines: "
               f"exploding (x{explode:g}) and vanishing (x{vanish:g}) thresholds; dashed: theory." if ref else
               f"{metric} across depth (absolute, log scale), one line per run.")
        figures.append({"file": names[1], "metric": metric, "caption": cap})
    return figures, notes


# --- text -----------------------------------------------------------------------------------------------------

def _num(x: Any, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA:
        return "—"
    return format(float(x), fmt)


def verdict_rows(v: pd.DataFrame) -> list[list[str]]:
    """The verdict table as text cells (header first), shared by summary.md and report.html."""
    head = ["run", "step", "signal", "verdict", "per block", "R²", "end to end", "min (block)", "max (block)",
            "theory vs measured*", "agrees"]
    rows = [head]
    for _, r in v.iterrows():
        st = "" if pd.isna(r[S.STEP]) else str(int(r[S.STEP]))
        agrees = r.get(A.AGREES)
        rows.append([str(r[S.RUN]), st or "all (geo. mean)", f"{r[A.SIGNAL]} ({r[S.METRIC]})", str(r[A.VERDICT]),
                     _num(r[A.FACTOR]), _num(r[A.R2], ".2f"), _num(r[A.END_TO_END]),
                     f"{_num(r[A.MIN_VALUE])} ({r[A.MIN_BLOCK]})", f"{_num(r[A.MAX_VALUE])} ({r[A.MAX_BLOCK]})",
                     "—" if pd.isna(r.get(A.PREDICTED_FACTOR)) else
                     f"{_num(r.get(A.PREDICTED_FACTOR))} vs {_num(r.get(A.MEASURED_FACTOR))}",
                     "—" if agrees is None or pd.isna(agrees) else ("yes" if bool(agrees) else "no")])
    return rows


def theory_notes(v: pd.DataFrame) -> list[str]:
    """Where measurement and theory part, or where no theory applies: one sentence each."""
    out = []
    for _, r in v.iterrows():
        note = r.get(A.THEORY_NOTE)
        if isinstance(note, str) and note:
            out.append(f"{r[S.RUN]} ({r[A.SIGNAL]}): {note}")
    return out


def _overview(frame: pd.DataFrame) -> str:
    steps = A._steps_of(frame)
    blocks = frame.groupby(A._with_run(frame)[S.RUN])[S.BLOCK].nunique()
    rng = f"{int(steps[0])}..{int(steps[-1])}" if steps.size else "none"
    return (f"{len(frame)} records, {len(blocks)} run(s), {steps.size} recorded step(s) ({rng}), "
            f"{int(blocks.max()) if len(blocks) else 0} blocks at most per run; metrics: "
            f"{', '.join(sorted(map(str, pd.unique(frame[S.METRIC]))))}.")


def summary_markdown(title: str, frame: pd.DataFrame, v: pd.DataFrame, figures: list[dict[str, str]],
                     notes: list[str], how: str) -> str:
    """Text of ``summary.md`` (figures linked by file name, relative to the folder)."""
    lines = [f"# {title}", "", _overview(frame), "", "## Verdicts", "", how, ""]
    lines += [f"- {A.sentence(r)}" for _, r in v.iterrows()] or ["- No act_var or grad_norm rows: no verdict."]
    rows = verdict_rows(v)
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]]
    tn = theory_notes(v)
    if tn:
        lines += ["", "## Theory beside measurement", ""] + [f"- {t}" for t in tn]
    lines += ["", "## Figures", ""]
    for f in figures:
        lines += [f"### {f['file']}", "", f"![{f['caption']}]({f['file']})", "", f"*{f['caption']}*", ""]
    if notes:
        lines += ["## Not drawn", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Files", "", f"- `{PARQUET}`, `{CSV}` (+ `{DTYPES}`): the records; "
              "`gradscope.store.read_records(path)` loads either with its dtypes.", f"- `{VERDICTS_CSV}`: the verdicts.",
              ""]
    return "\n".join(lines)


_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var el = document.getElementById('gradscope-check');
  el.setAttribute('data-images', String(imgs.length));
  el.setAttribute('data-loaded', String(ok));
  el.textContent = ok === imgs.length ? 'All ' + ok + ' figures loaded.'
                                      : (imgs.length - ok) + ' of ' + imgs.length + ' figures failed to load.';
});
"""
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1400px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:left}th{background:#f0f0f0}figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444}.exploding{color:#b2182b;font-weight:600}.vanishing{color:#2166ac;font-weight:600}
.healthy{color:#1b7837}.note{color:#555}#gradscope-check{font-size:.8em;color:#777}"""


def report_html(title: str, frame: pd.DataFrame, v: pd.DataFrame, figures: list[dict[str, str]],
                notes: list[str], how: str, folder: Path) -> str:
    """A self-contained page: inline CSS, figures as data URIs, one inline script that checks the figures."""
    e = html.escape
    parts = [f"<h1>{e(title)}</h1>", f"<p>{e(_overview(frame))}</p>", "<h2>Verdicts</h2>", f"<p>{e(how)}</p>", "<ul>"]
    parts += [f'<li class="{e(str(r[A.VERDICT]))}">{e(A.sentence(r))}</li>' for _, r in v.iterrows()]
    parts.append("</ul>")
    rows = verdict_rows(v)
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>")
    for row in rows[1:]:
        parts.append("<tr>" + "".join(f'<td class="{e(c)}">{e(c)}</td>' if i == 3 else f"<td>{e(c)}</td>"
                                      for i, c in enumerate(row)) + "</tr>")
    parts.append("</tbody></table>")
    tn = theory_notes(v)
    if tn:
        parts += ["<h2>Theory beside measurement</h2>", "<ul>"] + [f"<li>{e(t)}</li>" for t in tn] + ["</ul>"]
    parts.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode((folder / f["file"]).read_bytes()).decode("ascii")
        parts.append(f'<figure id="{e(f["file"])}"><img alt="{e(f["caption"])}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{e(f['file'])}: {e(f['caption'])}</figcaption></figure>")
    if notes:
        parts += ["<h2>Not drawn</h2>", '<ul class="note">'] + [f"<li>{e(n)}</li>" for n in notes] + ["</ul>"]
    parts.append('<p id="gradscope-check" data-images="" data-loaded="">Checking figures…</p>')
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f"<title>{e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script>{_CHECK_SCRIPT}</script>\n</body></html>\n")


# --- the report -----------------------------------------------------------------------------------------------

def write_report(frame: pd.DataFrame, out: Union[str, Path] = "gradscope-report", *,
                 configs: Optional[Mapping[str, Mapping[str, Any]]] = None, step: A.StepArg = None,
                 runs_step: A.StepArg = "first", vanish: float = A.VANISH, explode: float = A.EXPLODE,
                 title: str = "gradscope report", dpi: int = 100) -> Path:
    """Write the report folder ``out`` (created if needed) and return its path.

    ``step``: which steps the verdicts and depth profiles use (None: geometric mean per block over all steps);
    ``runs_step``: the step of the depth x run heatmaps ("first": the first step all runs recorded);
    ``vanish``/``explode``: verdict thresholds; ``configs``: ``{run: gradscope_config}`` for theory.
    """
    A._check_frame(frame)
    if frame.empty:
        raise DataError("the frame is empty: nothing to report. Record at least one step (scope.step()) first.")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create report folder {str(out)!r}: {exc}. Pass a writable path.") from exc
    write_records(frame, out)
    v = verdicts(frame, step=step, vanish=vanish, explode=explode, configs=configs)
    v.to_csv(out / VERDICTS_CSV, index=False)
    figures, notes = draw_figures(frame, out, configs=configs, step=step, runs_step=runs_step,
                                  vanish=vanish, explode=explode, dpi=dpi)
    missing = [m for m in (S.ACT_VAR, S.GRAD_NORM) if m not in set(pd.unique(frame[S.METRIC]))]
    how = (f"Per-block factor: geometric slope fitted to log values across depth (call 0 rows; "
           f"{'geometric mean per block over all steps' if step is None else f'step {step}'}). "
           f"A signal is vanishing below x{vanish:g} and exploding above x{explode:g} end to end "
           f"(far end over near end: last/first block for act_var, first/last for grad_norm).")
    if missing:
        how += f" No verdict for {', '.join(missing)}: not in the frame."
    (out / SUMMARY).write_text(summary_markdown(title, frame, v, figures, notes, how))
    (out / HTML).write_text(report_html(title, frame, v, figures, notes, how, out))
    return out
