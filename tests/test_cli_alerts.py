"""``gradscope profile`` reports training alerts (terminal, alerts.csv, summary.json, summary.md) and ``--fail-on``
takes the alert kinds."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from gradscope.cli import EXIT_FAIL_ON, FAIL_ON, main
from gradscope.schema import ALERT_KINDS

FIXTURE = Path(__file__).parent / "fixtures" / "user_models.py"
ARGS = ["profile", "--model", f"{FIXTURE}:tiny", "--input-shape", "3,8,8", "--seeds", "0", "--steps", "3",
        "--train-size", "64", "--batch-size", "16", "--init-batches", "1", "--format", "records"]


def test_every_alert_kind_is_a_fail_on_kind():
    assert set(ALERT_KINDS) <= set(FAIL_ON)


def test_a_learning_rate_too_small_is_reported_and_fails(tmp_path, capsys):
    # every step recorded: a ratio below the band is reported once three recorded steps in a row confirm it
    code = main(ARGS + ["--lr", "1e-9", "--every", "1", "--fail-on", "update_band", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == EXIT_FAIL_ON
    assert "tiny-s0 update_band at step 2" in captured.err
    assert "update_band" in captured.out  # the terminal's alert table
    alerts = pd.read_csv(tmp_path / "alerts.csv")
    assert set(alerts.kind) == {"update_band"} and (alerts.value < 1e-5).all() and (alerts.threshold == 1e-5).all()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["alerts"][0]["kind"] == "update_band"
    assert "## Alerts over training" in (tmp_path / "summary.md").read_text()


def test_no_alert_no_failure(tmp_path, capsys):
    code = main(ARGS + ["--fail-on", ",".join(ALERT_KINDS), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no alerts over training" in captured.out
    alerts = pd.read_csv(tmp_path / "alerts.csv")  # written though empty: checked, none found
    assert alerts.empty and list(alerts.columns)[:3] == ["run", "step", "kind"]
