"""``gradscope report`` on a folder that ``attach(out=...)`` wrote shows what the run showed: its alerts (from
``alerts.csv``) and the losses given to ``scope.step(loss=...)``, with a final loss only for a run that finished."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from gradscope.cli import main


def _run(out, steps=30, finish=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    scope = gradscope.attach(model, optimizer=opt, out=out, flush_every=5)
    for step in range(steps):
        opt.param_groups[0]["lr"] = 30.0 if step == 20 else 0.1  # a fault: alerts at steps 20 and 21
        x = torch.randn(32, 8, generator=g)
        loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
        loss.backward()
        scope.step(loss=loss)
        opt.step()
        opt.zero_grad()
    if finish:
        scope.detach()
    else:  # as if killed after the last flush: provenance.json still says "running"
        scope.flush()
    return scope


def test_the_report_of_an_attach_folder_lists_its_alerts_and_losses(tmp_path, one_thread):
    scope = _run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    found = scope.alerts()
    assert len(found) >= 2  # before: the report said nothing of them
    assert [(a["step"], a["kind"], a["block"]) for a in summary["alerts"]] == \
        [(int(s), k, None if pd.isna(b) else b) for s, k, b in zip(found.step, found.kind, found.block)]
    losses = pd.read_csv(tmp_path / "rep" / "losses.csv")
    assert dict(zip(losses.step, losses.loss)) == pytest.approx(scope.losses())
    last = [scope.losses()[s] for s in sorted(scope.losses())[-10:]]
    assert summary["final_loss"] == {"run": pytest.approx(sum(last) / 10)}
    assert "Alerts over training" in (tmp_path / "rep" / "summary.md").read_text()


def test_a_run_that_did_not_finish_has_losses_but_no_final_loss(tmp_path, one_thread):
    scope = _run(tmp_path / "run", steps=12, finish=False)
    try:
        assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
        summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
        assert summary["final_loss"] == {}
        assert len(pd.read_csv(tmp_path / "rep" / "losses.csv")) == 12  # scope.flush() wrote every loss
    finally:
        scope.detach()


def test_a_callback_folder_a_damaged_losses_part_and_an_infinite_final_loss(tmp_path, one_thread):
    import shutil

    scope = _run(tmp_path / "cb" / "records")  # a Lightning / Hugging Face callback writes its records here
    assert main(["report", str(tmp_path / "cb"), "--out", str(tmp_path / "rep")]) == 0
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert len(summary["alerts"]) == len(scope.alerts()) and summary["final_loss"]
    shutil.copytree(tmp_path / "cb" / "records", tmp_path / "bad")
    (tmp_path / "bad" / "losses-000000000.parquet").write_bytes(b"damaged")
    assert main(["report", str(tmp_path / "bad"), "--out", str(tmp_path / "rep2")]) == 0  # the report still comes
    summary = json.loads((tmp_path / "rep2" / "summary.json").read_text())
    assert any("losses are not shown" in n for n in summary["notes"]) and summary["final_loss"] == {}
    inf_run = tmp_path / "inf"
    shutil.copytree(tmp_path / "cb" / "records", inf_run)
    for part in inf_run.glob("losses-*.parquet"):
        part.unlink()
    gradscope.store.write_losses_part([(s, math.inf) for s in range(30)], inf_run, 0)  # a run that diverged
    assert main(["report", str(inf_run), "--out", str(tmp_path / "rep3")]) == 0
    text = (tmp_path / "rep3" / "summary.json").read_text()
    assert json.loads(text)["final_loss"] == {"run": None} and "Infinity" not in text  # valid JSON
