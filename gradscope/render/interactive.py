"""Interactive figures for ``report.html`` (plotly): hover for exact values, zoom, click a legend entry to hide a run.

Why plotly: a well-kept library (plotly.py, MIT) whose wheel carries ``plotly.min.js``, so the page embeds it
inline and opens offline with no network access and no CDN; its SVG scatter traces need no WebGL. Figures here are
built from the :class:`~gradscope.analysis.results.Results` only (losses, verdicts per step, init profiles).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.analysis.results import INIT, TRAIN
from gradscope.analysis.trajectory import run_group

_CONFIG = {"displaylogo": False, "responsive": True}
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
            "#bcbd22")


def plotly_js() -> str:
    """The plotly.js bundle shipped in the plotly wheel (inlined once per page)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _html(fig: Any, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(fig, full_html=False, include_plotlyjs=False, config=_CONFIG, div_id=div_id)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def loss_figure(losses: pd.DataFrame) -> Optional[str]:
    """Training loss per configuration: mean over seeds (line) and the seeds' range (band), one legend entry each."""
    import plotly.graph_objects as go

    if losses is None or losses.empty:
        return None
    data = losses.assign(group=[run_group(r) for r in losses[S.RUN]])
    fig = go.Figure()
    for i, (group, g) in enumerate(data.groupby("group", sort=False)):
        color = _PALETTE[i % len(_PALETTE)]
        wide = g.pivot_table(index=S.STEP, columns=S.RUN, values="loss", aggfunc="mean", dropna=False)
        steps = wide.index.to_numpy()
        mean = wide.mean(axis=1, skipna=False).to_numpy()
        lo, hi = wide.min(axis=1).to_numpy(), wide.max(axis=1).to_numpy()
        n = wide.shape[1]
        fig.add_trace(go.Scatter(x=np.concatenate([steps, steps[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                                 fill="toself", fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip",
                                 legendgroup=group, showlegend=False, name=f"{group} range"))
        fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines", line={"color": color, "width": 2},
                                 legendgroup=group, name=f"{group} (mean of {n} seed{'s' if n > 1 else ''})",
                                 hovertemplate="step %{x}<br>loss %{y:.3f}<extra>" + group + "</extra>"))
    fig.add_hline(y=float(np.log(10)), line_dash="dot", line_color="#888",
                  annotation_text="chance (ln 10)", annotation_position="top right")
    fig.update_layout(title="Training loss: mean over seeds (line) and their range (band)", xaxis_title="step",
                      yaxis_title="cross-entropy loss (nats)", height=420, margin={"t": 50, "b": 40})
    return _html(fig, "fig-losses")


def factor_figure(train_verdicts: pd.DataFrame, signal: str, thresholds: Dict[str, float]) -> Optional[str]:
    """Per-block factor at every recorded training step, one line per run, with the class thresholds."""
    import plotly.graph_objects as go

    if train_verdicts is None or train_verdicts.empty:
        return None
    v = train_verdicts[train_verdicts[A.SIGNAL] == signal]
    if v.empty:
        return None
    fig = go.Figure()
    for i, (run, g) in enumerate(v.groupby(S.RUN, sort=False)):
        g = g.sort_values(S.STEP)
        fig.add_trace(go.Scatter(x=g[S.STEP].astype(float), y=g[A.FACTOR].astype(float), mode="lines+markers",
                                 name=str(run), line={"color": _PALETTE[i % len(_PALETTE)]},
                                 customdata=g[A.VERDICT].astype(str),
                                 hovertemplate="step %{x}<br>x%{y:.3f} per block<br>%{customdata}<extra>"
                                               + str(run) + "</extra>"))
    lo, hi = A.rate_thresholds(thresholds.get("vanish", A.VANISH), thresholds.get("explode", A.EXPLODE))
    for y, word in ((lo, "vanishing below"), (hi, "exploding above")):
        fig.add_hline(y=y, line_dash="dash", line_color="#999", annotation_text=f"{word} x{y:.3f}")
    what = "forward act_var, toward the output" if signal == A.FORWARD else "backward grad_norm, toward the input"
    fig.update_layout(title=f"Per-block factor over training ({what})", xaxis_title="step",
                      yaxis_title="per-block factor", yaxis_type="log", height=420, margin={"t": 50, "b": 40})
    return _html(fig, f"fig-train-{signal}")


def init_profile_figure(results: Any, metric: str) -> Optional[str]:
    """Depth profile at initialisation relative to the reference end, one line per run, theory dashed."""
    import plotly.graph_objects as go
    from gradscope.agreement import predicted_profiles

    if INIT not in results.profiles:
        return None
    prof = results.profiles[INIT].get(metric, None)
    if prof.empty:
        return None
    predicted = predicted_profiles(results.frames[INIT], metric, configs=results.configs,
                                   profiles=results.profiles[INIT]) or {}
    fig = go.Figure()
    for i, (run, g) in enumerate(prof.groupby(S.RUN, sort=False)):
        g = g.sort_values(A.POSITION)
        vals = g[S.VALUE].to_numpy(dtype=float)
        ref = vals[0] if metric == S.ACT_VAR else vals[-1]
        x = g[A.POSITION].to_numpy() if metric == S.ACT_VAR else (g[A.POSITION].max() - g[A.POSITION]).to_numpy()
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Scatter(x=x, y=vals / ref, mode="lines+markers", name=str(run), legendgroup=str(run),
                                 line={"color": color}, text=list(g[S.BLOCK].astype(str)),
                                 hovertemplate="%{text}<br>%{y:.3g}<extra>" + str(run) + "</extra>"))
        if run in predicted:
            fig.add_trace(go.Scatter(x=list(range(len(predicted[run]))), y=predicted[run], mode="lines",
                                     name=f"{run} theory", legendgroup=str(run), showlegend=False,
                                     line={"color": color, "dash": "dash"}, hoverinfo="skip"))
    end = "first block" if metric == S.ACT_VAR else "last block"
    fig.update_layout(title=f"{metric} at initialisation, relative to the {end} (dashed: theory)",
                      xaxis_title=f"blocks travelled from the {end}", yaxis_type="log", height=420,
                      margin={"t": 50, "b": 40})
    return _html(fig, f"fig-init-{metric}")


def figures(results: Any) -> Dict[str, List[str]]:
    """The page's interactive figures by section: ``losses``, ``init``, ``train`` (HTML fragments)."""
    out: Dict[str, List[str]] = {"losses": [], "init": [], "train": []}
    fig = loss_figure(results.losses) if results.final_losses else None
    if fig:
        out["losses"].append(fig)
    for metric in (S.ACT_VAR, S.GRAD_NORM):
        f = init_profile_figure(results, metric)
        if f:
            out["init"].append(f)
    train = results.verdicts.get(TRAIN)
    for signal in (A.FORWARD, A.BACKWARD):
        f = factor_figure(train, signal, results.thresholds)
        if f:
            out["train"].append(f)
    return out
