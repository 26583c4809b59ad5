"""``report.html``: one self-contained page from the one Results, in the order a reader judges the claims.

1. the claims, each with its answer, evidence, rule and caveat; 2. training loss curves (seeds as mean and band);
3. verdicts at initialisation (pooled over seeds, per run, theory); 4. verdicts over training (trajectory per run,
per-step factor curves); 5. the static figures (heatmaps, depth profiles). CSS, PNGs (data URIs) and plotly.js are
inline, so the page opens offline; every string from data is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Dict, List

from gradscope.analysis.results import INIT, PHASE_WORDS, TRAIN
from gradscope.analysis.text import sentence
from gradscope.render import tables as T

_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var el = document.getElementById('gradscope-check');
  el.setAttribute('data-images', String(imgs.length));
  el.setAttribute('data-loaded', String(ok));
  el.setAttribute('data-charts', String(document.querySelectorAll('.js-plotly-plot').length));
  el.textContent = ok === imgs.length ? 'All ' + ok + ' figures loaded.'
                                      : (imgs.length - ok) + ' of ' + imgs.length + ' figures failed to load.';
});
"""
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1400px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;
padding:.25em .5em;text-align:left}th{background:#f0f0f0}figure{margin:1.5em 0}img{max-width:100%;height:auto;
border:1px solid #eee}figcaption{font-size:.9em;color:#444}.exploding{color:#b2182b;font-weight:600}
.vanishing{color:#2166ac;font-weight:600}.diverged{color:#762a83;font-weight:700}.healthy{color:#1b7837}
.note{color:#555}#gradscope-check{font-size:.8em;color:#777}.claim{border-left:4px solid #999;padding:.3em .8em;
margin:.8em 0}.claim.yes{border-color:#1b7837}.claim.no{border-color:#b2182b}.claim.unclear{border-color:#e0a800}
.answer{font-weight:700;text-transform:uppercase}.rule,.caveat{font-size:.85em;color:#555}"""
_CLASS_COLUMN = 3  # the verdict column of verdict_rows


def _table(rows: T.Rows, class_col: int = -1) -> str:
    e = html.escape
    if len(rows) < 2:
        return "<p>(none)</p>"
    out = ["<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"]
    for row in rows[1:]:
        out.append("<tr>" + "".join(f'<td class="{e(c)}">{e(c)}</td>' if i == class_col else f"<td>{e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _claims(results: Any) -> List[str]:
    e = html.escape
    parts = ['<section id="claims"><h2>Claims</h2>']
    if not results.claims:
        parts.append("<p>No claim: the frame is not a study (claims need the built-in nets at two depths).</p>")
    for c in results.claims:
        parts.append(f'<div class="claim {e(c.answer)}" data-claim="{e(c.key)}"><p><b>{e(c.statement)}</b> '
                     f'<span class="note">({e(c.phase)})</span>: <span class="answer">{e(c.answer)}</span></p>'
                     f"<p>{e(c.evidence)}.</p>"
                     + (f'<p class="rule">Rule: {e(c.how)}.</p>' if c.how else "")
                     + (f'<p class="caveat">Caveat: {e(c.caveat)}.</p>' if c.caveat else "") + "</div>")
    parts.append("</section>")
    return parts


def _verdicts(results: Any, charts: Dict[str, List[str]]) -> List[str]:
    e = html.escape
    how = T.how_text(results.thresholds)
    parts: List[str] = []
    for phase in results.phases():
        v = results.verdicts.get(phase)
        if v is None:
            continue
        parts += [f'<section id="verdicts-{phase}"><h2>Verdicts {e(PHASE_WORDS[phase])}</h2>',
                  f"<p>{e(T.overview(results.frames[phase]))}</p>", f'<p class="note">{e(how)}</p>']
        if phase == INIT:
            if results.pooled is not None and len(results.pooled):
                parts += ["<h3>Pooled over seeds</h3>", _table(T.pooled_rows(results.pooled), 6)]
            parts += ["<h3>Per run</h3><ul>"] + [f'<li class="{e(str(r["verdict"]))}">{e(sentence(r))}</li>'
                                                for r in v.to_dict("records")] + ["</ul>"]
            parts.append(_table(T.verdict_rows(v, theory=True), _CLASS_COLUMN))
            tn = T.theory_notes(v)
            if tn:
                parts += ["<h3>Theory beside measurement (initialisation only)</h3><ul>"]
                parts += [f"<li>{e(t)}</li>" for t in tn] + ["</ul>"]
            parts += charts.get("init", [])
        else:
            if results.trajectory is not None and len(results.trajectory):
                parts += ["<h3>Per run: fraction of recorded steps in each class</h3>",
                          _table(T.trajectory_rows(results.trajectory))]
            last = v[v["step"] == v.groupby("run")["step"].transform("max")]
            parts += ["<h3>At the last recorded step of each run</h3><ul>"]
            parts += [f'<li class="{e(str(r["verdict"]))}">{e(sentence(r))}</li>' for r in last.to_dict("records")]
            parts += ["</ul>"] + charts.get("train", [])
            parts.append('<p class="note">Every step\'s verdict is in verdicts.csv (phase = train).</p>')
        parts.append("</section>")
    return parts


def report_html(results: Any, figures: List[Dict[str, str]], notes: List[str], folder: Path,
                charts: Dict[str, List[str]], plotly_js: str) -> str:
    """The page; ``charts``: interactive HTML fragments by section; ``plotly_js``: the bundle ('' for none)."""
    e = html.escape
    parts = [f"<h1>{e(results.title)}</h1>"] + _claims(results)
    if results.final_losses:
        parts += ['<section id="losses"><h2>Training losses</h2>', _table(T.loss_rows(results))]
        parts += charts.get("losses", []) + ["</section>"]
    parts += _verdicts(results, charts)
    parts.append('<section id="figures"><h2>Figures</h2>')
    for f in figures:
        data = base64.b64encode((folder / f["file"]).read_bytes()).decode("ascii")
        parts.append(f'<figure id="{e(f["file"])}"><img alt="{e(f["caption"])}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{e(f['file'])}: {e(f['caption'])}</figcaption></figure>")
    parts.append("</section>")
    all_notes = list(results.notes) + list(notes)
    if all_notes:
        parts += ["<h2>Notes</h2>", '<ul class="note">'] + [f"<li>{e(n)}</li>" for n in all_notes] + ["</ul>"]
    parts.append('<p id="gradscope-check" data-images="" data-loaded="" data-charts="">Checking figures…</p>')
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline' 'unsafe-eval'"
    js = f"<script>{plotly_js}</script>\n" if plotly_js else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f"<title>{e(results.title)}</title><style>{_CSS}</style>{js}</head><body>\n" + "\n".join(parts)
            + f"\n<script>{_CHECK_SCRIPT}</script>\n</body></html>\n")


_ = TRAIN
