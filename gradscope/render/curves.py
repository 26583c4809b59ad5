"""Error curves in the style of He et al. 2016, Fig. 6: training error dashed, test error bold, over iterations.

One panel for the plain nets and one for the residual nets, one colour per depth; with several seeds a line is
their mean and a band spans the lowest to the highest seed. A function of ``(curves, ...) -> figure`` with no
hidden state; ``curves`` is the frame of :data:`gradscope.study.recipe_train.CURVE_COLUMNS`.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import pandas as pd

from gradscope.render.plots import new_figure, run_colors


def _depth(model: str) -> int:
    digits = "".join(ch for ch in str(model) if ch.isdigit())
    return int(digits) if digits else 0


def panels(curves: pd.DataFrame) -> List[Tuple[str, List[str]]]:
    """``[(title, models)]``: plain nets, then residual nets, each by depth (models of other families last)."""
    models = sorted(curves["model"].unique(), key=_depth)
    plain = [m for m in models if str(m).startswith("plain")]
    residual = [m for m in models if str(m).startswith("resnet")]
    other = [m for m in models if m not in plain and m not in residual]
    chosen = [("plain", plain), ("ResNet", residual), ("other", other)]
    return [(title, group) for title, group in chosen if group]


def seed_band(curves: pd.DataFrame, model: str, column: str) -> pd.DataFrame:
    """Per iteration of ``model``: ``mean``, ``low`` and ``high`` of ``column`` over seeds, in percent."""
    rows = curves[curves["model"] == model]
    grouped = rows.groupby("iteration")[column]
    return pd.DataFrame({"mean": 100 * grouped.mean(), "low": 100 * grouped.min(), "high": 100 * grouped.max()})


def error_figure(curves: pd.DataFrame, *, test_column: str = "test_error") -> Any:
    """The Fig. 6-style figure; ``test_column`` may be ``val_error`` to draw the validation error instead."""
    groups = panels(curves)
    fig = new_figure(figsize=(5.2 * max(1, len(groups)), 3.8), layout="constrained")
    colors = run_colors([m for _, models in groups for m in models])
    for index, (title, models) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), index + 1)
        for model in models:
            for column, style, width in (("train_error", "--", 1.0), (test_column, "-", 2.2)):
                band = seed_band(curves, model, column)
                x = band.index.to_numpy() / 1e4
                label = f"{model}" if column == test_column else None
                ax.plot(x, band["mean"], linestyle=style, linewidth=width, color=colors[model], label=label)
                if (band["high"] > band["low"]).any():
                    ax.fill_between(x, band["low"], band["high"], color=colors[model], alpha=0.15, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("iterations (1e4)")
        ax.set_ylabel("error (%)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title=f"dashed: training, bold: {test_column.split('_')[0]}", title_fontsize=7)
    return fig
