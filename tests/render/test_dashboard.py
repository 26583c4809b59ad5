"""report.html as a dashboard and the terminal at 80 columns, from one Results: claims first, one row per
configuration with its seeds pooled, theory agreement as one table, per-run detail one click away."""
from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.analysis.results import Claim
from gradscope.render import report as R
from gradscope.render import tables as T
from gradscope.render.terminal import print_results

SEEDS = (0, 1, 2)
LONG = "an-unusually-long-configuration-name-that-would-not-fit"


def xavier_mlp_frame() -> tuple[pd.DataFrame, dict]:
    """Three seeds of a Xavier ReLU MLP (theory: forward x0.5 per block) and three of a long-named copy; each
    seed measured with a little noise, backward far from theory so that theory 'disagrees' there."""
    rng = np.random.default_rng(0)
    rows, configs = [], {}
    for name in ("mlp-xavier", LONG):
        for seed in SEEDS:
            run = name + (f"-s{seed}" if seed else "")  # the study's run names; the configuration is a fact
            configs[run] = {S.MODEL: "mlp", S.BN: False, S.RESIDUAL: False, S.SHORTCUT: None, S.INIT: "xavier",
                            S.SEED: seed, "width": 64, "config": name}
            for k in range(10):
                noise = float(np.exp(rng.normal(0, 0.01)))
                rows.append((0, f"blocks.{k}", k, S.ACT_VAR, 0.5 ** k * noise, run, seed, name))
                rows.append((0, f"blocks.{k}", k, S.GRAD_NORM, 1.3 ** (9 - k) * noise, run, seed, name))
    f = pd.DataFrame(rows, columns=[S.STEP, S.BLOCK, S.DEPTH, S.METRIC, S.VALUE, S.RUN, S.SEED, "config"]).assign(
        **{S.KIND: "PlainBlock", S.CALL: 0, S.MODEL: "mlp", S.BN: False, S.RESIDUAL: False, S.SHORTCUT: None,
           S.INIT: "xavier"})
    return f, configs


@pytest.fixture(scope="module")
def results():
    f, configs = xavier_mlp_frame()
    res = R.results_of_frame(f, configs=configs, phase="init", title="dashboard test")
    res.claims = [
        Claim("deg", "Deeper plain nets train worse (degradation)", "yes", "plain56 - plain20 = +1.19 ± 0.20 nats",
              "train", how="a 95% interval over seeds", caveat="300 SGD steps", estimate=1.19, low=0.69, high=1.69,
              unit="nats"),
        Claim("bn", "BatchNorm keeps forward signals from vanishing", "unclear", "no run with BatchNorm", "init"),
    ]
    return res


def test_configurations_group_seeds_by_facts(results):
    from gradscope.render.groups import results_configurations

    config_of = results_configurations(results)
    assert config_of == {"mlp-xavier": "mlp-xavier", "mlp-xavier-s1": "mlp-xavier", "mlp-xavier-s2": "mlp-xavier",
                         LONG: LONG, f"{LONG}-s1": LONG, f"{LONG}-s2": LONG}
    assert T.config_overview(results, config_of) == "6 runs in 2 configurations (3 seeds each); measured at " \
        "initialisation."


def test_the_overview_says_how_many_runs_trained_when_only_some_did(results):
    """A default study trains its BN nets and measures their no-BN twins at initialisation only: "measured at
    initialisation and over training" said that of all 24 runs."""
    from types import SimpleNamespace

    from gradscope.render.groups import results_configurations

    config_of = results_configurations(results)
    init = results.frames["init"]
    some = init[init.run.isin(["mlp-xavier", "mlp-xavier-s1"])]
    for train, said in ((some, "measured at initialisation, 2 of them also over training."),
                        (init, "measured at initialisation and over training.")):
        both = SimpleNamespace(frames={"init": init, "train": train}, phases=lambda: ["init", "train"])
        assert T.config_overview(both, config_of).endswith(said)


def test_theory_is_one_row_per_configuration_and_signal(results):
    from gradscope.render.groups import results_configurations

    rows = T.theory_rows(results.verdicts["init"], results_configurations(results))
    assert len(rows) == 1 + 2 * 2  # two configurations x two signals, not one row per seed
    forward = [r for r in rows[1:] if r[1] == "forward"]
    assert all(r[2] == "3" and r[3] == "x0.50" and r[5] == "agrees" for r in forward), forward
    backward = [r for r in rows[1:] if r[1] == "backward"]
    assert all(r[5] != "agrees" for r in backward), backward  # the honest answer here is no


def test_html_opens_with_the_claims_table_and_keeps_detail_one_click_away(results, tmp_path):
    out = R.write_folder(results, tmp_path / "rep")
    page = (out / R.HTML).read_text()
    claims = page.index('id="claims"')
    assert claims < page.index('id="verdicts-init"') < page.index('id="figures"')
    table = page[claims:page.index("</table>", claims)]
    assert "+1.19 nats" in table and "+0.69 .. +1.69 nats" in table  # key number and interval
    assert table.count("<details") == 2 and "a 95% interval over seeds" in table  # evidence, one click away
    assert re.search(r'<td><span class="answer unclear">unclear</span></td><td class="num">—</td>', table)
    init = page[page.index('id="verdicts-init"'):page.index('id="figures"')]
    assert init.index("Theory beside measurement") < init.index("Every run (6 runs")  # per-run: in details
    assert re.search(r"<details><summary>Every run \(6 runs, 12 verdicts\)</summary><table", init)
    assert "<details><summary>How a verdict is decided</summary>" in init  # long explanation collapsed
    # the disagreement note appears once per configuration and signal, never once per seed
    notes = re.findall(r"<li>([^<]*)\(backward\): ", init)
    assert len(notes) == len(set(notes)) == 2


def test_terminal_is_readable_at_80_columns_with_the_claims_first(results):
    buf = io.StringIO()
    print_results(results, Console(file=buf, width=80, color_system=None))
    text = buf.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text and "..." not in text  # nothing cut off
    assert text.index("Deeper plain nets train worse") < text.index("at initialisation, per configuration")
    assert "YES" in text and "key number +1.19 nats, 95% interval +0.69 .. +1.69 nats" in text
    assert "UNCLEAR" in text and text.count("key number") == 1  # a claim without a number says none
    assert "an-unusually" in text and "would-not-fit" in text  # a long name folds onto the next line
    assert not any("mlp-xavier-s1" in line for line in lines)  # one row per configuration, not per seed


def test_piped_results_carry_no_trailing_spaces_and_no_cell_folds_in_the_training_table(results):
    """Piped (a log, CI, ``tee``), rich padded every table and wrapped line with spaces to 80 columns, and the
    training table's last column folded "exploding 3" onto two lines. The CLI's console trims the lines, and the
    tables collapse their padding, so the eight training columns fit (unknown among them)."""
    from gradscope.render.terminal import console

    buf = io.StringIO()
    shown = console(buf)
    print_results(results, shown)
    shown.file.flush()
    lines = buf.getvalue().splitlines()
    assert lines and not any(line != line.rstrip() for line in lines)
    assert max(len(line) for line in lines) <= 80 and "\x1b[" not in buf.getvalue()
    from gradscope.render.terminal import fit_table  # the training table's columns, as print_results picks them

    header = ["configuration", "signal", "healthy", "vanish.", "explod.", "div.", "unkn.", "last step (seeds)"]
    buf = io.StringIO()
    shown = console(buf)
    shown.print(fit_table([header, ["resnet20-nobn", "bwd", "100%", "100%", "100%", "100%", "100%", "exploding 3"]], "t"))
    shown.file.flush()
    row = [line for line in buf.getvalue().splitlines() if "resnet20-nobn" in line]
    assert len(row) == 1 and row[0].endswith("exploding 3") and len(row[0]) <= 80


def test_the_per_configuration_training_table_has_an_unknown_column_so_its_shares_add_up():
    """plain32-bn backward read 38% healthy + 38% vanishing with the other 24% (unknown steps) nowhere: only the
    per-run table had the column. The per-configuration rows (terminal, summary.md, report.html) now have it."""
    from gradscope.render import tables as T

    traj = pd.DataFrame([{"run": f"p-s{s}", "signal": "backward", "n_steps": 30, "frac_healthy": 0.38,
                          "frac_vanishing": 0.38, "frac_exploding": 0.0, "frac_diverged": 0.0, "frac_unknown": 0.24,
                          "last_verdict": "healthy"} for s in range(3)])
    rows = T.trajectory_config_rows(traj, {f"p-s{s}": "p" for s in range(3)})
    cells = dict(zip(rows[0], rows[1]))
    assert cells["unknown"] == "24%"
    shares = [float(cells[c].rstrip("%")) for c in ("healthy", "vanishing", "exploding", "diverged", "unknown")]
    assert sum(shares) == 100


def test_theory_and_per_block_tables_say_what_measured_star_and_their_units_are(tmp_path, one_thread):
    """A newcomer read "x1.11 unknown" in one table and "x1.28 agrees" in the next, with nothing saying that the
    starred column is fitted within stages, nor that "per block" is a variance ratio forward and a norm ratio
    backward. Both footnotes now stand under their tables in the terminal, summary.md and report.html."""
    import torch

    import gradscope
    from gradscope.models import build

    frames, configs = [], {}
    for seed in (0, 1):
        model = build("plain20", bn=False, seed=seed)
        with gradscope.attach(model) as scope:
            model(torch.randn(16, 3, 16, 16)).logsumexp(1).mean().backward()
            scope.step()
        run = f"plain20-s{seed}"
        frames.append(scope.frame().assign(run=run, seed=seed, config="plain20"))
        configs[run] = dict(model.gradscope_config, image_size=16, config="plain20", seed=seed)
    frame = pd.concat(frames, ignore_index=True)
    R.write_report(frame, tmp_path, configs=configs, phase="init")
    summary = (tmp_path / "summary.md").read_text()
    page = (tmp_path / "report.html").read_text()
    from gradscope.render.markdown import md_escape

    for note in (T.MEASURED_STAR, T.PER_BLOCK_UNITS):
        assert md_escape(note) in summary and note.split(";")[0] in page
    results = R.results_of_frame(frame, configs=configs, phase="init")
    buf = io.StringIO()
    shown = Console(file=buf, width=200)
    print_results(results, shown)
    text = " ".join(buf.getvalue().split())
    assert "measured*: the per-block factor fitted within stages" in text and "per block: forward as a ratio" in text


def test_alert_tables_name_each_alerts_metric_and_threshold():
    """The terminal showed "update_band stage1.0 4.578e-06" with neither the metric nor the threshold the value
    broke, and summary.md no metric. The tables now carry both; the terminal says each kind's metric below."""
    alerts = pd.DataFrame([
        {"run": "p-s0", "step": 120, "kind": "update_band", "block": "stage1.0", "metric": "update_ratio",
         "value": 4.578e-6, "threshold": 1e-5, "others": "", "origin": "", "note": ""},
        {"run": "p-s0", "step": 130, "kind": "loss_spike", "block": "", "metric": "", "value": 3.2,
         "threshold": 2.4, "others": "", "origin": "", "note": ""}])
    rows = T.alert_rows(alerts)
    assert rows[0][4:7] == ["metric", "value", "threshold"]
    assert rows[1][4:7] == ["update_ratio", "4.578e-06", "1e-05"] and rows[2][4] == "loss"
    results = R.results_of_frame(pd.DataFrame({S.STEP: [0], S.BLOCK: ["b"], S.DEPTH: [0], S.KIND: ["L"],
                                               S.METRIC: [S.ACT_VAR], S.VALUE: [1.0], S.CALL: [0]}), phase="train")
    results.alerts = alerts
    buf = io.StringIO()
    print_results(results, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "value: update_band reads update_ratio; loss_spike reads loss" in text and "1e-05" in text
