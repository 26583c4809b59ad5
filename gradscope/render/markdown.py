"""``summary.md`` and ``claims.md`` from the one :class:`~gradscope.analysis.results.Results`.

Every string that comes from data (run and block names, notes) goes through :func:`md_escape`: HTML special
characters become entities and Markdown's emphasis, link, code and table characters are backslash-escaped, so a
block called ``<img src=x onerror=...>``, ``a|b*c*`` or ``a<newline>b`` reads as itself, on one line.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List

from gradscope.analysis.results import INIT, PHASE_WORDS, TRAIN
from gradscope.analysis.text import sentence
from gradscope.render import tables as T

#: Characters that change the meaning of inline Markdown mid-line (emphasis, code, links, tables, math).
_MD_SPECIAL = re.compile(r"([\\`*{}\[\]|~$])")


#: Line breaks (and the other characters that end a line) that would end a table row, a list item or a heading.
_LINE_BREAK = re.compile(r"\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def md_escape(text: Any) -> str:
    """``text`` safe inside Markdown (and the HTML a Markdown renderer produces), on one line: a line break in a
    name is shown as ``\\n`` (as Python writes it), so a table row or a list item never ends inside a name."""
    one_line = _LINE_BREAK.sub(lambda m: repr(m.group())[1:-1], str(text))
    # '&' and '<' are all that can start markup or an entity; '>' stays readable ("step 0 -> 290")
    return _MD_SPECIAL.sub(r"\\\1", one_line.replace("&", "&amp;").replace("<", "&lt;"))


def md_table(rows: T.Rows) -> List[str]:
    if len(rows) < 2:
        return ["(none)"]
    out = ["| " + " | ".join(md_escape(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows[1:]]
    return out


def claims_lines(results: Any) -> List[str]:
    """The claims as a Markdown table (answer, key number, 95% interval), then each claim's evidence, rule and
    caveat as list items."""
    if not results.claims:
        return [f"- {md_escape(T.no_claim_line(results))}"]
    out = md_table(T.claim_rows(results.claims)) + [""]
    for c in results.claims:
        out.append(f"- **{md_escape(c.statement)}** ({md_escape(c.phase)}): **{md_escape(c.answer)}** — "
                   f"{md_escape(c.evidence)}.")
        if c.how:
            out.append(f"  - rule: {md_escape(c.how)}")
        if c.caveat:
            out.append(f"  - caveat: {md_escape(c.caveat)}")
    return out


def stopped_lines(results: Any) -> List[str]:
    """The interrupted study's banner in bold (no lines when the study finished)."""
    line = results.interruption()
    return [] if line is None else [f"**{md_escape(line)}**"]


def claims_markdown(results: Any) -> str:
    """Text of ``claims.md``."""
    return "# Claims checked\n\n" + "".join(f"{x}\n\n" for x in stopped_lines(results)) + \
        "\n".join(claims_lines(results)) + "\n"


def _details(summary: str, lines: List[str]) -> List[str]:
    """A collapsed block (GitHub and most Markdown viewers render ``<details>``); blank lines keep Markdown inside."""
    return [f"<details><summary>{md_escape(summary)}</summary>", ""] + lines + ["", "</details>", ""]


def _init_lines(results: Any, config_of: Dict[str, str]) -> List[str]:
    v = results.verdicts[INIT]
    lines: List[str] = []
    if results.pooled is not None and len(results.pooled):
        lines += ["Per configuration (seeds pooled):", ""] + md_table(T.pooled_rows(results.pooled)) + [""]
        lines += [md_escape(T.PER_BLOCK_UNITS) + ".", ""]
    theory = T.theory_rows(v, config_of)
    if len(theory) > 1:
        lines += ["### Theory beside measurement (initialisation only)", ""] + md_table(theory) + [""]
        lines += [md_escape(T.MEASURED_STAR) + ".", ""]
        notes = T.theory_notes_by_configuration(v, config_of)
        if notes:
            lines += _details(f"The theory's notes, per configuration ({len(notes)})",
                              [f"- {md_escape(n)}" for n in notes])
    per_run = md_table(T.verdict_rows(v, theory=True)) + [""] + [f"- {md_escape(sentence(r))}"
                                                                for r in v.to_dict("records")]
    return lines + _details(f"Every run ({v['run'].nunique()} runs)", per_run)


def _train_lines(results: Any, config_of: Dict[str, str]) -> List[str]:
    v = results.verdicts[TRAIN]
    lines: List[str] = []
    traj = results.trajectory
    if traj is not None and len(traj):
        lines += ["Per configuration, share of recorded steps in each class (never one average over steps):", ""]
        lines += md_table(T.trajectory_config_rows(traj, config_of)) + [""]
        lines += _details(f"Every run ({traj['run'].nunique()} runs)", md_table(T.trajectory_rows(traj)))
    last = v[v["step"] == v.groupby("run")["step"].transform("max")]
    lines += _details("At the last recorded step of each run",
                      [f"- {md_escape(sentence(r))}" for r in last.to_dict("records")])
    return lines + ["Every recorded step: `verdicts.csv` (phase = train).", ""]


def summary_markdown(results: Any, figures: List[Dict[str, str]], notes: List[str]) -> str:
    """Text of ``summary.md``, in the order of ``report.html``: claims, losses, alerts, verdicts per configuration
    at initialisation (with theory) and over training, figures; per-run detail collapsed."""
    from gradscope.render.groups import results_configurations

    config_of = results_configurations(results)
    lines = [f"# {md_escape(results.title)}", "", md_escape(T.config_overview(results, config_of)), ""]
    lines += [x for line in stopped_lines(results) for x in (line, "")]
    lines += ["## Claims", ""] + claims_lines(results) + [""]
    if results.final_losses:
        lines += ["## Training losses", ""] + md_table(T.loss_rows(results)) + [""]
    if results.alerts is not None:
        lines += ["## Alerts over training", "", md_escape(T.alerts_sentence(results.alerts)) + " (`alerts.csv`).", ""]
        if len(results.alerts):
            lines += md_table(T.alert_rows(results.alerts)) + [""]
    how = T.how_text(results.thresholds)
    for phase in results.phases():
        if phase not in results.verdicts:
            continue
        lines += [f"## Verdicts {PHASE_WORDS[phase]}", "", md_escape(T.overview(results.frames[phase])), ""]
        lines += _details("How a verdict is decided", [md_escape(how)])
        lines += _init_lines(results, config_of) if phase == INIT else _train_lines(results, config_of)
    lines += ["## Figures", ""]
    for f in figures:
        lines += [f"### {md_escape(f['file'])}", "", f"![{md_escape(f['caption'])}]({f['file']})", "",
                  f"*{md_escape(f['caption'])}*", ""]
    all_notes = list(results.notes) + list(notes)
    if all_notes:
        lines += ["## Notes", ""] + [f"- {md_escape(n)}" for n in all_notes] + [""]
    lines += ["## Files", "", "- `records.parquet`, `records.csv` (+ `records.dtypes.json`): the records of the "
              "main phase; `gradscope.store.read_records(path)` loads either with its dtypes.",
              "- `verdicts.csv`: every verdict, with its `phase` (init: one row per run with theory; train: one "
              "row per recorded step); `trajectory.csv`, `pooled.csv`, `losses.csv`, `claims.md`, `summary.json`.",
              ""]
    return "\n".join(lines)


__all__ = ["claims_markdown", "md_escape", "summary_markdown"]
_ = TRAIN
