"""gradscope.compare: two seed sets of one configuration do not differ; Kaiming vs Xavier without BN do, by the
factor theory gives (Xavier halves the ReLU forward variance per block); folders, lists and frames as sides; the
corrected statistics against tables and hand computations; the figure, page and files."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import gradscope
from gradscope.analysis import stats
from gradscope.analysis.compare import DIFFERS, SAME, UNCLEAR, compare, holm, t_cdf, t_quantile
from gradscope.errors import DataError
from gradscope.models import build


def _run(init: str, seed: int, steps: int = 3, out=None) -> pd.DataFrame:
    model = build("mlp", seed=seed, depth=8, width=64, in_features=32, init=init, bn=False)
    g = torch.Generator().manual_seed(100 + seed)
    with gradscope.attach(model, out=out) as scope:
        for _ in range(steps):
            x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            model.zero_grad()
            scope.step()
    frame = scope.frame()
    frame["run"] = f"{init}-s{seed}"
    return frame


@pytest.fixture(scope="module")
def sides(one_thread):
    kaiming = pd.concat([_run("kaiming", s) for s in (0, 1, 2, 3)], ignore_index=True)
    kaiming_again = pd.concat([_run("kaiming", s) for s in (4, 5, 6, 7)], ignore_index=True)
    xavier = pd.concat([_run("xavier", s) for s in (0, 1, 2, 3)], ignore_index=True)
    return kaiming, kaiming_again, xavier


def test_two_seed_sets_of_one_configuration_do_not_differ(sides):
    kaiming, kaiming_again, _ = sides
    result = gradscope.compare(kaiming, kaiming_again)
    assert not result.differs, result.summary()
    assert set(result.blocks["verdict"]) == {SAME}
    assert set(result.table["spread"]) == {"seeds"} and result.m == 16  # 8 blocks x 2 metrics
    assert (result.table["low"] < 0).all() and (result.table["high"] > 0).all()  # every interval holds 0


def test_kaiming_vs_xavier_without_bn_differs_by_the_factor_theory_gives(sides):
    kaiming, _, xavier = sides
    result = compare(kaiming, xavier, labels=("kaiming", "xavier"))
    assert result.differs
    fwd = result.table[result.table["metric"] == "act_var"].sort_values("depth")
    assert (fwd["verdict"] == DIFFERS).sum() >= 6  # the first blocks are close; the ratio compounds with depth
    # He et al. 2015: with ReLU, Xavier's weight variance 1/fan_in (vs 2/fan_in) halves the variance per block
    per_block = fwd["diff"].diff().dropna()
    assert math.exp(per_block.mean()) == pytest.approx(0.5, abs=0.08)
    assert (fwd["ratio"].iloc[-1] < 0.01) and "xavier vs kaiming" in result.summary()


def test_folders_and_lists_of_folders_are_sides(tmp_path, one_thread):
    folders = []
    for seed in (0, 1):
        _run("kaiming", seed, out=tmp_path / f"k{seed}")
        folders.append(tmp_path / f"k{seed}")
    x_folders = []
    for seed in (0, 1):
        _run("xavier", seed, out=tmp_path / f"x{seed}")
        x_folders.append(str(tmp_path / f"x{seed}"))
    result = compare(folders, x_folders)
    assert result.differs and result.runs_a == ["0:k0", "1:k1"] and set(result.table["n_a"]) == {2}
    single = compare(folders[0], x_folders[0])  # one run each: the step-to-step spread
    assert set(single.table["spread"]) == {"steps"}
    assert "Caution: one run per side" in single.summary() and "Caution" not in result.summary()


def test_one_run_and_one_step_per_side_is_unclear(sides):
    kaiming, kaiming_again, _ = sides
    a = kaiming[(kaiming.run == "kaiming-s0")]
    b = kaiming_again[(kaiming_again.run == "kaiming-s4")]
    result = compare(a, b, steps="first")
    assert set(result.blocks["verdict"]) == {UNCLEAR} and result.m == 0
    assert "unclear" in result.summary()


def test_two_sides_without_a_common_block_are_refused_not_called_the_same(sides):
    """Two unrelated models (no block name in common) were answered "0 of 17 blocks differ ... no difference beyond
    the noise", and `--fail-on differs` passed: nothing had been compared. Now that is an error saying so."""
    kaiming, _, _ = sides
    renamed = kaiming.assign(block="other." + kaiming["block"].astype(str))
    with pytest.raises(DataError, match="no block is recorded on both sides, so nothing can be compared"):
        compare(kaiming, renamed)
    partly = pd.concat([renamed[renamed.block != "other.blocks.0"], kaiming[kaiming.block == "blocks.0"]],
                       ignore_index=True)  # one block in common: that one is compared
    verdicts = compare(kaiming, partly).blocks.set_index("block")["verdict"]
    assert verdicts["blocks.0"] == SAME and (verdicts.drop("blocks.0") != SAME).all()


def test_students_t_and_holm_against_tables_and_hand_computation():
    # t(0.975, df) from published tables (to the digits printed there), beyond df 30 too: before, 1.96 stood for
    # every df above 30, and a 40-block verdict's interval was 3% too narrow
    table = {1: 12.706, 2: 4.303, 4: 2.776, 10: 2.228, 30: 2.042, 38: 2.024, 40: 2.021, 60: 2.000, 120: 1.980}
    for df, value in table.items():
        assert stats.t975(df) == pytest.approx(value, abs=6e-4)
        assert t_quantile(0.975, df) == pytest.approx(value, abs=6e-4)
        assert t_cdf(stats.t975(df), df) == pytest.approx(0.975, abs=1e-8)
    assert stats.t975(10 ** 6) == pytest.approx(1.95996, abs=1e-4) and stats.t975(0) == math.inf
    assert t_cdf(0.0, 3.5) == pytest.approx(0.5)
    assert t_quantile(0.995, 1000) == pytest.approx(2.581, abs=2e-3)  # ~ the normal's 2.576
    # Holm: sorted p (0.01, 0.02, 0.04) x (3, 2, 1) = (0.03, 0.04, 0.04), monotone
    assert holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)


def test_bad_input_is_one_clear_error(sides):
    kaiming, kaiming_again, _ = sides
    with pytest.raises(DataError, match="not recorded on both sides"):
        compare(kaiming, kaiming_again, metrics=["adam_m_norm"])
    with pytest.raises(DataError, match="share no recorded step"):
        compare(kaiming, kaiming_again.assign(step=kaiming_again.step + 100))
    with pytest.raises(DataError, match="correction"):
        compare(kaiming, kaiming_again, correction="fdr")
    with pytest.raises(DataError, match="not a gradscope frame"):
        compare(pd.DataFrame({"x": [1]}), kaiming)
    with pytest.raises(gradscope.GradscopeError, match="no gradscope records"):
        compare("/nonexistent/folder", kaiming)


def test_metrics_all_names_the_metrics_recorded_on_one_side_only(sides):
    """``metrics="all"`` compares what both sides recorded; a metric only one side has (here B dropped
    ``param_norm`` and A ``act_mean``) is named in the summary instead of vanishing from it."""
    kaiming, kaiming_again, _ = sides
    a = kaiming[kaiming["metric"] != "act_mean"]
    b = kaiming_again[kaiming_again["metric"] != "param_norm"]
    result = compare(a, b, metrics="all")
    assert not {"act_mean", "param_norm"} & set(result.table["metric"])
    assert result.one_sided == {"param_norm": "A", "act_mean": "B"}
    summary = result.summary()
    assert "Not compared, recorded on one side only: " in summary
    assert "param_norm (only A)" in summary and "act_mean (only B)" in summary
    assert "one side only" not in compare(kaiming, kaiming_again, metrics="all").summary()


def test_the_page_figure_and_files(sides, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from gradscope.render.compare import compare_figure, write_compare

    kaiming, _, xavier = sides
    result = compare(kaiming, xavier, metrics="all")
    assert {"act_var", "grad_norm", "act_mean", "param_norm"} <= set(result.table["metric"])
    fig = compare_figure(compare(kaiming, xavier))
    assert len(fig.axes) == 2
    page = write_compare(result, tmp_path)
    text = page.read_text()
    assert '<section id="compare">' in text and "data:image/png;base64," in text and "differs" in text
    saved = pd.read_csv(tmp_path / "compare.csv")
    assert len(saved) == len(result.table) and (tmp_path / "compare_blocks.csv").exists()


def _set(frame: pd.DataFrame, block_depth: int, metric: str, value: float, runs=None) -> pd.DataFrame:
    out = frame.copy()
    sel = (out["depth"] == block_depth) & (out["metric"] == metric)
    if runs is not None:
        sel &= out["run"].isin(runs)
    out.loc[sel, "value"] = value
    return out


def test_a_block_gone_to_zero_or_nan_on_one_side_differs_and_is_named(sides):
    """A change that kills a block's gradient (exactly 0) or makes it NaN was dropped from the mean of logs: the
    block came out "only in A" or "unclear (no interval ...)" and ``differs`` was False. It now differs, says why,
    and a mix of dead and living runs is unclear with its reason."""
    kaiming, kaiming_again, _ = sides
    dead = compare(kaiming, _set(kaiming_again, 3, "grad_norm", 0.0), labels=("base", "new"))
    row = dead.table[(dead.table["depth"] == 3) & (dead.table["metric"] == "grad_norm")].iloc[0]
    assert row["verdict"] == DIFFERS and row["ratio"] == 0.0 and dead.differs
    assert row["note"] == "new is exactly zero at every compared step of every run, base positive and finite"
    assert "grad_norm at block" in dead.summary() and "new is exactly zero" in dead.summary()
    assert set(dead.blocks["verdict"]) <= {SAME, DIFFERS}  # nothing is "only in A"
    flipped = compare(_set(kaiming, 3, "grad_norm", 0.0), kaiming_again)
    assert flipped.table.loc[(flipped.table["depth"] == 3) & (flipped.table["metric"] == "grad_norm"),
                             "ratio"].item() == math.inf  # A is the zero side: B is infinitely larger
    nan = compare(_set(kaiming, 5, "act_var", float("nan")), kaiming_again)
    row = nan.table[(nan.table["depth"] == 5) & (nan.table["metric"] == "act_var")].iloc[0]
    assert row["verdict"] == DIFFERS and "A is NaN or inf at every compared step of every run" in row["note"]
    one_run = sorted(set(kaiming_again["run"]))[:1]
    mixed = compare(kaiming, _set(kaiming_again, 3, "grad_norm", 0.0, runs=one_run))
    row = mixed.table[(mixed.table["depth"] == 3) & (mixed.table["metric"] == "grad_norm")].iloc[0]
    assert row["verdict"] == UNCLEAR and row["note"].startswith("zero or NaN at 3 of 12 value(s) of B")
    assert "not at the same steps" in mixed.summary()
    both = compare(_set(kaiming, 3, "grad_norm", 0.0), _set(kaiming_again, 3, "grad_norm", 0.0))
    assert both.table.loc[(both.table["depth"] == 3) & (both.table["metric"] == "grad_norm"), "verdict"].item() == SAME
    both_nan = compare(_set(kaiming, 3, "grad_norm", float("nan")), _set(kaiming_again, 3, "grad_norm", float("nan")))
    row = both_nan.table[(both_nan.table["depth"] == 3) & (both_nan.table["metric"] == "grad_norm")].iloc[0]
    assert row["verdict"] == UNCLEAR and row["note"] == "NaN or inf at every compared step of both sides"


def test_a_zero_at_some_steps_decides_nothing_alone(sides):
    """One zero step out of three decided the whole block ("differs", ratio inf, --fail-on differs exiting 3), and
    zeros at different steps on the two sides read as "same". Now: zeros at the same steps in every run of both
    sides leave those steps out, and compare the rest; zeros at other steps make the block unclear."""
    kaiming, kaiming_again, xavier = sides
    first = kaiming["step"].min()

    def zero_at(frame, step):
        out = frame.copy()
        out.loc[(out["depth"] == 3) & (out["metric"] == "grad_norm") & (out["step"] == step), "value"] = 0.0
        return out

    one_side = compare(zero_at(kaiming, first), kaiming_again)
    row = one_side.table[(one_side.table["depth"] == 3) & (one_side.table["metric"] == "grad_norm")].iloc[0]
    assert row["verdict"] == UNCLEAR and "not at the same steps" in row["note"] and not one_side.differs
    other_steps = compare(zero_at(kaiming, first), zero_at(xavier.assign(value=xavier["value"] * 100), first + 1))
    row = other_steps.table[(other_steps.table["depth"] == 3) & (other_steps.table["metric"] == "grad_norm")].iloc[0]
    assert row["verdict"] == UNCLEAR  # never "same" from zeros at different steps
    aligned = compare(zero_at(kaiming, first), zero_at(kaiming_again, first))
    row = aligned.table[(aligned.table["depth"] == 3) & (aligned.table["metric"] == "grad_norm")].iloc[0]
    assert row["verdict"] == SAME and row["note"] == f"step(s) {first} (zero) left out: the same in every run of both sides"
    assert row["n_a"] == 4 and math.isfinite(row["diff"])  # the other two steps were compared


def test_runs_that_repeat_each_other_are_no_evidence_of_a_difference(sides):
    """The same run passed twice has zero spread: the p-value was 0 and every block "differed" by x1.001
    [1, 1]. A nonzero difference over no spread is now unclear, and says why; an equal one stays same."""
    kaiming, _, _ = sides
    run = kaiming[kaiming["run"] == sorted(set(kaiming["run"]))[0]]
    twice = [run, run.assign(run="copy")]
    nudged = run.assign(value=run["value"] * 1.001)
    result = compare(twice, nudged)
    assert not result.differs and set(result.table["verdict"]) == {UNCLEAR}
    assert "no spread: the runs of a side repeat each other exactly" in result.summary()
    assert set(compare(twice, twice).table["verdict"]) == {SAME}
