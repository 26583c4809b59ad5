"""The data behind each picture: heatmap QuadMesh arrays, profile lines, tick labels that do not overlap."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.collections

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from gradscope import analysis as A  # noqa: E402
from gradscope.render import plots as P  # noqa: E402
from gradscope import schema as S  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def synthetic(n_blocks: int, n_steps: int, runs: dict, seed: int = 0) -> pd.DataFrame:
    """runs: {name: (forward factor, backward factor, n_blocks or None)}; lognormal noise per cell."""
    rng = np.random.default_rng(seed)
    parts = []
    for run, (ff, bf, nb) in runs.items():
        nb = nb or n_blocks
        k = np.tile(np.arange(nb), n_steps)
        step = np.repeat(np.arange(n_steps) * 10, nb)
        for metric, v in ((S.ACT_VAR, ff ** k), (S.GRAD_NORM, bf ** (nb - 1 - k)), (S.PARAM_GRAD_NORM, 0 * k + 3.0)):
            parts.append(pd.DataFrame({
                S.STEP: step.astype("int64"), S.BLOCK: [f"stage{j // 18}.block{j % 18}" for j in k],
                S.DEPTH: k.astype("int64"), S.KIND: "BasicBlock", S.METRIC: metric,
                S.VALUE: v * np.exp(rng.normal(0, 0.2, k.size)), S.CALL: np.zeros(k.size, "int64"), S.RUN: run}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(autouse=True)
def _close_all():
    yield
    plt.close("all")


def independent_pivot(frame: pd.DataFrame, metric: str, run: str) -> np.ndarray:
    """Block x step matrix built with plain loops, blocks by depth, steps ascending."""
    f = frame[(frame[S.METRIC] == metric) & (frame[S.RUN] == run) & (frame[S.CALL] == 0)]
    blocks = sorted(set(f[S.BLOCK]), key=lambda b: f.loc[f[S.BLOCK] == b, S.DEPTH].min())
    steps = sorted(set(f[S.STEP]))
    m = np.full((len(blocks), len(steps)), np.nan)
    for b, s, v in zip(f[S.BLOCK], f[S.STEP], f[S.VALUE]):
        m[blocks.index(b), steps.index(s)] = v
    return m


def quadmesh(ax) -> np.ma.MaskedArray:
    arr = ax.collections[0].get_array()
    return arr


def test_heatmap_draws_log10_of_the_pivot_with_bad_cells_masked():
    f = synthetic(30, 12, {"a": (1.2, 0.8, None)})
    f.loc[(f[S.METRIC] == S.GRAD_NORM) & (f[S.DEPTH] == 3) & (f[S.STEP] == 20), S.VALUE] = 0.0
    f.loc[(f[S.METRIC] == S.GRAD_NORM) & (f[S.DEPTH] == 5) & (f[S.STEP] == 40), S.VALUE] = np.nan
    f = f.drop(f.index[(f[S.METRIC] == S.GRAD_NORM) & (f[S.DEPTH] == 7) & (f[S.STEP] == 50)])
    fig, ax = plt.subplots()
    P.heatmap(f, S.GRAD_NORM, ax, run="a")
    drawn = quadmesh(ax)
    expect = independent_pivot(f, S.GRAD_NORM, "a")
    assert drawn.shape == expect.shape == (30, 12)
    bad = ~(np.isfinite(expect) & (expect > 0))
    assert bad.sum() == 3 and np.array_equal(np.ma.getmaskarray(drawn), bad)
    np.testing.assert_allclose(drawn.filled(np.nan)[~bad], np.log10(expect[~bad]), rtol=1e-12)
    assert "log10 grad_norm" in ax.figure.axes[-1].get_ylabel()  # the colour bar says what the colour is
    assert "a" in ax.get_title() and ax.get_xlabel() == "training step"


def test_heatmap_rows_follow_depth_not_names():
    f = synthetic(12, 3, {"a": (1.0, 1.0, None)})
    f[S.BLOCK] = f[S.DEPTH].map(lambda d: f"b{11 - d}")  # names sort the opposite way of depth
    m = P.heatmap_matrix(f, S.ACT_VAR, run="a")
    assert list(m.index) == [f"b{11 - d}" for d in range(12)]
    fig, ax = plt.subplots()
    P.heatmap(f, S.ACT_VAR, ax, run="a")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "b11" and all(lab in list(m.index) for lab in labels)


def test_runs_heatmap_aligns_runs_by_depth():
    f = synthetic(20, 4, {"plain20": (0.5, 1.0, 9), "resnet56": (1.0, 1.0, 27)})
    fig, ax = plt.subplots()
    P.runs_heatmap(f, S.ACT_VAR, ax, step="first")
    drawn = quadmesh(ax)
    assert drawn.shape == (27, 2)
    mask = np.ma.getmaskarray(drawn)
    assert not mask[:, 1].any() and not mask[:9, 0].any() and mask[9:, 0].all()
    for j, run in enumerate(["plain20", "resnet56"]):
        col = independent_pivot(f, S.ACT_VAR, run)[:, 0]  # step 0
        np.testing.assert_allclose(drawn.filled(np.nan)[: len(col), j], np.log10(col), rtol=1e-12)
    assert "step 0" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["plain20", "resnet56"]


def test_profile_lines_are_relative_to_the_reference_end_with_thresholds():
    f = synthetic(15, 5, {"x": (2.0, 1.5, None), "y": (1.0, 1.0, 10)})
    colors = P.run_colors(["x", "y"])
    fig, ax = plt.subplots()
    P.depth_profile(f, S.GRAD_NORM, ax, colors=colors, vanish=0.05, explode=50)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert ax.get_yscale() == "log"
    for run in ("x", "y"):
        prof = A.profile(f, S.GRAD_NORM)
        p = prof[prof[S.RUN] == run].sort_values(A.POSITION)[S.VALUE].to_numpy()
        np.testing.assert_allclose(lines[run].get_ydata(), p / p[-1], rtol=1e-12)  # backward: vs the last block
        assert matplotlib.colors.to_rgb(lines[run].get_color()) == pytest.approx(colors[run])
    # the class thresholds are per-block rates: x(0.05 ** (1/27)) and x(50 ** (1/27)) per block travelled
    lo, hi = A.rate_thresholds(0.05, 50)
    rate = {ln.get_label().split()[0]: ln for ln in ax.get_lines() if "per block" in ln.get_label()}
    for word, r in (("vanishing", lo), ("exploding", hi)):
        line = rate[word]
        travelled = 14 - np.asarray(line.get_xdata(), float)  # backward: counted from the last block
        np.testing.assert_allclose(line.get_ydata(), r ** travelled, rtol=1e-12)
    assert "÷" in ax.get_ylabel() and "log" in ax.get_ylabel()


def _threshold_lines(ax) -> dict:
    return {ln.get_label().split()[0]: ln for ln in ax.get_lines() if "per block" in ln.get_label()}


def test_profile_thresholds_are_the_cut_the_verdicts_judge_by():
    """The lines were the per-layer amplitude cut drawn as a per-block factor for every metric: wrong for act_var (a
    variance: squared) and for the built-in CIFAR nets (two layers per block: x1.044 per layer is x1.19 per block
    in variance). Now they are the verdicts' rate_thresholds for the metric's signal and the runs' layers; runs of
    different layers per block get no line, since none is right for all."""
    cifar = synthetic(9, 3, {"resnet20-s0": (1.1, 1.0, None)}).assign(**{S.KIND: "ResidualBlock", S.MODEL: "resnet20"})
    for metric, signal, per in ((S.ACT_VAR, A.FORWARD, 4.0), (S.GRAD_NORM, A.BACKWARD, 2.0)):
        fig, ax = plt.subplots()
        P.depth_profile(cifar, metric, ax)
        lo, hi = A.rate_thresholds(signal=signal, layers=2.0)
        layer_lo, layer_hi = A.layer_thresholds()
        assert hi == pytest.approx(layer_hi ** per) and lo == pytest.approx(layer_lo ** per)
        lines = _threshold_lines(ax)
        assert f"x{hi:.3f} per block (2 layers)" in lines["exploding"].get_label()
        k = np.asarray(lines["vanishing"].get_xdata(), float)
        travelled = k if metric == S.ACT_VAR else 8 - k
        np.testing.assert_allclose(lines["vanishing"].get_ydata(), lo ** travelled, rtol=1e-12)
    mlp = synthetic(9, 3, {"mlp-s0": (1.1, 1.0, None)}).assign(**{S.KIND: "Linear"})
    fig, ax = plt.subplots()
    P.depth_profile(pd.concat([cifar, mlp], ignore_index=True), S.GRAD_NORM, ax)
    assert _threshold_lines(ax) == {}  # 2 and 1 layers per block: no single cut


def test_profile_draws_theory_dashed_in_the_run_colour():
    f = synthetic(8, 2, {"x": (2.0, 1.0, None)})
    fig, ax = plt.subplots()
    P.depth_profile(f, S.ACT_VAR, ax, predicted={"x": [2.0 ** t for t in range(8)]})
    th = [ln for ln in ax.get_lines() if ln.get_label() == "_x (theory)"][0]
    assert any("theory" in t.get_text() for t in ax.get_legend().get_texts())  # one legend entry explains it
    assert th.get_linestyle() == "--" and list(th.get_xdata()) == list(range(8))
    np.testing.assert_allclose(th.get_ydata(), 2.0 ** np.arange(8))


def test_run_colours_are_stable_and_distinct():
    runs = [f"r{i}" for i in range(12)]
    c1, c2 = P.run_colors(runs), P.run_colors(runs)
    assert c1 == c2 and len(set(c1.values())) == 12


def test_tick_labels_never_overlap_at_110_blocks():
    f = synthetic(110, 200, {"resnet110": (1.0, 1.0, None)})
    fig = P.heatmap_figure(f, S.GRAD_NORM)
    fig.canvas.draw()
    ax = fig.axes[0]
    for labels, horizontal in ((ax.get_yticklabels(), False), (ax.get_xticklabels(), True)):
        boxes = sorted((t.get_window_extent() for t in labels if t.get_text()), key=lambda b: b.x0 if horizontal else b.y0)
        assert len(boxes) >= 8  # thinned, not dropped
        for a, b in zip(boxes, boxes[1:]):
            assert (a.x1 <= b.x0) if horizontal else (a.y1 <= b.y0)
    assert len(ax.get_yticklabels()) < 110


def test_heatmap_grid_shares_one_colour_scale():
    f = synthetic(10, 5, {"a": (2.0, 1.0, None), "b": (0.5, 1.0, None)})
    fig = P.heatmap_figure(f, S.ACT_VAR)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    meshes = [c for ax in panels for c in ax.collections if isinstance(c, matplotlib.collections.QuadMesh)]
    assert len(meshes) == 2 and meshes[0].get_clim() == meshes[1].get_clim()
    lo, hi = meshes[0].get_clim()
    everything = np.log10(f.loc[f[S.METRIC] == S.ACT_VAR, S.VALUE])
    assert lo == pytest.approx(everything.min()) and hi == pytest.approx(everything.max())


def test_importing_gradscope_modules_does_not_select_a_backend():
    code = ("import sys; sys.path.insert(0, '.'); import gradscope.render.plots, gradscope.render.report, gradscope.analysis;"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_log_axis_tick_labels_are_rendered_and_dollar_names_stay_literal(tmp_path, monkeypatch):
    """Through the report's own drawing path: render each profile figure, then read what its texts show.

    A log axis labels its ticks with math text (``$\\mathdefault{10^{0}}$``); drawn as math it is a few characters
    wide, drawn as raw text (math text switched off) it is the whole string. Names from data keep a literal ``$``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from gradscope.render import report as R

    frame = synthetic(12, 2, {"net$1$": (1.5, 0.7, None), "b": (1.0, 1.0, None)})
    frame[S.BLOCK] = frame[S.BLOCK].str.replace("block", "$blk$")
    captured = {}
    real_save = R._save
    monkeypatch.setattr(R, "_save", lambda fig, path, dpi: captured.setdefault(path.name, fig) and real_save(
        fig, path, dpi))
    R.draw_figures(frame, tmp_path)
    assert {"profile_act_var.png", "profile_grad_norm.png", "heatmap_act_var.png"} <= set(captured)
    for name in ("profile_act_var.png", "profile_grad_norm.png"):
        fig = captured[name]
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        ax = fig.axes[0]
        ticks = [t for t in ax.get_yticklabels() if "10^" in t.get_text() and t.get_visible()]
        assert ticks, [t.get_text() for t in ax.get_yticklabels()]
        for tick in ticks:
            shown, is_math = tick._preprocess_math(tick.get_text())
            assert is_math, f"{name}: tick label {tick.get_text()!r} would be drawn as raw text"
            raw = Text(0, 0, tick.get_text(), fontproperties=tick.get_fontproperties(), parse_math=False)
            raw.set_figure(fig)
            assert tick.get_window_extent(renderer).width < 0.5 * raw.get_window_extent(renderer).width
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        shown = [t._preprocess_math(t.get_text()) for t in ax.get_legend().get_texts()]
        assert ("net$1$", False) in shown, legend  # the run name, drawn as itself
    heat = captured["heatmap_act_var.png"]
    heat.draw(FigureCanvasAgg(heat).get_renderer())
    blocks = [t._preprocess_math(t.get_text()) for t in heat.axes[0].get_yticklabels()]
    assert blocks and all(not math and "$blk$" in s for s, math in blocks)


def test_profile_draws_each_configuration_with_its_seed_band():
    seeds = {f"cfg-{s}": (1.0, 0.8 + 0.05 * s, None) for s in range(3)}
    frame = synthetic(10, 3, {**seeds, "other": (1.0, 1.0, None)}, seed=3)
    groups = {**{r: "cfg" for r in seeds}, "other": "other"}
    fig, ax = plt.subplots()
    P.depth_profile(frame, S.GRAD_NORM, ax, groups=groups)
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert "cfg (3 seeds: mean and range)" in lines and "other" in lines
    assert not any(label.startswith("cfg-") for label in lines)  # no per-seed lines
    prof = A.profile(frame, S.GRAD_NORM)
    rel = []
    for run in seeds:
        p = prof[prof[S.RUN] == run].sort_values(A.POSITION)[S.VALUE].to_numpy()
        rel.append(p / p[-1])
    rel = np.array(rel)
    np.testing.assert_allclose(lines["cfg (3 seeds: mean and range)"].get_ydata(), np.exp(np.log(rel).mean(0)),
                               rtol=1e-10)
    bands = [c for c in ax.collections if c.get_label() == "_cfg (range over seeds)"]
    assert len(bands) == 1
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(rel.min()) and ys.max() == pytest.approx(rel.max())
    assert any("range over the seeds" in t.get_text() for t in ax.get_legend().get_texts())


def test_configurations_come_from_run_facts_not_names():
    facts = {"a": {"model": "plain20", "bn": True, "seed": 0}, "zz": {"model": "plain20", "bn": True, "seed": 1},
             "c": {"model": "plain20", "bn": False, "seed": 0}, "d": {"model": "x", "config": "mine", "seed": 4},
             "e": {"model": "y"}}
    assert P.configurations_of(facts) == {"a": "a", "zz": "a", "c": "c", "d": "mine", "e": "e"}
    assert P.configurations_of(None) is None


def test_the_reports_factor_over_training_draws_the_verdicts_cut():
    """report.html's per-block factor over training drew the per-layer amplitude cut for both signals; a run of two
    layers per block is judged forward by that cut to the 4th power, and that is the line now."""
    from gradscope.render.interactive import factor_figure

    rows = pd.DataFrame({S.RUN: ["r-s0", "r-s0"], S.STEP: [0, 10], A.SIGNAL: A.FORWARD, A.FACTOR: [1.1, 1.2],
                         A.LAYERS: 2.0})
    html = factor_figure(rows, A.FORWARD, {})
    lo, hi = A.rate_thresholds(signal=A.FORWARD, layers=2.0)
    assert f"exploding above x{hi:.3f}" in html and f"vanishing below x{lo:.3f}" in html
    assert f"x{A.layer_thresholds()[1]:.3f}" not in html
    mixed = pd.concat([rows, rows.assign(**{S.RUN: "m-s0", A.LAYERS: 1.0})], ignore_index=True)
    assert "exploding above" not in factor_figure(mixed, A.FORWARD, {})


def test_a_profile_names_the_runs_it_could_not_draw():
    """A seed with no rows at the step shown (stopped early) vanished from the figure without a word, and a step
    where every value was NaN drew an empty plot titled 'runs:'."""
    f = synthetic(9, 3, {"a-s0": (1.1, 1.0, None), "a-s1": (1.1, 1.0, None)})
    cut = f[~((f[S.RUN] == "a-s1") & (f[S.STEP] == 20))]  # a-s1 stopped after step 10
    fig, ax = plt.subplots()
    P.depth_profile(cut, S.GRAD_NORM, ax, step="last")
    notes = [t.get_text() for t in ax.texts]
    assert any(n.startswith("not drawn: a-s1 (no finite, positive grad_norm") for n in notes), notes
    nan = f.assign(**{S.VALUE: float("nan")})
    fig, ax = plt.subplots()
    P.depth_profile(nan, S.ACT_VAR, ax, step="last")
    assert "none drawn" in ax.get_title() and any("not drawn: a-s0, a-s1" in t.get_text() for t in ax.texts)


def test_the_over_training_share_table_has_an_unknown_column_so_shares_add_up():
    """A run whose fits never settled a class read 0% 0% 0% 0%: the table had no column for 'unknown'."""
    from gradscope.render.tables import trajectory_rows

    row = {"run": "r", "signal": "forward", "n_steps": 4, "frac_healthy": 0.25, "frac_vanishing": 0.0,
           "frac_exploding": 0.0, "frac_diverged": 0.0, "frac_unknown": 0.75, "first_step": 0,
           "first_verdict": "unknown", "first_factor": 1.1, "last_step": 30, "last_verdict": "healthy",
           "last_factor": 1.0, "moved": "near", "near_change": 1.0, "far_change": 1.0}
    header, cells = trajectory_rows(pd.DataFrame([row]))
    shares = dict(zip(header[3:8], cells[3:8]))
    assert shares == {"healthy": "25%", "vanishing": "0%", "exploding": "0%", "diverged": "0%", "unknown": "75%"}


def test_a_step_where_every_seed_is_nan_draws_a_gap_without_a_numpy_warning():
    """The CLI printed numpy's 'All-NaN slice encountered' as a gradscope warning for such a step."""
    import warnings

    import plotly.graph_objects as go

    from gradscope.render.interactive import _band_traces

    fig = go.Figure()
    wide = pd.DataFrame({"a-s0": [np.nan, 1.0], "a-s1": [np.nan, 2.0]}, index=[0, 10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _band_traces(fig, wide, "a", "#102030", "x")
    centre = [t for t in fig.data if "mean" in t.name][0]
    assert np.isnan(centre.y[0]) and centre.y[1] == pytest.approx(np.sqrt(2.0))


def test_a_long_metric_label_stays_inside_the_figure_and_short_ranges_read_as_plain_numbers():
    """``param_grad_norm``'s label with its description ran off both ends of the 5-inch profile, and a profile
    spanning less than a decade labelled its ticks ``6 x 10^0``. The label is now wrapped inside the figure, and
    such ticks read ``6``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    frame = synthetic(9, 2, {"a": (1.0, 1.0, None)})
    sel = frame[S.METRIC] == S.PARAM_GRAD_NORM
    frame.loc[sel, S.VALUE] = 1.2 + 0.7 * frame.loc[sel, S.DEPTH]  # 1.2 to 6.8: no decade inside
    fig = P.profile_figure(frame, S.PARAM_GRAD_NORM, step="last")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    label, page = ax.yaxis.label.get_window_extent(renderer), fig.bbox
    assert page.y0 <= label.y0 and label.y1 <= page.y1 and page.x0 <= label.x0, (label, page)
    assert "[L2 norm" in ax.get_ylabel() and "\n" in ax.get_ylabel()
    shown = [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_visible() and t.get_text()]
    assert shown and all(text.replace(".", "").isdigit() for text in shown), shown
    assert ax.get_title().startswith("param_grad_norm across depth")  # the metric's name once, not twice


def test_configs_given_to_the_report_decide_its_verdicts_and_its_threshold_lines(tmp_path):
    """A training frame of a built-in net has no ``model`` column: ``report(frame, configs=...)`` judged its
    verdicts at 1 layer per block ("layers per block unknown") although the configs say 2, and its profiles drew
    the 1-layer cut. Both now use the configs, as ``verdicts(frame, configs=...)`` does."""
    from gradscope.render.report import write_report

    cifar = synthetic(9, 3, {"run": (1.1, 0.9, None)}).drop(columns=S.RUN).assign(**{S.KIND: "PlainBlock"})
    facts = {"run": {"name": "plain20", "family": "cifar", "depth": 20, "residual": False, "bn": False}}
    write_report(cifar, tmp_path, configs=facts, phase="train")
    written = pd.read_csv(tmp_path / "verdicts.csv")
    assert set(written["layers_per_block"]) == {2.0} and set(written["unit"]) == {"per layer"}
    library = A.verdicts(cifar, step="all", configs=facts)
    assert list(written["verdict"]) == list(library["verdict"])
    fig, ax = plt.subplots()
    P.depth_profile(cifar, S.GRAD_NORM, ax, configs=facts)
    lo, hi = A.rate_thresholds(signal=A.BACKWARD, layers=2.0)
    assert f"x{hi:.3f} per block (2 layers)" in _threshold_lines(ax)["exploding"].get_label()


def test_a_profile_breaks_its_line_at_a_nan_block_and_names_the_zero_and_nan_blocks():
    """A NaN block was dropped, so the line ran straight from the block before it to the block after it, and the
    zero blocks vanished from the log axis without a word. The line now breaks there, and a note names both."""
    frame = synthetic(6, 2, {"a": (1.0, 0.5, None)})
    last = frame[S.STEP] == frame[S.STEP].max()
    grad = last & (frame[S.METRIC] == S.GRAD_NORM)
    frame.loc[grad & frame[S.DEPTH].isin([0, 1]), S.VALUE] = 0.0
    frame.loc[grad & (frame[S.DEPTH] == 4), S.VALUE] = float("nan")
    fig, ax = plt.subplots()
    P.depth_profile(frame, S.GRAD_NORM, ax, step="last")
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("a"))
    depths, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    assert 4 in depths and np.isnan(ys[list(depths).index(4)])  # a gap, not a bridge from 3 to 5
    notes = " ".join(t.get_text() for t in ax.texts)
    assert "lines break where a block has no value to draw: a: zero at depth 0, 1; NaN/inf at depth 4" in notes
    fig, ax = plt.subplots()
    P.depth_profile(synthetic(6, 2, {"a": (1.0, 0.5, None)}), S.GRAD_NORM, ax, step="last")
    assert not ax.texts  # nothing missing: no note


def test_heatmaps_of_a_frame_at_initialisation_do_not_call_its_batches_training_steps(tmp_path, monkeypatch):
    """An init-only study's heatmaps labelled their columns "training step", though no update ran between them."""
    from gradscope.render import report as R

    captured = {}
    real_save = R._save
    monkeypatch.setattr(R, "_save", lambda fig, path, dpi: captured.setdefault(path.name, fig) and real_save(
        fig, path, dpi))
    frame = synthetic(6, 2, {"a": (1.0, 1.0, None), "b": (1.1, 0.9, None)})
    R.write_report(frame, tmp_path / "init", phase="init")
    assert captured["heatmap_grad_norm.png"].axes[0].get_xlabel() == R.INIT_STEPS
    captured.clear()
    R.write_report(frame, tmp_path / "train", phase="train")
    assert captured["heatmap_grad_norm.png"].axes[0].get_xlabel() == "training step"


def test_a_seed_with_a_zero_block_breaks_its_configurations_line_there():
    """With several seeds, the line was the geometric mean of the seeds left at a depth: a seed zero there was
    dropped and the line went on through the others' values (biased up) while the note said it broke."""
    frame = synthetic(6, 2, {"cfg-s0": (1.0, 0.8, None), "cfg-s1": (1.0, 0.8, None)})
    frame["config"] = "cfg"
    last = frame[S.STEP] == frame[S.STEP].max()
    frame.loc[last & (frame[S.RUN] == "cfg-s0") & (frame[S.METRIC] == S.GRAD_NORM) & (frame[S.DEPTH] == 3),
              S.VALUE] = 0.0
    fig, ax = plt.subplots()
    P.depth_profile(frame, S.GRAD_NORM, ax, step="last", groups={"cfg-s0": "cfg", "cfg-s1": "cfg"})
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("cfg"))
    depths, ys = list(np.asarray(line.get_xdata(), float)), np.asarray(line.get_ydata(), float)
    assert np.isnan(ys[depths.index(3)]) and np.isfinite(ys[depths.index(2)])
    assert "cfg-s0: zero at depth 3" in " ".join(t.get_text() for t in ax.texts)


def test_the_init_profile_figure_names_its_log_axis_and_survives_a_dead_first_block():
    """report.html's profile at initialisation is drawn relative to its reference end: its y axis had no title, and
    a first block whose variance is exactly 0 (a dead layer) made every value of the run inf (a division by 0)."""
    from gradscope.render.interactive import init_profile_figure
    from gradscope.render.report import results_of_frame

    f = synthetic(6, 1, {"a-s0": (0.9, 0.8, None)})
    f = f[f[S.STEP] == f[S.STEP].min()].reset_index(drop=True)
    f.loc[(f[S.METRIC] == S.ACT_VAR) & (f[S.DEPTH] == 0), S.VALUE] = 0.0
    with np.errstate(all="raise"):
        html = init_profile_figure(results_of_frame(f, phase="init"), S.ACT_VAR)
    assert "its value at the first block (log scale)" in html and "Infinity" not in html  # the y axis title
