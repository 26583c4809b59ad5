"""The rich verdict table shows every verdict row with its numbers, and colours that match the verdict."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from rich.console import Console

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.render import terminal as T


def frame() -> pd.DataFrame:
    rows = []
    for run, ff, bf in (("plain56-bn", 1.0, 1.8), ("resnet56", 0.5, 1.0)):
        for step in (0, 1):
            for k in range(10):
                rows.append({S.STEP: step, S.BLOCK: f"b{k}", S.DEPTH: k, S.KIND: "B", S.METRIC: S.ACT_VAR,
                             S.VALUE: ff ** k, S.CALL: 0, S.RUN: run})
                rows.append({S.STEP: step, S.BLOCK: f"b{k}", S.DEPTH: k, S.KIND: "B", S.METRIC: S.GRAD_NORM,
                             S.VALUE: bf ** (9 - k), S.CALL: 0, S.RUN: run})
    return pd.DataFrame(rows)


def render(table) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(table)
    return buf.getvalue()


def test_table_has_one_row_per_verdict_with_its_numbers():
    v = A.verdicts(frame())
    table = T.verdict_table(v)
    assert table.row_count == len(v) == 4
    headers = [c.header for c in table.columns]
    assert headers[:4] == ["run", "signal", "verdict", "per block"] and "step" not in headers
    text = render(table)
    lines = [ln for ln in text.splitlines() if "plain56-bn" in ln and "backward" in ln]
    assert len(lines) == 1
    line = lines[0]
    assert "exploding" in line and "x1.80" in line and f"{1.8 ** 9:.3g}x" in line and "b0" in line
    assert any("resnet56" in ln and "vanishing" in ln and "x0.50" in ln for ln in text.splitlines())


def test_verdict_colours_and_per_step_column():
    v = A.verdicts(frame(), step="all")
    table = T.verdict_table(v)
    assert [c.header for c in table.columns][1] == "step"
    verdict_col = [c for c in table.columns if c.header == "verdict"][0]
    styles = {cell.plain: str(cell.style) for cell in verdict_col.cells}
    assert styles == {"exploding": "bold red", "vanishing": "bold blue", "healthy": "green"}


def test_theory_columns_appear_only_with_predictions():
    v = A.verdicts(frame())
    assert "theory" not in [c.header for c in T.verdict_table(v).columns]
    v[A.PREDICTED_FACTOR] = np.where(v[A.SIGNAL] == A.BACKWARD, 1.21, np.nan)
    v[A.MEASURED_FACTOR] = np.where(v[A.SIGNAL] == A.BACKWARD, 1.19, np.nan)
    v[A.AGREES] = pd.array([pd.NA, True, pd.NA, False], dtype="boolean")
    table = T.verdict_table(v)
    assert [c.header for c in table.columns][-3:] == ["theory", "measured*", "agrees"]
    assert "x1.21" in render(table) and "x1.19" in render(table)
    agrees = [c for c in table.columns if c.header == "agrees"][0]
    assert [getattr(cell, "plain", cell) for cell in agrees.cells] == ["—", "yes", "—", "no"]


def test_print_verdicts_writes_sentences():
    buf = io.StringIO()
    T.print_verdicts(A.verdicts(frame()), Console(file=buf, width=200, color_system=None))
    assert "plain56-bn: backward gradients explode toward the input: x1.80 per block" in buf.getvalue()
