"""What a new user saw go wrong in a profile's folder: the chance line of the loss chart, an interrupted study's
banner and status, an init-only study's alert section, and ``gradscope report DIR`` rebuilding a profile folder."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
from torch import nn

import gradscope
from gradscope.cli import EXIT_OK, main
from gradscope.render.interactive import loss_figure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TASKS = FIXTURES / "tasks.py"
TINY = dict(seeds=[0], steps=2, every=1, init_batches=1, batch_size=8, train_size=32)


def seven_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 7))


def _chance_labels(html: str) -> list:
    return re.findall(r"chance[^\"<]*\(ln \d+\)", html)


def test_the_chance_line_is_ln_of_the_runs_classes(tmp_path):
    gradscope.profile(model=seven_classes, input_shape=(3, 2, 2), out=tmp_path, **TINY)
    labels = _chance_labels((tmp_path / "report.html").read_text())
    assert labels == ["chance (ln 7)"]


def test_no_chance_line_when_the_classes_are_unknown(tmp_path, capsys):
    """A sequence model with its own loss: its number of classes is not a config fact, so no chance line
    (before: "chance (ln 10)" at 2.30 under a loss near ln 50 = 3.9)."""
    code = main(["profile", "--model", f"{TASKS}:lm", "--seeds", "0", "--steps", "2", "--every", "1",
                 "--init-batches", "1", "--batch-size", "8", "--out", str(tmp_path)])
    capsys.readouterr()
    assert code == EXIT_OK
    assert _chance_labels((tmp_path / "report.html").read_text()) == []


def test_each_configuration_gets_its_own_chance_when_they_differ():
    losses = pd.DataFrame({"run": ["a-s0", "a-s0", "b-s0", "b-s0"], "config": ["a", "a", "b", "b"],
                           "step": [0, 1, 0, 1], "loss": [3.0, 2.9, 1.5, 1.4]})
    html = loss_figure(losses, {"a-s0": {"num_classes": 50}, "b-s0": {"num_classes": 4}})
    assert sorted(_chance_labels(html)) == ["chance a (ln 50)", "chance b (ln 4)"]
    assert f"{math.log(50):.6f}"[:6] in html
    assert _chance_labels(loss_figure(losses, {"a-s0": {"num_classes": 5}})) == ["chance (ln 5)"]
