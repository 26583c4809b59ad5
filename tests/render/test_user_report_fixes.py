"""What a new user saw go wrong in a profile's folder: the chance line of the loss chart, an interrupted study's
banner and status, an init-only study's alert section, and ``gradscope report DIR`` rebuilding a profile folder."""
from __future__ import annotations

import json
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


STOPPING_MODEL = '''
import torch
from torch import nn


def net():
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    for i in range(100):
        if seed == 1 and i == 3:
            raise KeyboardInterrupt  # Ctrl-C in the second run's training
        yield torch.randn(batch_size, 4, generator=g), torch.randint(0, 3, (batch_size,), generator=g)
'''


def _interrupted_profile(folder: Path, capsys) -> str:
    model = folder.parent / "stopping.py"
    model.write_text(STOPPING_MODEL)
    main(["profile", "--model", f"{model}:net", "--seeds", "0,1,2", "--steps", "4", "--every", "1",
          "--init-batches", "1", "--batch-size", "8", "--out", str(folder)])
    return capsys.readouterr().out


def test_an_interrupted_profile_says_so_at_the_top_of_every_output(tmp_path, capsys):
    out = tmp_path / "out"
    terminal = _interrupted_profile(out, capsys)
    line = "INTERRUPTED: the study was stopped before it finished; 1 of 3 runs finished (1 more cut off part-way"
    head = " ".join(terminal.split()[:40])
    assert line in head  # the terminal says it before the tables
    summary = (out / "summary.md").read_text()
    assert line in summary[:summary.index("## Claims")]
    claims = (out / "claims.md").read_text()
    assert line in claims.splitlines()[2]
    html = (out / "report.html").read_text()
    assert html.index('id="interrupted"') < html.index('id="claims"')
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["interrupted"] is True and provenance["status"] == "interrupted"


def test_a_finished_profile_has_no_interruption_line(tmp_path):
    results = gradscope.profile(model=seven_classes, input_shape=(3, 2, 2), out=tmp_path, **TINY)
    assert results.interruption() is None and results.finished_runs() == ["seven_classes-s0"]
    assert "INTERRUPTED" not in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "provenance.json").read_text())["status"] == "finished"


def test_an_init_only_study_says_nothing_about_alerts_over_training(tmp_path, capsys):
    code = main(["profile", "--model", f"{TASKS}:lm", "--seeds", "0", "--init-only", "--init-batches", "1",
                 "--batch-size", "8", "--out", str(tmp_path)])
    terminal = capsys.readouterr().out
    assert code == EXIT_OK
    assert "alerts" not in " ".join(terminal.split()).lower()
    assert "Alerts over training" not in (tmp_path / "report.html").read_text()
    assert "Alerts over training" not in (tmp_path / "summary.md").read_text()


def test_report_on_an_interrupted_profile_folder_keeps_its_runs_and_answers(tmp_path, capsys):
    out = tmp_path / "out"
    _interrupted_profile(out, capsys)
    profile_claims = (out / "claims.md").read_text()
    losses = (out / "losses.csv").read_text()
    (out / "records" / "net-s2" / "train").mkdir(parents=True)  # a run started but cut off before it returned
    pd.read_parquet(next((out / "records" / "net-s1").rglob("*.parquet"))).assign(run="net-s2").to_parquet(
        out / "records" / "net-s2" / "train" / "part-00000.parquet")
    assert main(["report", str(out)]) == EXIT_OK
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["run"] for r in summary["verdicts"]["init"]}
    assert runs == {"net-s0", "net-s1"}  # the profile's runs, not the one cut off before it returned
    assert "net-s2" in " ".join(summary["notes"])
    claims = (out / "claims.md").read_text()
    assert "not a study" not in claims
    assert "losses.csv" in claims and "alerts.csv" in claims and "claims.profile.md" in claims
    assert "INTERRUPTED" in claims.splitlines()[2]
    assert (out / "claims.profile.md").read_text() == profile_claims  # the profile's answers are never lost
    assert (out / "losses.csv").read_text() == losses


def test_log_axes_say_powers_of_ten_and_depth_axes_whole_blocks():
    from gradscope.render.interactive import depth_axis, log_axis

    wide = log_axis([1e-3, 0.5, 1.0])
    assert wide["exponentformat"] == "power" and wide["dtick"] == 1 and wide["minor"]["dtick"] == "D1"
    narrow = log_axis([0.9, 1.1])  # within a decade: plotly picks the ticks, still as powers
    assert narrow["exponentformat"] == "power" and "dtick" not in narrow
    assert depth_axis([0, 1, 2, 3])["dtick"] == 1 and depth_axis(range(56))["dtick"] == 6


def test_the_report_page_uses_those_axes(tmp_path):
    gradscope.profile(model=seven_classes, input_shape=(3, 2, 2), out=tmp_path, **TINY)
    html = (tmp_path / "report.html").read_text()
    assert html.count('"exponentformat":"power"') >= 2 and '"tickformat":"d"' in html
    from matplotlib import pyplot as plt  # the PNG depth profile of three blocks: whole-block ticks only

    from gradscope.render import plots
    frame = pd.read_parquet(tmp_path / "init_records.parquet")
    fig, ax = plt.subplots()
    plots.depth_profile(frame, "grad_norm", ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks)
