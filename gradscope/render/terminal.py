"""Verdicts as a rich table for the terminal (the CLI prints it; a notebook shows the plain DataFrame instead).

Imports rich, so only the CLI and users who ask for it load this module.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Optional, TextIO

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.markup import escape
from rich.text import Text

from gradscope import analysis as A
from gradscope import schema as S
from gradscope import words as W
from gradscope.analysis.text import is_missing, num, times

#: Style per verdict: colour plus a word, so the table reads the same without colour.
STYLES = {A.EXPLODING: "bold red", A.VANISHING: "bold blue", A.HEALTHY: "green", A.UNKNOWN: "dim",
          A.DIVERGED: "bold magenta"}
AGREEMENT_STYLES = {W.AGREES: "green", W.DISAGREES: "bold yellow", W.INCONCLUSIVE: "dim"}
ANSWER_STYLES = {W.YES: "green", W.NO: "red", W.UNCLEAR: "yellow"}
_num = num


class _TrimmedLines:
    """A text stream that writes each line without its trailing spaces (rich pads table and wrapped lines with them
    up to the console's width: 80 columns of blanks in a log, a diff, or ``grep`` output)."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.pending = out, ""
        self.encoding = getattr(out, "encoding", None) or "utf-8"  # rich picks its characters by it

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.out.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.out.write(self.pending)
            self.pending = ""
        self.out.flush()

    def isatty(self) -> bool:
        return False


def console(stream: Optional[TextIO] = None) -> Console:
    """The console results are printed on: rich's own on a terminal; piped (a file, CI, ``tee``), one without the
    trailing spaces rich pads its lines with, at rich's 80 columns and without colour."""
    out = stream if stream is not None else sys.stdout
    isatty = getattr(out, "isatty", None)
    if callable(isatty) and isatty():
        return Console(file=out)
    return Console(file=_TrimmedLines(out))  # type: ignore[arg-type]


def _where(value: Any, block: Any) -> str:
    return f"{_num(value)} @ {block}" if block is not None and not pd.isna(block) else _num(value)


def verdict_table(verdicts: pd.DataFrame, *, title: Optional[str] = "gradscope verdicts",
                  compact: bool = False) -> Table:
    """One table row per verdict row: run, [step], signal, verdict, per-block factor, R², end to end, extremes.

    ``compact`` leaves out R² and the extremes so that the table fits an 80-column terminal.

    Theory columns appear when any row has a prediction: the predicted per-block factor, the measured one fitted
    the same way (``measured*``: within stages, see :mod:`gradscope.agreement`) and whether they agree.
    """
    per_step = S.STEP in verdicts.columns and verdicts[S.STEP].notna().any()
    theory = A.PREDICTED_FACTOR in verdicts.columns and verdicts[A.PREDICTED_FACTOR].notna().any()
    from rich import box

    table = Table(title=title, header_style="bold", show_lines=False, box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
                  pad_edge=not compact, padding=(0, 1))
    table.add_column("run", no_wrap=True)
    if per_step:
        table.add_column("step", justify="right")
    table.add_column("signal")
    table.add_column("verdict")
    table.add_column("per block", justify="right")
    if not compact:
        table.add_column("R²", justify="right")
    table.add_column("end to end", justify="right")
    if not compact:
        table.add_column("min @ block")
        table.add_column("max @ block")
    if theory:
        table.add_column("theory", justify="right")
        if not compact:
            table.add_column("measured*", justify="right")
        table.add_column("agrees")
    for _, r in verdicts.iterrows():
        verdict = str(r[A.VERDICT])
        cells: list[Any] = [str(r[S.RUN])]
        if per_step:
            cells.append("" if pd.isna(r[S.STEP]) else str(int(r[S.STEP])))
        factor = times(r[A.FACTOR])
        end_to_end = "—" if pd.isna(r[A.END_TO_END]) else f"{_num(r[A.END_TO_END])}x"
        signal = str(r[A.SIGNAL]) if compact else f"{r[A.SIGNAL]} ({r[S.METRIC]})"
        cells += [signal, Text(verdict, style=STYLES.get(verdict, "")), factor]
        cells += [end_to_end] if compact else [_num(r[A.R2], ".2f"), end_to_end,
                                               _where(r[A.MIN_VALUE], r[A.MIN_BLOCK]),
                                               _where(r[A.MAX_VALUE], r[A.MAX_BLOCK])]
        if theory:
            pred, word = r.get(A.PREDICTED_FACTOR), r.get(A.AGREEMENT)
            meas = r.get(A.MEASURED_FACTOR)
            cells.append(times(pred))
            if not compact:
                cells.append(times(meas))
            if is_missing(pred) or not isinstance(word, str):
                agrees = r.get(A.AGREES)
                word = None if is_missing(agrees) else (W.AGREES if bool(agrees) else W.DISAGREES)
            cells.append("—" if word is None else Text({W.AGREES: W.YES, W.DISAGREES: W.NO}.get(word, word),
                                                       style=AGREEMENT_STYLES.get(word, "")))
        table.add_row(*cells)
    return table


def print_verdicts(verdicts: pd.DataFrame, console: Optional[Console] = None, *, sentences: bool = True) -> None:
    """Print the table, then (by default) each verdict as a sentence."""
    console = console or Console()
    console.print(verdict_table(verdicts))
    if sentences:
        for _, r in verdicts.iterrows():
            console.print(Text(A.sentence(r), style=STYLES.get(str(r[A.VERDICT]), "")))


def rows_table(rows: list, title: str, style_col: int = -1, styles: Optional[dict] = None) -> Table:
    """A rich table from text rows (header first), as :mod:`gradscope.render.tables` builds them."""
    from rich import box

    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1))
    for c in rows[0]:
        table.add_column(c)
    for row in rows[1:]:
        table.add_row(*[Text(c, style=(styles or STYLES).get(c, "")) if i == style_col else c
                        for i, c in enumerate(row)])
    return table


#: signal names where a terminal table is short of columns
_SHORT_SIGNAL = {"forward": "fwd", "backward": "bwd"}


def _pick(rows: list, columns: dict) -> list:
    """The named columns of text rows (header first), in the order given, headed by the short names given."""
    idx = [rows[0].index(c) for c in columns if c in rows[0]]
    short = [columns[rows[0][i]] for i in idx]
    return [short] + [[row[i] for i in idx] for row in rows[1:]]


def fit_table(rows: list, title: str, style_col: int = -1, styles: Optional[dict] = None) -> Table:
    """Like :func:`rows_table`, but a cell too wide for the console folds onto a second line instead of being cut
    with an ellipsis, so every number stays readable at 80 columns; the first column (a name) keeps its width."""
    table = rows_table(rows, title, style_col, styles)
    table.collapse_padding = True  # two spaces between columns, not three: eight columns fit 80 without a fold
    for column in table.columns:
        column.overflow = "fold"
    if len(rows) > 1:
        table.columns[0].min_width = min(28, max(len(r[0]) for r in rows))
    return table


def claim_lines(claim: Any) -> list:
    """A claim for the terminal: the answer in a narrow first column, the statement beside it, and the key number,
    evidence and caveat below the statement (rich wraps them at the console's width with a hanging indent)."""
    from gradscope.render.tables import claim_number

    colour = ANSWER_STYLES.get(claim.answer, "yellow")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=7, justify="right", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(Text(claim.answer.upper(), style=f"bold {colour}"),
                 Text.assemble((claim.statement, "bold"), (f" ({claim.phase})", "dim")))
    number, interval = claim_number(claim)
    if number != "—":
        grid.add_row("", Text(f"key number {number}, 95% interval {interval}"))
    grid.add_row("", Text(claim.evidence))
    if claim.caveat:
        grid.add_row("", Text(f"caveat: {claim.caveat}", style="dim"))
    return [grid]


def print_results(results: Any, console: Optional[Console] = None) -> None:
    """What the terminal shows after a profile, readable at 80 columns: the claims first, then one row per
    configuration (seeds pooled) for losses, verdicts at initialisation, theory and training, then the alerts.
    Per-run tables are in the report folder (verdicts.csv, report.html). Read from the same Results as every file."""
    from gradscope.analysis.results import INIT, TRAIN
    from gradscope.render import tables as T
    from gradscope.render.groups import results_configurations

    console = console or Console()
    config_of = results_configurations(results)
    console.print(Text(results.title, style="bold"))
    if results.interruption():
        console.print(Text(results.interruption(), style="bold red"))
    console.print(T.config_overview(results, config_of), highlight=False)
    if results.claims:
        console.print(Text("\nClaims", style="bold underline"))
        for claim in results.claims:
            for line in claim_lines(claim):
                console.print(line)
    if results.final_losses:
        console.print(fit_table(_pick(T.loss_rows(results), {"configuration": "configuration",
                                                             "final loss (mean ± sd, n)": "final loss (mean ± sd, n)",
                                                             "diverged": "diverged"}), "final training loss"))
    if INIT in results.verdicts:
        if results.pooled is not None and len(results.pooled):
            rows = _pick(T.pooled_rows(results.pooled), {"configuration": "configuration", "signal": "signal",
                                                         "seeds": "seeds", "per block (geo. mean)": "per block",
                                                         "verdict": "verdict"})
            console.print(fit_table(rows, "at initialisation, per configuration", 4))
            console.print(Text(T.PER_BLOCK_UNITS, style="dim"))
        theory = T.theory_rows(results.verdicts[INIT], config_of)
        if len(theory) > 1:
            rows = _pick(theory, {"configuration": "configuration", "signal": "signal",
                                  "theory (per block)": "theory", "measured* (geo. mean)": "measured*",
                                  "agreement": "agreement"})
            console.print(fit_table(rows, "theory beside measurement (initialisation)", 4, AGREEMENT_STYLES))
            console.print(Text(T.MEASURED_STAR, style="dim"))
    if TRAIN in results.verdicts and results.trajectory is not None and len(results.trajectory):
        rows = _pick(T.trajectory_config_rows(results.trajectory, config_of),
                     {"configuration": "configuration", "signal": "signal", "healthy": "healthy",
                      "vanishing": "vanish.", "exploding": "explod.", "diverged": "div.", "unknown": "unkn.",
                      "at the last step": "last step (seeds)"})
        rows = [rows[0]] + [[r[0], _SHORT_SIGNAL.get(r[1], r[1])] + r[2:] for r in rows[1:]]  # eight fit in 80
        console.print(fit_table(rows, "over training: share of recorded steps in each class"))
    if results.alerts is not None:
        if len(results.alerts):
            rows = _pick(T.alert_rows(results.alerts, limit=10), {"run": "run", "step": "step", "kind": "kind",
                                                                 "block": "block", "value": "value",
                                                                 "threshold": "threshold"})
            console.print(fit_table(rows, T.alerts_sentence(results.alerts)))
            console.print(Text(T.alert_metrics(results.alerts.head(10)), style="dim"))
        else:
            console.print(f"[green]{escape(T.alerts_sentence(results.alerts))}[/green]", highlight=False)
    for note in results.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
