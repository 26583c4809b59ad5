"""Names with line breaks or ``|`` (block and run names come from user code) never break summary.md's tables."""
from __future__ import annotations

import re

import pandas as pd

import gradscope
from gradscope import schema as S
from gradscope.render import report as R
from gradscope.render.markdown import md_escape

_PIPE = re.compile(r"(?<!\\)\|")  # a cell separator: a | not escaped


def _frame(runs, names, steps=3):
    rows = [(st, block, k, "Block", metric, (1.1 ** k) * (1 + 0.01 * st), 0, run)
            for run in runs for st in range(steps) for k, block in enumerate(names)
            for metric in (S.ACT_VAR, S.GRAD_NORM, S.PARAM_GRAD_NORM)]
    return pd.DataFrame(rows, columns=list(S.COLUMNS) + [S.RUN])


def test_md_escape_keeps_a_name_on_one_line_and_shows_its_breaks():
    assert md_escape("a\nb") == "a\\\\nb"  # shown as a\nb
    assert md_escape("a\r\nb|c") == "a\\\\r\\\\nb\\|c"
    for brk in ("\r", "\v", "\f", "\x85", "\u2028", "\u2029", "\x1c"):
        assert len(md_escape(f"x{brk}y").splitlines()) == 1, repr(brk)


def test_line_breaks_and_pipes_in_block_and_run_names_leave_every_table_row_whole(tmp_path):
    names = ["stem", "a\nb", "c|d", "e\r\nf|g", "h\u2028i", "ok"]
    f = _frame(runs=("run\none", "run|two"), names=names)
    out = gradscope.report(f, tmp_path, phase="train")
    text = (out / R.SUMMARY).read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "| run\\\\none | forward |" in text and "| run\\|two | backward |" in text
    table, width = [], None
    for line in lines + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:  # every row of a table has the header's number of cells
            widths = {len(_PIPE.findall(row)) for row in table}
            assert len(widths) == 1, table
            table = []
    assert sum(line.startswith("|") for line in lines) >= 6  # the tables are there (2 runs x 2 signals)
    for line in lines:  # no line is a stray piece of a name cut at its line break
        assert not line.startswith(("b", "f|g", "i ", "one", "\\|two")), line
