"""Fig. 6-style error curves: the plotted data equal the seeds' means, training dashed, test bold, bands span seeds."""
from __future__ import annotations

import numpy as np
import pandas as pd

from gradscope.render.curves import error_figure, panels, seed_band


def curves() -> pd.DataFrame:
    rows = []
    for model in ("plain20", "plain56", "resnet20", "resnet110"):
        for seed in (0, 1):
            for it in (1000, 2000, 3000):
                base = 0.5 / (1 + it / 1000) + 0.01 * seed + (0.05 if model == "plain56" else 0)
                rows.append((f"{model}-s{seed}", model, seed, it, 0.1, 1.0, base, base + 0.02, base + 0.03))
    return pd.DataFrame(rows, columns=["run", "model", "seed", "iteration", "lr", "train_loss", "train_error",
                                       "val_error", "test_error"])


def test_panels_split_plain_and_residual_by_depth():
    assert panels(curves()) == [("plain", ["plain20", "plain56"]), ("ResNet", ["resnet20", "resnet110"])]


def test_lines_are_seed_means_training_dashed_test_bold():
    data = curves()
    fig = error_figure(data)
    plain_ax = fig.axes[0]
    lines = plain_ax.get_lines()
    assert len(lines) == 4  # two models x (training, test)
    train56 = [ln for ln in lines if ln.get_linestyle() == "--"][1]
    test56 = [ln for ln in lines if ln.get_linestyle() == "-"][1]
    expected = seed_band(data, "plain56", "train_error")["mean"].to_numpy()
    np.testing.assert_allclose(train56.get_ydata(), expected)
    np.testing.assert_allclose(test56.get_ydata(), seed_band(data, "plain56", "test_error")["mean"].to_numpy())
    np.testing.assert_allclose(train56.get_xdata(), [0.1, 0.2, 0.3])
    assert test56.get_linewidth() > train56.get_linewidth()
    band = seed_band(data, "plain56", "test_error")
    np.testing.assert_allclose(band["high"] - band["low"], 1.0)  # seeds differ by 0.01 = 1 percentage point
    assert [t.get_text() for t in plain_ax.get_legend().get_texts()] == ["plain20", "plain56"]
