"""Heatmaps and depth profiles: functions of ``(frame, ax, ...) -> ax``, no hidden state.

Every picture is a pivot of the frame (``call == 0`` rows), drawn on a log10 colour or y scale, so the data
behind a figure can be checked without looking at pixels: the heatmap's ``QuadMesh`` holds exactly
``log10(matrix)`` of :func:`heatmap_matrix` / :func:`runs_matrix` (non-positive and non-finite cells masked).

Matplotlib and seaborn are imported here only, never when ``gradscope`` is imported. The figure builders make
their figures with :func:`new_figure`, which needs no pyplot backend and never switches the session's.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.render.groups import CONFIG_COLUMN, configurations_of, run_configurations

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

#: Greyscale-readable, perceptually uniform colormap for every heatmap.
CMAP = "viridis"
#: What each metric is, for axis and colour-bar labels (units in words).
METRIC_LABELS = {
    S.ACT_VAR: "variance of the block output (output units²)",
    S.GRAD_NORM: "L2 norm of dLoss/d(block output)",
    S.PARAM_GRAD_NORM: "L2 norm of dLoss/d(block parameters)",
    S.ACT_RMS: "RMS of the block output (output units)",
    S.PARAM_NORM: "L2 norm of the block parameters",
    S.GRAD_IN_NORM: "L2 norm of dLoss/d(block input)",
}
#: Metrics drawn by the report, and the end each depth profile is normalised to (None: absolute values).
REPORT_METRICS = (S.GRAD_NORM, S.ACT_VAR, S.PARAM_GRAD_NORM)
REFERENCE_END = {S.ACT_VAR: "first", S.GRAD_NORM: "last", S.PARAM_GRAD_NORM: None}
#: metrics in squared units (a variance): their per-block cut is the amplitude cut squared
VARIANCE_METRICS = (S.ACT_VAR, S.BRANCH_VAR, S.SHORTCUT_VAR)
MASK_NOTE = "hatched: zero, non-finite or not recorded"


def new_figure(**kwargs: Any):
    """A figure that belongs to no pyplot backend: it renders to files with Agg and never switches the session's
    backend, so a report written from a notebook leaves its inline figures working."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def metric_label(metric: str) -> str:
    """Readable description of a metric, with its unit."""
    return METRIC_LABELS.get(metric, metric)


def run_colors(runs: Sequence[str]) -> dict[str, tuple]:
    """One colour per run, fixed by the run's position in ``runs`` (colour-blind palette, then husl)."""
    import seaborn as sns

    n = len(runs)
    palette = sns.color_palette("colorblind", n) if n <= 10 else sns.color_palette("husl", n)
    return {r: tuple(palette[i]) for i, r in enumerate(runs)}


def tex_escape(text: Any) -> str:
    """A label from data (a run, configuration or block name) drawn as itself.

    Matplotlib reads ``$...$`` as math text; ``\\$`` is a literal dollar. Escaping the labels that come from data,
    instead of switching math text off, keeps matplotlib's own log-axis tick labels (``10^2``) rendered.
    """
    return str(text).replace("$", r"\$")


def text_color(color: tuple) -> tuple:
    """A run's colour darkened for text (titles, tick labels) so light palette entries stay readable."""
    return tuple(0.7 * c for c in color[:3])


def _cbar_label(metric: str) -> str:
    return f"log10 {metric}\n({metric_label(metric)})"


def _rows(frame: pd.DataFrame, metric: str, run: Optional[str]) -> pd.DataFrame:
    f = A._with_run(frame)
    f = f[f[S.METRIC] == metric]
    if S.CALL in f.columns:
        f = f[f[S.CALL] == 0]
    if run is not None:
        f = f[f[S.RUN] == str(run)]
    elif f[S.RUN].nunique() > 1:
        raise ValueError(f"frame holds runs {A.run_names(frame)}; pass run=... to pick one")
    return f


def block_order(frame: pd.DataFrame) -> list[str]:
    """Block names sorted by depth (first call order), input side first."""
    d = frame.groupby(S.BLOCK, sort=False)[S.DEPTH].min().sort_values(kind="stable")
    return [str(b) for b in d.index]


def heatmap_matrix(frame: pd.DataFrame, metric: str, *, run: Optional[str] = None) -> pd.DataFrame:
    """Block (rows, depth order) x step (columns) matrix of a metric; mean over duplicate rows, NaN if absent."""
    f = _rows(frame, metric, run)
    m = f.pivot_table(index=S.BLOCK, columns=S.STEP, values=S.VALUE, aggfunc="mean", dropna=False, sort=True)
    return m.reindex(index=block_order(f), columns=sorted(m.columns)).astype(float)


def runs_matrix(frame: pd.DataFrame, metric: str, *, step: A.StepArg = "first") -> pd.DataFrame:
    """Depth (rows) x run (columns) matrix of a metric at one step ("first", "last" or a step number).

    Blocks of different runs are aligned by their ``depth``; a run with fewer blocks has NaN below its last.
    "first"/"last" pick the first/last step recorded by *all* runs (each run's own when they share none).
    """
    f = A._with_run(frame)
    f = f[f[S.METRIC] == metric]
    if S.CALL in f.columns:
        f = f[f[S.CALL] == 0]
    runs = [r for r in A.run_names(frame) if r in set(f[S.RUN])]
    if step in ("first", "last"):
        common = set.intersection(*[set(f.loc[f[S.RUN] == r, S.STEP]) for r in runs]) if runs else set()
        if common:
            f = f[f[S.STEP] == (min(common) if step == "first" else max(common))]
        else:
            pick = f.groupby(S.RUN)[S.STEP].transform("min" if step == "first" else "max")
            f = f[f[S.STEP] == pick]
    else:
        f = f[f[S.STEP] == step]
    m = f.pivot_table(index=S.DEPTH, columns=S.RUN, values=S.VALUE, aggfunc="mean", dropna=False, sort=True)
    return m.reindex(columns=[r for r in runs if r in m.columns]).astype(float)


def chosen_step(frame: pd.DataFrame, metric: str, step: A.StepArg) -> Optional[int]:
    """The step number :func:`runs_matrix` uses for ``step`` (None when runs share no step)."""
    if step not in ("first", "last"):
        return int(step)  # type: ignore[arg-type]
    f = A._with_run(frame)
    f = f[f[S.METRIC] == metric]
    sets = [set(g[S.STEP]) for _, g in f.groupby(S.RUN, sort=False)]
    common = set.intersection(*sets) if sets else set()
    return (int(min(common)) if step == "first" else int(max(common))) if common else None


def log10_matrix(m: pd.DataFrame) -> np.ma.MaskedArray:
    """log10 of a matrix with zero, negative, non-finite and missing cells masked."""
    v = m.to_numpy(dtype=float)
    ok = np.isfinite(v) & (v > 0)
    out = np.full(v.shape, np.nan)
    out[ok] = np.log10(v[ok])
    return np.ma.masked_array(out, mask=~ok)


def thin_ticks(n: int, length_pt: float, fontsize: float = 7.0, spacing: float = 1.5, nice: bool = False) -> list[int]:
    """Indices of the labels to show, at least ``spacing * fontsize`` points apart so that they never overlap.

    ``nice`` rounds the stride up to 1, 2, 5 x 10^k (for step numbers).
    """
    if n <= 0:
        return []
    every = max(1, math.ceil(n * spacing * fontsize / max(length_pt, 1.0)))
    if nice:
        every = min(m * 10 ** e for e in range(0, 12) for m in (1, 2, 5) if m * 10 ** e >= every)
    return list(range(0, n, every))


def _set_ticks(ax: "Axes", labels: Sequence[str], axis: str, fontsize: float = 7.0) -> None:
    fig = ax.figure
    box = ax.get_position()
    length = (box.height * fig.get_figheight() if axis == "y" else box.width * fig.get_figwidth()) * 72
    idx = thin_ticks(len(labels), length, fontsize, spacing=1.6 if axis == "y" else 4.0, nice=axis == "x")
    pos = [i + 0.5 for i in idx]
    labels = [tex_escape(s) for s in labels]
    if axis == "y":
        ax.set_yticks(pos, [labels[i] for i in idx], fontsize=fontsize, rotation=0)
    else:
        ax.set_xticks(pos, [labels[i] for i in idx], fontsize=fontsize, rotation=0)


def _draw_log_heatmap(m: pd.DataFrame, ax: "Axes", vmin: Optional[float], vmax: Optional[float],
                      cbar: bool, cbar_label: str) -> "Axes":
    import seaborn as sns

    z = log10_matrix(m)
    data = pd.DataFrame(z.filled(np.nan), index=m.index, columns=m.columns)
    if z.mask.any():
        ax.patch.set_facecolor("white")
        ax.patch.set_hatch("////")
        ax.patch.set_edgecolor("0.65")
    sns.heatmap(data, mask=z.mask, cmap=CMAP, vmin=vmin, vmax=vmax, ax=ax, cbar=cbar,
                cbar_kws={"label": cbar_label} if cbar else None, xticklabels=False, yticklabels=False)
    return ax


def heatmap(frame: pd.DataFrame, metric: str, ax: "Axes", *, run: Optional[str] = None,
            vmin: Optional[float] = None, vmax: Optional[float] = None, cbar: bool = True,
            title: Optional[str] = None, xlabel: str = "training step") -> "Axes":
    """Block x step heatmap of ``log10(metric)`` for one run; blocks in depth order, input side at the top.
    ``xlabel`` names what a step is (a frame at initialisation: batches with no update between them)."""
    m = heatmap_matrix(frame, metric, run=run)
    _draw_log_heatmap(m, ax, vmin, vmax, cbar, _cbar_label(metric))
    name = run if run is not None else A.run_names(frame)[0]
    ax.set_title(title or f"{metric} by block and step — {tex_escape(name)}", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"block (depth order, {len(m)} blocks, input at top)")
    _set_ticks(ax, [str(b) for b in m.index], "y")
    _set_ticks(ax, [str(s) for s in m.columns], "x")
    return ax


def runs_heatmap(frame: pd.DataFrame, metric: str, ax: "Axes", *, step: A.StepArg = "first",
                 colors: Optional[Mapping[str, tuple]] = None, cbar: bool = True) -> "Axes":
    """Depth x run heatmap of ``log10(metric)`` at one step; blocks of different runs aligned by depth."""
    m = runs_matrix(frame, metric, step=step)
    _draw_log_heatmap(m, ax, None, None, cbar, _cbar_label(metric))
    st = chosen_step(frame, metric, step)
    masked = " (hatched: block absent or value not positive)" if log10_matrix(m).mask.any() else ""
    ax.set_title(f"log10 {metric} by depth and run — step {st if st is not None else step}{masked}", fontsize=10)
    ax.set_xlabel("run")
    ax.set_ylabel("block depth (0 = first block, input at top)")
    _set_ticks(ax, [str(d) for d in m.index], "y")
    ax.set_xticks([i + 0.5 for i in range(m.shape[1])], [tex_escape(c) for c in m.columns], rotation=30, ha="right",
                  fontsize=8)
    colors = colors or run_colors(A.run_names(frame))
    for run, lab in zip(m.columns, ax.get_xticklabels()):
        lab.set_color(text_color(colors.get(run, (0, 0, 0))))
    return ax


def profile_matrix(frame: pd.DataFrame, metric: str, *, step: A.StepArg = None,
                   relative: Optional[str] = "auto", profiles: Optional[A.Profiles] = None) -> pd.DataFrame:
    """What :func:`depth_profile` draws: columns ``run, depth, position, value, plotted``.

    ``value`` is :func:`gradscope.analysis.profile` (geometric mean over steps by default); ``plotted`` divides
    it by the value at the reference end (``relative``: "first", "last", None for absolute, "auto" for
    :data:`REFERENCE_END`). Runs whose reference value is not finite and positive are dropped.
    """
    ref = REFERENCE_END.get(metric) if relative == "auto" else relative
    p = profiles.get(metric, step) if profiles is not None else A.profile(frame, metric, step=step)
    if p[A.S.STEP].notna().any() and p[A.S.STEP].nunique() > 1:
        raise ValueError("depth_profile draws one value per block; pass step=None, 'first', 'last' or an int")
    parts = []
    for run, g in p.groupby(S.RUN, sort=False):
        g = g.sort_values(A.POSITION)  # a NaN block stays, so the line breaks there instead of bridging it
        valid = g.dropna(subset=[S.VALUE])
        if valid.empty:
            continue
        base = 1.0 if ref is None else float(valid[S.VALUE].iloc[0 if ref == "first" else -1])
        if not (math.isfinite(base) and base > 0):
            continue
        parts.append(g.assign(plotted=g[S.VALUE] / base))
    cols = [S.RUN, S.DEPTH, A.POSITION, S.VALUE, "plotted"]
    return pd.concat(parts)[cols].reset_index(drop=True) if parts else pd.DataFrame(columns=cols)


def _breaks(pm: pd.DataFrame) -> List[str]:
    """Where the drawn lines break, per run: blocks whose value is zero or NaN/inf (a log axis draws neither)."""
    out = []
    for run, g in pm.groupby(S.RUN, sort=False):
        value = g[S.VALUE].astype(float)
        zero = [str(d) for d in g.loc[value == 0, S.DEPTH]]
        bad = [str(d) for d in g.loc[~np.isfinite(value), S.DEPTH]]
        parts = ([f"zero at depth {', '.join(zero[:6])}"] if zero else []) + \
            ([f"NaN/inf at depth {', '.join(bad[:6])}"] if bad else [])
        if parts:
            out.append(f"{tex_escape(run)}: {'; '.join(parts)}")
    return out


def _not_drawn(frame: pd.DataFrame, metric: str, drawn: set) -> List[str]:
    """The runs with rows of ``metric`` that the profile did not draw (no finite positive value at the step shown)."""
    rows = frame[frame[S.METRIC] == metric] if S.METRIC in frame.columns else frame
    return [r for r in A.run_names(rows) if r not in {str(d) for d in drawn}] if len(rows) else []


def _seed_band(g: pd.DataFrame) -> pd.DataFrame:
    """Per depth over the runs of one configuration: geometric mean over every seed (the line: none where a seed has
    no positive value, rather than the mean of the others), min and max (the band), n."""
    wide = g.pivot_table(index=S.DEPTH, columns=S.RUN, values="plotted", aggfunc="mean", dropna=False, sort=True)
    logs = np.log(wide.where(wide > 0))  # a seed with no value to draw there breaks the line (the note says why)
    return pd.DataFrame({"centre": np.exp(logs.mean(axis=1, skipna=False)), "low": wide.min(axis=1),
                         "high": wide.max(axis=1),
                         "n": wide.notna().sum(axis=1)}, index=wide.index)


def depth_profile(frame: pd.DataFrame, metric: str, ax: "Axes", *, step: A.StepArg = None,
                  relative: Optional[str] = "auto", vanish: float = A.VANISH, explode: float = A.EXPLODE,
                  colors: Optional[Mapping[str, tuple]] = None,
                  predicted: Optional[Mapping[str, Sequence[float]]] = None,
                  profiles: Optional[A.Profiles] = None, groups: Optional[Mapping[str, str]] = None,
                  configs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> "Axes":
    """Metric vs depth on a log y-axis: one line per configuration, its seeds as a band; thresholds and theory.

    ``groups`` maps run -> configuration (default: :func:`run_configurations`). A configuration with several runs
    (seeds) is drawn as the geometric mean over its runs at each depth (a line, labelled with the number of seeds)
    and their range (a band in the same colour); a configuration with one run is that run's line. ``configs`` (run
    -> facts, as the verdicts take them) tells how many layers a block spans, so the thresholds drawn are the ones
    the verdicts judge by.
    ``colors`` is keyed by configuration (a run's colour is used for a configuration of one run).
    ``predicted[run]``: the theory's relative value after 0, 1, 2 ... blocks travelled from the reference end,
    drawn dashed in the configuration's colour (the first run of a configuration that has one). Thresholds (dotted
    and dash-dotted black) are drawn on relative profiles, where the far end of a curve can be read against them.
    """
    ref = REFERENCE_END.get(metric) if relative == "auto" else relative
    pm = profile_matrix(frame, metric, step=step, relative=relative, profiles=profiles)
    config_of = run_configurations(frame, groups)
    drawn = set(pm[S.RUN])
    shown = list(dict.fromkeys(c for r, c in config_of.items() if r in drawn))
    colors = colors or run_colors(shown)
    markers = "osD^v<>phX*"
    drew_theory = drew_band = False
    for i, config in enumerate(shown):
        runs = [r for r, c in config_of.items() if c == config and r in drawn]
        color = colors.get(config, colors.get(runs[0], (0.3, 0.3, 0.3)))
        band = _seed_band(pm[pm[S.RUN].isin(runs)])
        n = len(runs)
        label = tex_escape(config) + (f" ({n} seeds: mean and range)" if n > 1 else "")
        if n > 1:
            ax.fill_between(band.index, band["low"], band["high"], color=color, alpha=0.2, lw=0,
                            label=f"_{tex_escape(config)} (range over seeds)")
            drew_band = True
        ax.plot(band.index, band["centre"], color=color, lw=1.6, marker=markers[i % len(markers)], ms=3.5,
                markevery=max(1, len(band) // 12), label=label)
        pred = None if predicted is None else next((predicted[r] for r in runs if r in predicted), None)
        if ref is not None and pred is not None and len(pred):
            depths = list(band.index) if ref == "first" else list(band.index)[::-1]
            k = min(len(depths), len(pred))
            ax.plot(depths[:k], list(pred)[:k], color=color, lw=1.2, ls="--", label=f"_{tex_escape(config)} (theory)")
            drew_theory = True
    ax.set_yscale("log")
    from matplotlib.ticker import LogFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole blocks: no 0.5 or 1.5 block ticks
    # a profile spanning less than a decade is labelled by its minor ticks: "6", not "6 x 10^0"
    ax.yaxis.set_minor_formatter(LogFormatter(base=10, labelOnlyBase=False))
    ax.set_xlabel("block depth (0 = first block, input side)")
    where = {"first": "the first block", "last": "the last block"}.get(ref or "", "")
    if ref is not None:
        ax.set_ylabel(_wrapped(f"{metric} ÷ {metric} at {where}  (log scale)"))
        ax.axhline(1.0, color="0.7", lw=0.8)
        # the cut the verdicts judge these runs by: squared for a variance, per layer times layers per block
        signal = A.FORWARD if metric in VARIANCE_METRICS else A.BACKWARD
        layers = A.block_layers(frame[frame[S.RUN].astype(str).isin(drawn)] if S.RUN in frame.columns else frame,
                                configs)
        cut = A.drawn_thresholds((n for n, _ in layers.values()), signal, vanish, explode)
        if cut is not None:
            lo, hi, n = cut
            per = f"per block ({n:g} layers)" if n != 1 else "per block"
            k = np.arange(0, int(pm[A.POSITION].max()) + 1 if len(pm) else 1)
            depths = k if ref == "first" else (k.max() - k)
            ax.plot(depths, hi ** (k.astype(float)), color="black", lw=1.0, ls=":",
                    label=f"exploding above x{hi:.3f} {per}")
            ax.plot(depths, lo ** (k.astype(float)), color="black", lw=1.0, ls="-.",
                    label=f"vanishing below x{lo:.3f} {per}")
    else:
        ax.set_ylabel(_wrapped(f"{metric}  [{metric_label(metric)}]  (log scale)"))
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    if drew_band:
        handles.append(Patch(facecolor="0.5", alpha=0.2))
        labels.append("band: range over the seeds of a configuration")
    if drew_theory:
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1.2))
        labels.append("theory (dashed, in the line's colour)")
    how = "geometric mean over the recorded batches" if step is None else f"step {step}"
    direction = {S.ACT_VAR: "forward signal: ", S.GRAD_NORM: "backward gradient: "}.get(metric, "")
    names = ", ".join(tex_escape(c) for c in shown[:4]) + (f" and {len(shown) - 4} more (legend)"
                                                          if len(shown) > 4 else "")
    what = "configuration" if len(shown) < len(drawn) else "run"
    ax.set_title(f"{direction}{metric} across depth ({how})\n{what}s: {names or 'none drawn'}", fontsize=10)
    left_out, breaks = _not_drawn(frame, metric, drawn), _breaks(pm)
    if left_out or not drawn or breaks:  # say who is missing and why, instead of an empty, thinner or bridged line
        text = (f"not drawn: {', '.join(tex_escape(r) for r in left_out[:6])}"
                f"{f' and {len(left_out) - 6} more' if len(left_out) > 6 else ''} (no finite, positive {metric} at "
                f"the step shown, e.g. a run that diverged or stopped before it)") if left_out else \
            "" if drawn else f"nothing to draw: no run has a finite, positive {metric} at the step shown"
        if breaks:
            text += ("\n" if text else "") + "lines break where a block has no value to draw: " + \
                "; ".join(breaks[:4]) + (f"; and {len(breaks) - 4} more run(s)" if len(breaks) > 4 else "")
        ax.text(0.01, 0.01, text, transform=ax.transAxes, fontsize=7, color="0.35", va="bottom", ha="left",
                wrap=True)
    ax.grid(True, which="major", axis="both", color="0.9", lw=0.6)
    ax.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return ax


def _wrapped(label: str, width: int = 56) -> str:
    """An axis label broken into lines of at most ``width`` characters, so a long metric description stays inside
    a 5-inch-high figure instead of running off both ends; a closing "(log scale)" stays whole."""
    import textwrap

    head, tail = (label[:-len("(log scale)")].rstrip(), "(log scale)") if label.endswith("(log scale)") else (label, "")
    lines = textwrap.wrap(head, width, break_long_words=False) or [head]
    if tail:
        if len(lines[-1]) + 2 + len(tail) <= width:
            lines[-1] += "  " + tail
        else:
            lines.append(tail)
    return "\n".join(lines)


# --- whole figures (used by the report) -----------------------------------------------------------------------

def _panel_height(n_blocks: int) -> float:
    return float(min(14.0, max(3.5, 1.5 + 0.1 * n_blocks)))


def heatmap_figure(frame: pd.DataFrame, metric: str, *, colors: Optional[Mapping[str, tuple]] = None,
                   xlabel: str = "training step"):
    """Block x step heatmap(s) of one metric: one panel per run, shared colour scale, one colour bar."""
    runs = [r for r in A.run_names(frame) if not _rows(frame, metric, r).empty]
    colors = colors or run_colors(A.run_names(frame))
    mats = {r: heatmap_matrix(frame, metric, run=r) for r in runs}
    vals = np.concatenate([log10_matrix(m).compressed() for m in mats.values()] or [np.array([])])
    vmin, vmax = (float(vals.min()), float(vals.max())) if vals.size else (None, None)
    ncols = min(len(runs), 4)
    nrows = math.ceil(len(runs) / ncols)
    h = _panel_height(max(len(m) for m in mats.values()))
    fig = new_figure(figsize=(3.0 + 5.0 * ncols, 0.8 + h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, run in zip(axes.flat, runs):
        heatmap(frame, metric, ax, run=run, vmin=vmin, vmax=vmax, cbar=False, xlabel=xlabel)
        ax.title.set_color(text_color(colors[run]))
    for ax in list(axes.flat)[len(runs):]:
        ax.remove()
    used = list(axes.flat)[:len(runs)]
    cb = fig.colorbar(used[0].collections[0], ax=used, shrink=0.6, pad=0.01)
    cb.set_label(_cbar_label(metric))
    masked = any(log10_matrix(m).mask.any() for m in mats.values())
    if len(runs) > 1 or masked:
        fig.suptitle(f"log10 {metric} per block and step, {len(runs)} runs, one colour scale"
                     f"{' (' + MASK_NOTE + ')' if masked else ''}", fontsize=11)
    _relayout(fig, used, [list(map(str, mats[r].index)) for r in runs], [list(map(str, mats[r].columns)) for r in runs])
    return fig


def _relayout(fig, axes, ylabels, xlabels) -> None:
    """Run the layout once, then thin the tick labels for the axes' final sizes."""
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
    for ax, yl, xl in zip(axes, ylabels, xlabels):
        _set_ticks(ax, yl, "y")
        _set_ticks(ax, xl, "x")


def runs_figure(frame: pd.DataFrame, metric: str, *, step: A.StepArg = "first",
                colors: Optional[Mapping[str, tuple]] = None):
    """Depth x run heatmap of one metric at one step."""
    m = runs_matrix(frame, metric, step=step)
    fig = new_figure(figsize=(3.0 + 0.9 * m.shape[1], _panel_height(len(m))), layout="constrained")
    ax = fig.subplots()
    runs_heatmap(frame, metric, ax, step=step, colors=colors)
    return fig


def profile_figure(frame: pd.DataFrame, metric: str, *, step: A.StepArg = None, vanish: float = A.VANISH,
                   explode: float = A.EXPLODE, colors: Optional[Mapping[str, tuple]] = None,
                   predicted: Optional[Mapping[str, Sequence[float]]] = None, profiles: Optional[A.Profiles] = None,
                   groups: Optional[Mapping[str, str]] = None,
                   configs: Optional[Mapping[str, Mapping[str, Any]]] = None):
    """Depth profile of one metric, every configuration (with its seed band) in one axes."""
    fig = new_figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    depth_profile(frame, metric, ax, step=step, vanish=vanish, explode=explode, colors=colors, predicted=predicted,
                  profiles=profiles, groups=groups, configs=configs)
    return fig
