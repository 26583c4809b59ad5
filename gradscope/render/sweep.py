"""The figure of a :class:`gradscope.study.sweep.SweepResult`: each quantity against width, one line per block."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from gradscope.store import atomic_write

__all__ = ["sweep_figure", "write_sweep"]


def _escape(text: Any) -> str:
    return str(text).replace("$", r"\$")


def sweep_figure(values: pd.DataFrame, fits: pd.DataFrame):
    """One log-log panel per quantity (at the first depth): value against width per block, the fitted exponent with
    the 95% interval its verdict is decided by, and the verdict, in the legend. ``values``/``fits``: a SweepResult's
    frames."""
    import matplotlib.pyplot as plt

    depth = values["depth"].iloc[0] if len(values) else None
    if depth is not None and not pd.isna(depth):
        values = values[values["depth"] == depth]
        fits = fits[(fits["against"] == "width") & (fits["depth"] == depth)]
    else:
        fits = fits[fits["against"] == "width"]
    quantities = list(dict.fromkeys(values["quantity"]))
    cols = min(2, max(1, len(quantities)))
    rows = math.ceil(len(quantities) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, q in zip(axes.flat, quantities):
        g = values[values["quantity"] == q]
        for block, b in g.groupby("block", sort=False):
            fit = fits[(fits["block"] == block) & (fits["quantity"] == q)]
            label = _escape(block)
            if len(fit):
                f = fit.iloc[0]
                interval = (f" [{f['low']:+.2f}, {f['high']:+.2f}]" if np.isfinite(f["low"]) and np.isfinite(f["high"])
                            else "")
                label += f": a={f['exponent']:+.2f}{interval} ({_escape(f['verdict'])})"  # the verdict's 95% interval
            ax.plot(b["width"], b["value"], "o-", label=label, lw=1.2, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_ylabel(f"{_escape(q)} (log scale)")
        ax.set_title(f"{q} against width" + ("" if depth is None or pd.isna(depth) else f" (depth {depth})"),
                     fontsize=10)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(quantities):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def write_sweep(result: Any, out: Union[str, Path], dpi: int = 100) -> Path:
    """Write ``sweep_values.csv``, ``sweep_fits.csv`` and ``sweep.png`` into ``out``; returns the figure's path."""
    import io

    import matplotlib.pyplot as plt

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "sweep_values.csv", lambda tmp: result.values.to_csv(tmp, index=False))
    atomic_write(folder / "sweep_fits.csv", lambda tmp: result.fits.to_csv(tmp, index=False))
    fig = sweep_figure(result.values, result.fits)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(folder / "sweep.png", lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
    return folder / "sweep.png"
