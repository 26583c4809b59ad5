"""Interactive figures for ``report.html`` (plotly): hover for exact values, zoom, click a legend entry to hide a run.

Why plotly: a well-kept library (plotly.py, MIT) whose wheel carries ``plotly.min.js``, so the page embeds it
inline and opens offline with no network access and no CDN; its SVG scatter traces need no WebGL. Figures here are
built from the :class:`~gradscope.analysis.results.Results` only (losses, verdicts per step, init profiles).
"""
from __future__ import annotations

import math

import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.analysis.results import INIT, TRAIN
from gradscope.analysis.trajectory import configurations

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


def log_axis(values: Any) -> Dict[str, Any]:
    """Layout of a log y axis: labels as powers of ten (10^-1, not 0.1); across a decade or more, one labelled tick
    per decade and unlabelled minor ticks at 2..9 (plotly's default labels them with bare digits)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    axis: Dict[str, Any] = {"type": "log", "exponentformat": "power", "showexponent": "all"}
    if v.size and np.log10(v.max()) - np.log10(v.min()) >= 1:
        axis.update(dtick=1, minor={"dtick": "D1", "ticks": "outside", "showgrid": True, "gridcolor": "#eee"})
    return axis


def depth_axis(depths: Any) -> Dict[str, Any]:
    """Layout of a block-depth axis: whole blocks only (never 0.5 or 1.5 blocks), at most about ten labels."""
    d = np.asarray(depths, dtype=float)
    span = float(np.nanmax(d) - np.nanmin(d)) if d.size else 0.0
    return {"tick0": 0, "dtick": max(1, int(np.ceil(span / 10))), "tickformat": "d"}


def _ys(fig: Any) -> List[float]:
    return [y for t in fig.data if t.y is not None for y in np.asarray(t.y, dtype=float).ravel()]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def chance_levels(losses: pd.DataFrame, configs: Optional[Dict[str, Dict[str, Any]]]) -> Dict[str, int]:
    """Configuration -> number of classes, from each run's ``num_classes`` config fact (chance = ln of it);
    a configuration whose runs do not all say the same number is left out (its chance is unknown)."""
    configs = configs or {}
    seen: Dict[str, set] = {}
    for group, run in zip(configurations(losses), losses[S.RUN].astype(str)):
        n = (configs.get(run) or {}).get("num_classes")
        seen.setdefault(group, set()).add(int(n) if n else None)
    return {g: ns.pop() for g, ns in seen.items() if len(ns) == 1 and None not in ns}


def _chance_lines(fig: Any, classes: Dict[str, int], colors: Dict[str, str]) -> None:
    """One dotted chance line per distinct number of classes (coloured as its configuration when only one
    configuration has that number); nothing where no configuration's number of classes is known."""
    by_n: Dict[int, List[str]] = {}
    for group, n in classes.items():
        by_n.setdefault(n, []).append(group)
    for n, groups in sorted(by_n.items()):
        whose = "" if len(by_n) == 1 else f" {', '.join(groups)}"
        color = colors.get(groups[0], "#888") if len(groups) == 1 and len(by_n) > 1 else "#888"
        fig.add_hline(y=float(np.log(n)), line_dash="dot", line_color=color,
                      annotation_text=f"chance{whose} (ln {n})", annotation_position="top right")


def loss_figure(losses: pd.DataFrame, configs: Optional[Dict[str, Dict[str, Any]]] = None) -> Optional[str]:
    """Training loss per configuration: mean over seeds (line) and the seeds' range (band), one legend entry each;
    chance, ln(classes), dotted for each configuration whose runs' configs give ``num_classes``."""
    import plotly.graph_objects as go

    if losses is None or losses.empty:
        return None
    data = losses.assign(group=configurations(losses).to_numpy())
    fig = go.Figure()
    colors: Dict[str, str] = {}
    for i, (group, g) in enumerate(data.groupby("group", sort=False)):
        color = colors[str(group)] = _PALETTE[i % len(_PALETTE)]
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
    _chance_lines(fig, chance_levels(losses, configs), colors)
    fig.update_layout(title="Training loss: mean over seeds (line) and their range (band)", xaxis_title="step",
                      yaxis_title="cross-entropy loss (nats)", height=420, margin={"t": 50, "b": 40})
    return _html(fig, "fig-losses")


def _band_traces(fig: Any, wide: pd.DataFrame, name: str, color: str, hover: str) -> None:
    """A configuration's runs (columns of ``wide``, x in the index) as a line, the geometric mean, and a band,
    their range; one run is its own line."""
    import plotly.graph_objects as go

    x = wide.index.to_numpy(dtype=float)
    vals = wide.to_numpy(dtype=float)
    if vals.size == 0:  # every value NaN (a run that diverged from its first step): nothing to draw
        return
    ok = np.where(np.isfinite(vals) & (vals > 0), vals, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step where every seed is NaN: a gap, on purpose
        centre = np.exp(np.nanmean(np.log(ok), axis=1))
        lo, hi = np.nanmin(ok, axis=1), np.nanmax(ok, axis=1)
    n = wide.shape[1]
    if n > 1:
        fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                                 fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip",
                                 legendgroup=name, showlegend=False, name=f"{name} range"))
    label = f"{name} ({n} seeds: mean, range)" if n > 1 else name
    fig.add_trace(go.Scatter(x=x, y=centre, mode="lines+markers", line={"color": color, "width": 2},
                             marker={"size": 4}, legendgroup=name, name=label,
                             hovertemplate=hover + "<extra>" + label + "</extra>"))


def factor_figure(train_verdicts: pd.DataFrame, signal: str, thresholds: Dict[str, float],
                  config_of: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Per-block factor at every recorded training step: one line per configuration (geometric mean over its
    seeds) with the seeds' range as a band, and the class thresholds."""
    import plotly.graph_objects as go

    if train_verdicts is None or train_verdicts.empty:
        return None
    v = train_verdicts[train_verdicts[A.SIGNAL] == signal]
    if v.empty:
        return None
    config_of = config_of or {}
    v = v.assign(_config=[config_of.get(str(r), str(r)) for r in v[S.RUN]])
    fig = go.Figure()
    for i, (config, g) in enumerate(v.groupby("_config", sort=False)):
        wide = g.pivot_table(index=S.STEP, columns=S.RUN, values=A.FACTOR, aggfunc="mean", sort=True)
        _band_traces(fig, wide, str(config), _PALETTE[i % len(_PALETTE)], "step %{x}<br>x%{y:.3f} per block")
    cut = A.drawn_thresholds(v[A.LAYERS], signal, thresholds.get("vanish", A.VANISH),
                             thresholds.get("explode", A.EXPLODE))  # the cut the verdicts judge these runs by
    for y, word in (() if cut is None else ((cut[0], "vanishing below"), (cut[1], "exploding above"))):
        fig.add_hline(y=y, line_dash="dash", line_color="#999", annotation_text=f"{word} x{y:.3f}")
    what = "forward act_var, toward the output" if signal == A.FORWARD else "backward grad_norm, toward the input"
    fig.update_layout(title=f"Per-block factor over training ({what})", xaxis_title="step",
                      yaxis_title="per-block factor", height=420, margin={"t": 50, "b": 40})
    fig.update_layout(yaxis=log_axis(_ys(fig)))
    return _html(fig, f"fig-train-{signal}")


def init_profile_figure(results: Any, metric: str, config_of: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Depth profile at initialisation relative to the reference end: one line per configuration with its seeds'
    range as a band, theory dashed."""
    import plotly.graph_objects as go
    from gradscope.agreement import predicted_profiles

    if INIT not in results.profiles:
        return None
    prof = results.profiles[INIT].get(metric, None)
    if prof.empty:
        return None
    predicted = predicted_profiles(results.frames[INIT], metric, configs=results.configs,
                                   profiles=results.profiles[INIT]) or {}
    config_of = config_of or {}
    rel = []
    for run, g in prof.groupby(S.RUN, sort=False):
        g = g.sort_values(A.POSITION)
        vals = g[S.VALUE].to_numpy(dtype=float)
        # the reference end's value; where it is zero (a dead first block), the first positive one from that end
        usable = [v for v in (vals if metric == S.ACT_VAR else vals[::-1]) if math.isfinite(v) and v > 0]
        if not usable:
            continue  # no block to be relative to: nothing to draw for this run
        ref = usable[0]
        x = g[A.POSITION].to_numpy() if metric == S.ACT_VAR else (g[A.POSITION].max() - g[A.POSITION]).to_numpy()
        rel.append(pd.DataFrame({"x": x, "value": vals / ref, S.RUN: run, "_config": config_of.get(str(run), run)}))
    if not rel:
        return None
    data = pd.concat(rel, ignore_index=True)
    fig = go.Figure()
    for i, (config, g) in enumerate(data.groupby("_config", sort=False)):
        color = _PALETTE[i % len(_PALETTE)]
        wide = g.pivot_table(index="x", columns=S.RUN, values="value", aggfunc="mean", sort=True)
        _band_traces(fig, wide, str(config), color, "%{x} blocks travelled<br>%{y:.3g}")
        pred = next((predicted[r] for r in wide.columns if r in predicted), None)
        if pred is not None:
            fig.add_trace(go.Scatter(x=list(range(len(pred))), y=pred, mode="lines", name=f"{config} theory",
                                     legendgroup=str(config), showlegend=False,
                                     line={"color": color, "dash": "dash"}, hoverinfo="skip"))
    end = "first block" if metric == S.ACT_VAR else "last block"
    fig.update_layout(title=f"{metric} at initialisation, relative to the {end} (dashed: theory)",
                      xaxis_title=f"blocks travelled from the {end}", height=420,
                      margin={"t": 50, "b": 40})
    fig.update_layout(yaxis={**log_axis(_ys(fig)), "title": f"{metric} / its value at the {end} (log scale)"},
                      xaxis=depth_axis(data["x"]))
    return _html(fig, f"fig-init-{metric}")


def figures(results: Any) -> Dict[str, List[str]]:
    """The page's interactive figures by section: ``losses``, ``init``, ``train`` (HTML fragments)."""
    from gradscope.render.groups import results_configurations

    out: Dict[str, List[str]] = {"losses": [], "init": [], "train": []}
    config_of = results_configurations(results)
    fig = loss_figure(results.losses, results.configs) if results.final_losses else None
    if fig:
        out["losses"].append(fig)
    for metric in (S.ACT_VAR, S.GRAD_NORM):
        f = init_profile_figure(results, metric, config_of)
        if f:
            out["init"].append(f)
    train = results.verdicts.get(TRAIN)
    for signal in (A.FORWARD, A.BACKWARD):
        f = factor_figure(train, signal, results.thresholds, config_of)
        if f:
            out["train"].append(f)
    return out
