"""The width sweep: a standard-parametrised MLP trained with Adam changes its activations ~ width^1 within a few
steps; the muP-parametrised one stays flat (Yang et al. 2021, Tensor Programs V); the exponent fit and its verdict
against exact power laws; depth fits; bad input."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradscope.errors import GradscopeError, ModelError
from gradscope.study.sweep import STABLE, UNCLEAR, fit_exponent, sweep, verdict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import width_nets  # noqa: E402

WIDTHS = [64, 128, 256, 512, 1024]
HIDDEN = ["hidden.0", "hidden.1", "hidden.2"]


@pytest.fixture(scope="module")
def results(one_thread):
    blocks = HIDDEN + ["out"]
    return {name: sweep(getattr(width_nets, name), WIDTHS, optimizer=width_nets.adam, steps=4, blocks=blocks)
            for name in ("sp", "mup")}


def test_sp_with_adam_grows_its_activations_with_width(results):
    sp = results["sp"]
    verdicts = sp.verdicts("act_change")
    fits = sp.fits[(sp.fits["quantity"] == "act_change") & sp.fits["block"].isin(HIDDEN)]
    assert all(verdicts[b].startswith("grows ~ width^") for b in HIDDEN), verdicts
    # each entry moves by ~lr under Adam, a fan-in of n sums n such moves: ~ width^1 (less deeper, where the
    # incoming activations' own change is not yet width-dominated at these widths)
    assert fits["exponent"].between(0.5, 1.15).all(), fits
    assert "act_change: 0 of 4" in sp.summary()


def test_mup_with_adam_stays_flat(results):
    mup = results["mup"]
    verdicts = mup.verdicts("act_change")
    assert all(verdicts[b] == STABLE for b in HIDDEN), mup.fits
    fits = mup.fits[(mup.fits["quantity"] == "act_change") & mup.fits["block"].isin(HIDDEN)]
    assert (fits["exponent"].abs() < 0.1).all()
    assert all(mup.verdicts("act_rms")[b] == STABLE for b in HIDDEN)


def test_the_exponent_fit_and_its_verdict_on_exact_power_laws():
    sizes = [64, 128, 256, 512]
    a, se, k = fit_exponent(sizes, [3.0 * s ** 0.5 for s in sizes])
    assert (a, k) == (pytest.approx(0.5), 4) and se == pytest.approx(0.0, abs=1e-12)
    assert verdict(a, se, k, 0.2) == ("grows ~ width^0.50", pytest.approx(0.5), pytest.approx(0.5))
    assert verdict(-0.7, 0.01, 5, 0.2)[0] == "shrinks ~ width^-0.70"
    assert verdict(0.01, 0.01, 5, 0.2)[0] == STABLE
    assert verdict(0.1, 0.2, 5, 0.2)[0] == UNCLEAR  # the interval spans the band's edge: not decided
    assert verdict(*fit_exponent([64, 128], [1.0, 2.0]), 0.2)[0] == UNCLEAR  # two points: no scatter to judge
    noisy = [s ** -1.0 * (1.3 if i % 2 else 0.7) for i, s in enumerate(sizes)]
    a, se, k = fit_exponent(sizes, noisy)
    assert a < -0.5 and se > 0.05


def test_depths_are_swept_and_fitted_against_depth(one_thread):
    result = sweep(width_nets.sp, [32, 64, 128], depths=[1, 2, 3], optimizer=width_nets.adam, steps=1,
                   blocks=lambda name, m: name.startswith("hidden."))
    assert sorted(result.values["depth"].unique()) == [1, 2, 3]
    by_depth = result.fits[result.fits["against"] == "depth"]
    assert set(by_depth["width"]) == {32, 64, 128} and (by_depth["n_sizes"] == 3).all()


def test_bad_input_is_one_clear_error():
    with pytest.raises(GradscopeError, match="three or more distinct"):
        sweep(width_nets.sp, [64, 128])
    with pytest.raises(ModelError, match="width="):
        sweep(lambda: nn.Linear(3, 3), [8, 16, 32])
    with pytest.raises(GradscopeError, match="batches"):
        sweep(width_nets.sp, [8, 16, 32], steps=3, batches=[(torch.randn(2, 32), torch.tensor([0, 1]))])


def test_the_figure_and_files(results, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from gradscope.render.sweep import write_sweep

    png = write_sweep(results["sp"], tmp_path)
    assert png.stat().st_size > 1000 and (tmp_path / "sweep_fits.csv").exists()
    assert math.isfinite(results["sp"].fits["exponent"].iloc[0])


def test_the_figure_and_summary_quote_the_interval_the_verdict_is_decided_by(results, monkeypatch):
    """The legend printed ``a=+0.72±0.26`` (the standard error) where the verdict reads the 95% interval
    [-0.41, +1.85]; and the y axes had no label. Both now show what decides the verdict."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    from gradscope.render.sweep import sweep_figure

    result = results["sp"]
    fig = sweep_figure(result.values, result.fits)
    ax = fig.axes[0]
    quantity = ax.get_title().split(" against")[0]
    assert ax.get_ylabel() == f"{quantity} (log scale)"
    fits = result.fits[(result.fits["against"] == "width") & (result.fits["quantity"] == quantity)]
    fits = fits[fits["depth"] == result.values["depth"].iloc[0]]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for f in fits.to_dict("records"):
        want = f"a={f['exponent']:+.2f} [{f['low']:+.2f}, {f['high']:+.2f}] ({f['verdict']})"
        assert any(want in label for label in labels), (want, labels)
    assert "±" not in " ".join(labels) and "±" not in result.summary()
    plt.close(fig)
