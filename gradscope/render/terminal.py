"""Verdicts as a rich table for the terminal (the CLI prints it; a notebook shows the plain DataFrame instead).

Imports rich, so only the CLI and users who ask for it load this module.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradscope import analysis as A
from gradscope import schema as S

#: Style per verdict: colour plus a word, so the table reads the same without colour.
STYLES = {A.EXPLODING: "bold red", A.VANISHING: "bold blue", A.HEALTHY: "green", A.UNKNOWN: "dim"}


def _num(x: Any, fmt: str = ".3g") -> str:
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(float(x), fmt)


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
        factor = "—" if pd.isna(r[A.FACTOR]) else f"x{A._fmt_factor(float(r[A.FACTOR]))}"
        end_to_end = "—" if pd.isna(r[A.END_TO_END]) else f"{_num(r[A.END_TO_END])}x"
        signal = str(r[A.SIGNAL]) if compact else f"{r[A.SIGNAL]} ({r[S.METRIC]})"
        cells += [signal, Text(verdict, style=STYLES.get(verdict, "")), factor]
        cells += [end_to_end] if compact else [_num(r[A.R2], ".2f"), end_to_end,
                                               _where(r[A.MIN_VALUE], r[A.MIN_BLOCK]),
                                               _where(r[A.MAX_VALUE], r[A.MAX_BLOCK])]
        if theory:
            pred, agrees = r.get(A.PREDICTED_FACTOR), r.get(A.AGREES)
            meas = r.get(A.MEASURED_FACTOR)
            cells.append("—" if pred is None or pd.isna(pred) else f"x{A._fmt_factor(float(pred))}")
            if not compact:
                cells.append("—" if meas is None or pd.isna(meas) else f"x{A._fmt_factor(float(meas))}")
            cells.append("—" if agrees is None or pd.isna(agrees) else
                         Text("yes", style="green") if bool(agrees) else Text("no", style="bold yellow"))
        table.add_row(*cells)
    return table


def print_verdicts(verdicts: pd.DataFrame, console: Optional[Console] = None, *, sentences: bool = True) -> None:
    """Print the table, then (by default) each verdict as a sentence."""
    console = console or Console()
    console.print(verdict_table(verdicts))
    if sentences:
        for _, r in verdicts.iterrows():
            console.print(Text(A.sentence(r), style=STYLES.get(str(r[A.VERDICT]), "")))
