"""One results object, one writer: one profile pass per phase, the same answers in every file, names escaped."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import gradscope
from gradscope import schema as S
from gradscope.analysis import profiles as P
from gradscope.render import report as R
from gradscope.render.markdown import md_escape


def frame(runs=("plain20", "resnet20"), n_blocks=6, steps=3, names=None):
    rows = []
    for r, run in enumerate(runs):
        for st in range(steps):
            for k in range(n_blocks):
                block = (names or [f"layer.{j}" for j in range(n_blocks)])[k]
                for metric, v in ((S.ACT_VAR, 1.05 ** k), (S.GRAD_NORM, 1.3 ** (n_blocks - k)),
                                  (S.PARAM_GRAD_NORM, 0.1)):
                    rows.append((st, block, k, "Block", metric, v * (1 + 0.01 * st), 0, run))
    return pd.DataFrame(rows, columns=list(S.COLUMNS) + [S.RUN])


def test_a_report_reads_the_frame_in_one_profile_pass(tmp_path, monkeypatch):
    """Issue 13: one gradscope.report call recomputed the per-block profile 12 times."""
    calls = []
    real = P.profile_pass
    monkeypatch.setattr(P, "profile_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    gradscope.report(frame(), tmp_path / "train", phase="train")
    assert len(calls) == 1
    calls.clear()
    gradscope.report(frame(steps=1), tmp_path / "init", phase="init")
    assert len(calls) == 1


def test_every_file_gives_the_same_verdicts(tmp_path):
    out = gradscope.report(frame(), tmp_path, phase="train")
    csv = pd.read_csv(out / R.VERDICTS_CSV)
    summary = json.loads((out / R.SUMMARY_JSON).read_text())
    assert [v["verdict"] for v in summary["verdicts"]["train"]] == list(csv["verdict"])
    assert set(csv["verdict"]) == {"exploding", "healthy"}  # grad x1.3 per block, act_var x1.05
    page = (out / R.HTML).read_text()
    assert page.index('id="claims"') < page.index('id="verdicts-train"') < page.index('id="figures"')


def test_names_with_markup_are_escaped_and_dollars_do_not_reach_mathtext(tmp_path):
    names = ["<img src=x onerror=alert(1)>", "a|b*c*", "$x_{1}$", "`tick`", "[link](http://x)", "ok"]
    f = frame(runs=("run$1$", "<b>bold</b>|x*"), names=names)
    last = (f[S.STEP] == 2) & (f[S.METRIC] == S.ACT_VAR) & (f[S.BLOCK] == names[0])
    f.loc[last, S.VALUE] = np.nan  # the sentence of the last step names the block where it diverged
    out = gradscope.report(f, tmp_path, phase="train")  # no matplotlib ParseException from the '$'
    text = (out / R.SUMMARY).read_text()
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)>" in text
    assert "<b>" not in text and "&lt;b>bold&lt;/b>\\|x\\*" in text and "run\\$1\\$" in text
    page = (out / R.HTML).read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page and "<b>bold" not in page
    assert md_escape("plain") == "plain" and md_escape("act_var") == "act_var"
    assert md_escape("step 0 -> 290, a & b") == "step 0 -> 290, a &amp; b"  # readable as plain text too
    assert md_escape("[l](u) `c` $m$") == "\\[l\\](u) \\`c\\` \\$m\\$"
    assert all((out / f).stat().st_size > 1000 for f in ("heatmap_act_var.png", "profile_grad_norm.png"))


def test_extra_files_are_written_by_the_one_writer(tmp_path):
    from pathlib import Path

    results = R.results_of_frame(frame(), phase="train")
    out = R.write_folder(results, tmp_path, format="records",
                         extra_files={"provenance.json": lambda p: Path(p).write_text('{"who": "test"}')})
    assert json.loads((out / "provenance.json").read_text()) == {"who": "test"}
    assert not (out / R.HTML).exists() and (out / R.SUMMARY).exists()
    assert not list(out.glob("*.tmp*"))


def test_phase_is_checked():
    from gradscope.errors import DataError

    with pytest.raises(DataError, match="phase"):
        R.results_of_frame(frame(), phase="later")
    _ = np
