"""Drawing and writing a :class:`gradscope.analysis.compare.Comparison`: the figure, the HTML section, the folder.

``compare_figure`` draws one panel per (phase and) metric: B/A per block in depth order with its corrected interval,
coloured by verdict (log metrics as a ratio on a log axis, others as a difference). ``write_compare`` writes
``compare.csv`` (the table), ``compare_blocks.csv`` (a verdict per block), ``compare.png`` and ``compare.html``, a
self-contained page whose ``<section id="compare">`` (:func:`compare_section`) can be placed in any report page.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from gradscope.analysis.compare import DIFFERS, PHASE, SAME, Comparison
from gradscope.store import atomic_text, atomic_write

__all__ = ["compare_figure", "compare_section", "write_compare"]

_COLOURS = {DIFFERS: "#b2182b", SAME: "#1b7837"}
_GREY = "#888888"


def _escape(text: Any) -> str:
    return str(text).replace("$", r"\$")


def _panels(comparison: Comparison) -> list:
    t = comparison.table
    keys = [PHASE] if PHASE in t.columns else []
    return [(key, g) for key, g in t.groupby(keys + ["metric"], sort=False)]


def compare_figure(comparison: Comparison):
    """A matplotlib figure: one panel per (phase,) metric, B/A per block with its interval, coloured by verdict."""
    import matplotlib

    import matplotlib.pyplot as plt

    panels = _panels(comparison)
    a, b = comparison.labels
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.35 * comparison.blocks.shape[0] + 3), 2.8 *
                                                          len(panels)), squeeze=False)
    for ax, (key, g) in zip(axes[:, 0], panels):
        g = g[np.isfinite(g["diff"].astype(float))]  # a block gone to zero or NaN has its note in the table
        x = np.arange(len(g))
        log = bool((g["scale"] == "log").all())
        centre = np.exp(g["diff"].to_numpy(float)) if log else g["diff"].to_numpy(float)
        low = np.exp(g["low"].to_numpy(float)) if log else g["low"].to_numpy(float)
        high = np.exp(g["high"].to_numpy(float)) if log else g["high"].to_numpy(float)
        colours = [_COLOURS.get(v, _GREY) for v in g["verdict"]]
        for xi, c, lo, hi, col in zip(x, centre, low, high, colours):
            if math.isfinite(lo) and math.isfinite(hi):
                ax.plot([xi, xi], [lo, hi], color=col, lw=2, alpha=0.6)
            ax.plot([xi], [c], "o", color=col, ms=5)
        ax.axhline(1.0 if log else 0.0, color="black", lw=0.8, ls="--")
        if log:
            ax.set_yscale("log")
        name = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        ax.set_ylabel(f"{_escape(b)} / {_escape(a)}" if log else f"{_escape(b)} - {_escape(a)}", fontsize=8)
        ax.set_title(f"{_escape(name)}: {_escape(b)} against {_escape(a)} per block (interval: "
                     f"{comparison.correction}-corrected over {comparison.m} comparisons; red: differs)", fontsize=9)
        ax.set_xticks(x, [_escape(s) for s in g["block"]], rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    return fig


def _png(comparison: Comparison, dpi: int = 100) -> bytes:
    import io

    import matplotlib.pyplot as plt

    fig = compare_figure(comparison)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _num(v: Any, fmt: str = ".3g") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "" if math.isnan(f) else format(f, fmt)


def compare_section(comparison: Comparison, png: Optional[bytes] = None) -> str:
    """``<section id="compare">``: the summary, the figure (inline PNG), a verdict per block and the full table."""
    e = html.escape
    t = comparison.table
    keys = [PHASE] if PHASE in t.columns else []
    parts = ['<section id="compare"><h2>Comparison</h2>', f"<p>{e(comparison.summary())}</p>"]
    if png is not None:
        parts.append(f'<figure><img alt="comparison per block" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode()}"><figcaption>B/A per block with the corrected interval '
                     f'(red: differs; green: same; grey: unclear)</figcaption></figure>')
    head = keys + ["block", "metric", "n_a", "n_b", "spread", "B/A or B-A", "interval", "p (adjusted)", "note",
                   "verdict"]
    rows = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in t.to_dict("records"):
        log = r["scale"] == "log"
        size = _num(r["ratio"]) if log else _num(r["diff"], "+.3g")
        lo, hi = (r["low"], r["high"])
        interval = (f"[{_num(math.exp(lo))}, {_num(math.exp(hi))}]" if log else f"[{_num(lo)}, {_num(hi)}]") \
            if isinstance(lo, float) and math.isfinite(lo) else ""
        cells = [r[k] for k in keys] + [r["block"], r["metric"], _num(r["n_a"], "g"), _num(r["n_b"], "g"),
                                        r["spread"], size, interval, _num(r["p_adjusted"]), r.get("note", ""),
                                        r["verdict"]]
        verdict_class = e(str(r["verdict"]).replace(" ", "-"))
        rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells[:-1]) +
                    f'<td class="{verdict_class}">{e(str(cells[-1]))}</td></tr>')
    parts.append("".join(rows) + "</tbody></table></section>")
    return "".join(parts)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>gradscope comparison</title><style>
body{{font-family:system-ui,Helvetica,Arial,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:.85em}}td,th{{border:1px solid #ccc;padding:.25em .5em}}th{{background:#f0f0f0}}
img{{max-width:100%}}.differs{{color:#b2182b;font-weight:600}}.same{{color:#1b7837}}.unclear{{color:#888}}
</style></head><body><h1>gradscope comparison</h1>{body}</body></html>"""


def write_compare(comparison: Comparison, out: Union[str, Path], *, dpi: int = 100) -> Path:
    """Write ``compare.csv``, ``compare_blocks.csv``, ``compare.png`` and ``compare.html`` into ``out``; returns
    the page's path. Every file is written atomically."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "compare.csv", lambda tmp: comparison.table.to_csv(tmp, index=False))
    atomic_write(folder / "compare_blocks.csv", lambda tmp: comparison.blocks.to_csv(tmp, index=False))
    png = _png(comparison, dpi)
    atomic_write(folder / "compare.png", lambda tmp: Path(tmp).write_bytes(png))
    page = folder / "compare.html"
    atomic_text(page, _PAGE.format(body=compare_section(comparison, png)))
    return page
