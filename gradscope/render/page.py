"""``report.html``: one self-contained page from the one Results, laid out as a dashboard.

Top to bottom: the claims as a short table (answer, key number, 95% interval) with each claim's evidence one click
away; training losses per configuration; verdicts at initialisation per configuration (seeds pooled) and theory
beside measurement as one table; verdicts over training per configuration; alerts; the figures. Per-run tables,
per-seed sentences and long explanations sit in ``<details>`` elements, closed until clicked. CSS, PNGs (data URIs)
and plotly.js are inline, so the page opens offline; every string from data is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Dict, List

from gradscope.analysis.results import INIT, PHASE_WORDS, TRAIN
from gradscope.analysis.text import sentence
from gradscope.render import tables as T
from gradscope.render.groups import results_configurations

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
_CSS = """h1{font-size:1.6em}body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1400px;margin:0 auto;
padding:0 1.2em 2em;color:#222;line-height:1.4}h1{margin:.6em 0 .1em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;
padding-bottom:.2em}nav{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #eee;z-index:9;
font-size:.9em}nav a{margin-right:1em;color:#2166ac;text-decoration:none}.lead{color:#444;margin:.2em 0 .8em}.stopped{background:#fde0dd;border-left:4px solid #b2182b;padding:.5em .8em;font-weight:bold}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0}td,th{border:1px solid #d8d8d8;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.88em;color:#444}
.exploding{color:#b2182b;font-weight:600}.vanishing{color:#2166ac;font-weight:600}.diverged{color:#762a83;
font-weight:700}.healthy{color:#1b7837}.note{color:#555;font-size:.9em}#gradscope-check{font-size:.8em;color:#777}
.answer{display:inline-block;min-width:4.5em;text-align:center;font-weight:700;text-transform:uppercase;
border-radius:3px;padding:.05em .4em;color:#fff;background:#888}.answer.yes{background:#1b7837}
.answer.no{background:#b2182b}.answer.unclear{background:#b8860b}table.claims td:first-child{max-width:30em}
details{margin:.4em 0}details>summary{cursor:pointer;color:#2166ac}details[open]>summary{margin-bottom:.3em}
details.evidence>summary{font-size:.9em}details.evidence p{margin:.3em 0;max-width:60em}
.agrees{color:#1b7837;font-weight:600}.disagrees{color:#b2182b;font-weight:600}.inconclusive{color:#777}"""
_CLASS_WORDS = {"healthy", "vanishing", "exploding", "diverged", "unknown", "agrees", "disagrees", "inconclusive"}


def _cell(text: str, numeric: bool = False) -> str:
    e = html.escape
    word = text.split()[0].lower() if text else ""
    cls = f' class="{e(word)}"' if word in _CLASS_WORDS else (' class="num"' if numeric else "")
    return f"<td{cls}>{e(text)}</td>"


def _table(rows: T.Rows, css: str = "") -> str:
    """A table from text rows (header first); class words (healthy, agrees...) get their colour."""
    e = html.escape
    if len(rows) < 2:
        return '<p class="note">(none)</p>'
    out = [f'<table class="{e(css)}"><thead><tr>' + "".join(f"<th>{e(c)}</th>" for c in rows[0])
           + "</tr></thead><tbody>"]
    for row in rows[1:]:
        out.append("<tr>" + "".join(_cell(c, numeric=c[:1] in "x+-0123456789" and " " not in c.strip())
                                    for c in row) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _details(summary: str, body: str, css: str = "", open_: bool = False) -> str:
    e = html.escape
    cls = f' class="{e(css)}"' if css else ""
    return f"<details{cls}{' open' if open_ else ''}><summary>{e(summary)}</summary>{body}</details>"


def _claims(results: Any) -> List[str]:
    e = html.escape
    parts = ['<section id="claims"><h2>Claims</h2>']
    if not results.claims:
        parts.append(f"<p>{e(T.no_claim_line(results))}</p>")
        return parts + ["</section>"]
    head = T.claim_rows([])[0]
    parts.append('<table class="claims"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head)
                 + "<th>evidence</th></tr></thead><tbody>")
    for c in results.claims:
        number, interval = T.claim_number(c)
        body = (f"<p>{e(c.evidence)}.</p>" + (f'<p class="note">Rule: {e(c.how)}.</p>' if c.how else "")
                + (f'<p class="note">Caveat: {e(c.caveat)}.</p>' if c.caveat else ""))
        parts.append(f'<tr data-claim="{e(c.key)}"><td><b>{e(c.statement)}</b></td>'
                     f'<td><span class="answer {e(c.answer)}">{e(c.answer)}</span></td>'
                     f'<td class="num">{e(number)}</td><td class="num">{e(interval)}</td><td>{e(c.phase)}</td>'
                     f"<td>{_details('why', body, 'evidence')}</td></tr>")
    parts.append("</tbody></table></section>")
    return parts


def _init_section(results: Any, config_of: Dict[str, str], charts: Dict[str, List[str]]) -> List[str]:
    e = html.escape
    v = results.verdicts[INIT]
    parts = [f'<section id="verdicts-{INIT}"><h2>Verdicts {e(PHASE_WORDS[INIT])}</h2>',
             f'<p class="lead">{e(T.overview(results.frames[INIT]))}</p>',
             _details("How a verdict is decided", f'<p class="note">{e(T.how_text(results.thresholds))}</p>')]
    if results.pooled is not None and len(results.pooled):
        parts += ["<h3>Per configuration (seeds pooled)</h3>", _table(T.pooled_rows(results.pooled)),
                  f'<p class="note">{e(T.PER_BLOCK_UNITS)}.</p>']
    theory = T.theory_rows(v, config_of)
    if len(theory) > 1:
        parts += ["<h3>Theory beside measurement</h3>", _table(theory), f'<p class="note">{e(T.MEASURED_STAR)}.</p>']
        notes = T.theory_notes_by_configuration(v, config_of)
        if notes:
            parts.append(_details(f"The theory's notes, per configuration ({len(notes)})",
                                  "<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>"))
    parts += charts.get("init", [])
    runs = "".join(f'<li class="{e(str(r["verdict"]))}">{e(sentence(r))}</li>' for r in v.to_dict("records"))
    parts.append(_details(f"Every run ({v['run'].nunique()} runs, {len(v)} verdicts)",
                          _table(T.verdict_rows(v, theory=True)) + f"<ul>{runs}</ul>"))
    return parts + ["</section>"]


def _train_section(results: Any, config_of: Dict[str, str], charts: Dict[str, List[str]]) -> List[str]:
    e = html.escape
    v = results.verdicts[TRAIN]
    parts = [f'<section id="verdicts-{TRAIN}"><h2>Verdicts {e(PHASE_WORDS[TRAIN])}</h2>',
             f'<p class="lead">{e(T.overview(results.frames[TRAIN]))}</p>',
             _details("How a verdict is decided", f'<p class="note">{e(T.how_text(results.thresholds))}</p>')]
    traj = results.trajectory
    if traj is not None and len(traj):
        parts += ["<h3>Per configuration: share of recorded steps in each class</h3>",
                  _table(T.trajectory_config_rows(traj, config_of))]
    parts += charts.get("train", [])
    if traj is not None and len(traj):
        parts.append(_details(f"Every run ({traj['run'].nunique()} runs)", _table(T.trajectory_rows(traj))))
    last = v[v["step"] == v.groupby("run")["step"].transform("max")]
    items = "".join(f'<li class="{e(str(r["verdict"]))}">{e(sentence(r))}</li>' for r in last.to_dict("records"))
    parts.append(_details("At the last recorded step of each run", f"<ul>{items}</ul>"
                          '<p class="note">Every step\'s verdict is in verdicts.csv (phase = train).</p>'))
    return parts + ["</section>"]


def _alerts(results: Any) -> List[str]:
    e = html.escape
    if results.alerts is None:
        return []
    parts = ['<section id="alerts"><h2>Alerts over training</h2>',
             f"<p>{e(T.alerts_sentence(results.alerts))} (alerts.csv).</p>"]
    if len(results.alerts):
        parts.append(_details(f"The alerts ({len(results.alerts)})", _table(T.alert_rows(results.alerts)),
                              open_=len(results.alerts) <= 5))
    return parts + ["</section>"]


def _figures(figures: List[Dict[str, str]], folder: Path) -> List[str]:
    e = html.escape
    parts = ['<section id="figures"><h2>Figures</h2>',
             '<p class="note">Depth profiles first (one line per configuration, its seeds as a band); the '
             "heatmaps (one panel per run) below, closed.</p>"]
    ordered = sorted(figures, key=lambda f: not f["file"].startswith("profile_"))
    for f in ordered:
        data = base64.b64encode((folder / f["file"]).read_bytes()).decode("ascii")
        fig = (f'<figure id="{e(f["file"])}"><img alt="{e(f["caption"])}" src="data:image/png;base64,{data}">'
               f"<figcaption>{e(f['file'])}: {e(f['caption'])}</figcaption></figure>")
        parts.append(fig if f["file"].startswith("profile_") else _details(f["file"], fig))
    return parts + ["</section>"]


def _nav(results: Any, has_alerts: bool) -> str:
    links = [("claims", "Claims")] + ([("losses", "Losses")] if results.final_losses else [])
    links += [(f"verdicts-{p}", PHASE_WORDS[p].capitalize()) for p in results.phases() if p in results.verdicts]
    links += ([("alerts", "Alerts")] if has_alerts else []) + [("figures", "Figures")]
    return "<nav>" + "".join(f'<a href="#{i}">{html.escape(w)}</a>' for i, w in links) + "</nav>"


def _stopped(results: Any) -> List[str]:
    """The interrupted study's banner, above the claims (empty when the study finished)."""
    line = results.interruption()
    return [] if line is None else [f'<p class="stopped" id="interrupted">{html.escape(line)}</p>']


def report_html(results: Any, figures: List[Dict[str, str]], notes: List[str], folder: Path,
                charts: Dict[str, List[str]], plotly_js: str) -> str:
    """The page; ``charts``: interactive HTML fragments by section; ``plotly_js``: the bundle ('' for none)."""
    e = html.escape
    config_of = results_configurations(results)
    parts = [_nav(results, results.alerts is not None), f"<h1>{e(results.title)}</h1>",
             f'<p class="lead">{e(T.config_overview(results, config_of))}</p>'] + _stopped(results) + _claims(results)
    if results.final_losses:
        parts += ['<section id="losses"><h2>Training losses</h2>', _table(T.loss_rows(results))]
        parts += charts.get("losses", []) + ["</section>"]
    if INIT in results.verdicts:
        parts += _init_section(results, config_of, charts)
    if TRAIN in results.verdicts:
        parts += _train_section(results, config_of, charts)
    parts += _alerts(results) + _figures(figures, folder)
    all_notes = list(results.notes) + list(notes)
    if all_notes:
        parts += ['<section id="notes"><h2>Notes</h2><ul class="note">'] + [f"<li>{e(n)}</li>" for n in all_notes]
        parts.append("</ul></section>")
    parts.append('<p id="gradscope-check" data-images="" data-loaded="" data-charts="">Checking figures…</p>')
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline' 'unsafe-eval'"
    js = f"<script>{plotly_js}</script>\n" if plotly_js else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(results.title)}</title><style>{_CSS}</style>{js}</head><body>\n" + "\n".join(parts)
            + f"\n<script>{_CHECK_SCRIPT}</script>\n</body></html>\n")
