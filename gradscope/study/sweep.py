"""A width/depth coordinate check: train a few steps at each size and fit how each block's signals scale with width.

``sweep(factory, widths, depths=None, ...)`` builds ``factory(width=w)`` (and ``depth=d``) for every size, trains it
for ``steps`` steps with the user's optimizer on the same batches, and measures per block:

* ``act_change``: the RMS per coordinate of ``h_T - h_0``, the block output's change over training on a fixed probe
  batch (the coordinate check of Yang et al. 2021, Tensor Programs V): Theta(1) in width for a parametrisation
  whose training is width-stable (muP), growing with width otherwise (standard parametrisation with Adam:
  ~ width^1, each weight entry moves by ~lr and a fan-in of n sums n such moves);
* ``act_rms``: the RMS per coordinate of the block output at the last step (what the ``mup`` package plots);
* ``grad_rms``: the RMS per coordinate of the loss gradient at the block output (``grad_norm / sqrt(numel)``),
  geometric mean over the steps where it is not zero (a zero-initialised output layer passes none at step 0);
* ``update_ratio``: ``||delta W|| / ||W||`` of the block's parameters per optimizer step, geometric mean over the
  steps where the parameters moved.

For each block and quantity a least-squares line through ``(ln width, ln value)`` gives the exponent ``a`` (value
~ width^a) with its standard error from the residuals, and a 95% interval ``a +- t(0.975, k-2) SE`` over ``k``
widths. Verdict: ``stable`` when the interval lies inside ``[-tolerance, +tolerance]`` (default 0.2),
``grows ~ width^a`` / ``shrinks ~ width^a`` when it lies above / below it, ``unclear`` otherwise (too few widths or
too much scatter: add widths or seeds). With several ``depths``, the same fit against depth uses each quantity's
geometric mean over blocks at each width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradscope import schema as S
from gradscope.analysis import stats
from gradscope.engine.attach import attach
from gradscope.engine.sites import BlockSelector, find_blocks
from gradscope.errors import GradscopeError, ModelError

__all__ = ["SweepResult", "fit_exponent", "sweep"]

ACT_CHANGE, ACT_RMS, GRAD_RMS, UPDATE_RATIO = "act_change", "act_rms", "grad_rms", S.UPDATE_RATIO
QUANTITIES = (ACT_CHANGE, ACT_RMS, GRAD_RMS, UPDATE_RATIO)
STABLE, UNCLEAR = "stable", "unclear"
#: columns of :attr:`SweepResult.fits`
FIT_COLUMNS = ("against", "depth", "width", "block", "quantity", "exponent", "se", "low", "high", "n_sizes",
               "verdict")

Batch = Tuple[torch.Tensor, torch.Tensor]


def fit_exponent(sizes: Sequence[float], values: Sequence[float]) -> Tuple[float, float, int]:
    """``(a, se, k)``: the slope of ``ln value`` on ``ln size`` by least squares over the ``k`` finite positive
    points, and its standard error from the residuals (NaN for k < 3: a line through two points has no scatter)."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v is not None and v > 0 and math.isfinite(v)]
    k = len(pts)
    if k < 2:
        return math.nan, math.nan, k
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    sxx = float(((x - x.mean()) ** 2).sum())
    if sxx == 0:
        return math.nan, math.nan, k
    a = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    if k < 3:
        return a, math.nan, k
    resid = y - (y.mean() + a * (x - x.mean()))
    return a, math.sqrt(float((resid ** 2).sum()) / (k - 2) / sxx), k


def verdict(a: float, se: float, k: int, tolerance: float, word: str = "width") -> Tuple[str, float, float]:
    """``(verdict, low, high)`` of an exponent (see the module doc)."""
    if math.isnan(a) or math.isnan(se):
        return UNCLEAR, math.nan, math.nan
    half = stats.t975(k - 2) * se
    low, high = a - half, a + half
    if -tolerance <= low and high <= tolerance:
        return STABLE, low, high
    if low > tolerance:
        return f"grows ~ {word}^{a:.2f}", low, high
    if high < -tolerance:
        return f"shrinks ~ {word}^{a:.2f}", low, high
    return UNCLEAR, low, high


@dataclass
class SweepResult:
    """What :func:`sweep` measured and fitted.

    Attributes:
        values: one row per (depth, width, block, quantity): ``depth, width, block, position, quantity, value``.
        fits: one row per fit, columns :data:`FIT_COLUMNS` (``against`` = ``"width"`` per block, or ``"depth"``
            per width from the block means).
        tolerance: the exponent band counted as stable.
    """

    values: pd.DataFrame
    fits: pd.DataFrame
    tolerance: float

    def summary(self) -> str:
        """One line per quantity: how many blocks are stable and the largest exponent against width."""
        lines = []
        width_fits = self.fits[self.fits["against"] == "width"]
        for q, g in width_fits.groupby("quantity", sort=False):
            stable = int((g["verdict"] == STABLE).sum())
            worst = g.loc[g["exponent"].abs().idxmax()] if g["exponent"].notna().any() else None
            interval = (f" (95% [{worst['low']:+.2f}, {worst['high']:+.2f}])" if worst is not None and
                        np.isfinite(worst["low"]) and np.isfinite(worst["high"]) else " (no interval)")
            tail = "" if worst is None else (f"; largest |exponent| {worst['exponent']:+.2f}{interval} at block "
                                             f"{worst['block']!r} ({worst['verdict']})")
            lines.append(f"{q}: {stable} of {len(g)} block fits stable in width{tail}")
        values = self.values["value"].astype(float)
        bad = self.values[~np.isfinite(values)]
        if len(bad):  # fits leave these points out: say so, or an exponent's missing points go unnoticed
            quantities = ", ".join(sorted(set(bad["quantity"].astype(str))))
            widths = ", ".join(str(w) for w in sorted(set(bad["width"].tolist())))
            lines.append(f"non-finite: {len(bad)} of {len(values)} measured values are NaN or inf ({quantities}; "
                         f"widths {widths}): the fits leave them out, so those exponents rest on fewer widths or none")
        return "\n".join(lines)

    def verdicts(self, quantity: str = ACT_CHANGE) -> Dict[str, str]:
        """``{block: verdict}`` of ``quantity`` against width (at the first depth when several)."""
        f = self.fits[(self.fits["against"] == "width") & (self.fits["quantity"] == quantity)]
        if f.empty:
            return {}
        if f["depth"].notna().any():
            f = f[f["depth"] == f["depth"].dropna().iloc[0]]
        return dict(zip(f["block"], f["verdict"]))


def _default_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _default_batches(model: nn.Module, steps: int, batch_size: int, seed: int) -> List[Batch]:
    """Gaussian inputs for the first Linear/Conv layer's input size and labels over the last Linear's outputs."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if first is None or not last:
        raise ModelError(f"{type(model).__name__}: no Linear/Conv2d layer to size a random batch from; pass "
                         f"batches=[(inputs, targets), ...]")
    shape = (first.in_features,) if isinstance(first, nn.Linear) else (first.in_channels, 32, 32)
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, *shape, generator=g), torch.randint(0, last[-1].out_features, (batch_size,),
                                                                          generator=g)) for _ in range(steps + 1)]


def _outputs(model: nn.Module, names: List[str], x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Each block's output (first tensor) on ``x``, without grad."""
    modules = dict(model.named_modules())
    found: Dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            y = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(y, torch.Tensor) and name not in found:
                found[name] = y.detach().float().clone()
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else math.nan


def _train_one(model: nn.Module, optimizer: torch.optim.Optimizer, batches: List[Batch], blocks: BlockSelector,
               loss_fn: Callable[..., torch.Tensor]) -> Dict[Tuple[str, int, str], float]:
    """Train on ``batches[1:]`` (``batches[0]`` is the probe); returns ``{(block, position, quantity): value}``."""
    names = [s.name for s in find_blocks(model, blocks)]
    probe = batches[0][0]
    before = _outputs(model, names, probe)
    numel = {n: t.numel() for n, t in before.items()}
    with attach(model, blocks=names, optimizer=optimizer,
                metrics=[S.ACT_RMS, S.GRAD_NORM, S.UPDATE_RATIO], on_nonfinite="ignore") as scope:
        for x, y in batches[1:]:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scope.step()
    after = _outputs(model, names, probe)
    frame = scope.frame()
    frame = frame[frame[S.CALL] == 0]
    last = frame[S.STEP].max()
    out: Dict[Tuple[str, int, str], float] = {}
    for pos, name in enumerate(names):
        rows = frame[frame[S.BLOCK] == name]
        if name in before and name in after:
            out[(name, pos, ACT_CHANGE)] = _rms(after[name] - before[name])
        act = rows[(rows[S.METRIC] == S.ACT_RMS) & (rows[S.STEP] == last)][S.VALUE]
        grads = rows[rows[S.METRIC] == S.GRAD_NORM][S.VALUE].to_numpy(float)
        ups = rows[rows[S.METRIC] == S.UPDATE_RATIO][S.VALUE].to_numpy(float)
        if len(act):
            out[(name, pos, ACT_RMS)] = float(act.iloc[0])
        train_numel = numel.get(name, 0) / max(len(probe), 1) * len(batches[1][0])  # the training batch's numel
        grads, ups = grads[grads > 0], ups[ups > 0]  # a zero-initialised layer passes no gradient at step 0
        if len(grads) and train_numel > 0:
            out[(name, pos, GRAD_RMS)] = float(np.exp(np.log(grads).mean())) / math.sqrt(train_numel)
        if len(ups):
            out[(name, pos, UPDATE_RATIO)] = float(np.exp(np.log(ups).mean()))
    return out


def _build(factory: Callable[..., nn.Module], width: int, depth: Optional[int]) -> nn.Module:
    kwargs = {"width": width} if depth is None else {"width": width, "depth": depth}
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(f"sweep: factory({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed ({exc}); the "
                         f"factory must take width= (and depth= when depths are given)") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"sweep: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def sweep(factory: Callable[..., nn.Module], widths: Sequence[int], depths: Optional[Sequence[int]] = None, *,
          optimizer: Callable[[nn.Module], torch.optim.Optimizer] = _default_optimizer, steps: int = 5,
          batches: Optional[Sequence[Batch]] = None, batch_size: int = 64,
          loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy, blocks: BlockSelector = "auto",
          seed: int = 0, tolerance: float = 0.2) -> SweepResult:
    """Train ``factory(width=w[, depth=d])`` for ``steps`` steps at each size and fit each block's scaling.

    Args:
        factory: builds the model; takes ``width=`` (and ``depth=`` when ``depths`` is given).
        widths: three or more widths (an exponent's uncertainty needs three points).
        depths: depths to sweep as well (optional).
        optimizer: ``model -> optimizer`` (your optimizer with its parameter groups; default Adam, lr 1e-3).
        steps: training steps per size.
        batches: ``[(inputs, targets), ...]``, ``steps + 1`` of them: the first is the probe batch on which the
            activation change is measured, the others train. Default: Gaussian inputs sized from the first
            Linear/Conv2d layer, labels from the last Linear's outputs (the same at every size).
        batch_size: the default batches' size.
        loss_fn: ``(output, targets) -> loss`` (default cross-entropy).
        blocks: the blocks measured (see :func:`gradscope.find_blocks`); the same names at every size.
        seed: ``torch.manual_seed`` before each build (same seed at every size).
        tolerance: exponents within ``+-tolerance`` (with their 95% interval) count as stable.
    """
    widths = [int(w) for w in widths]
    if len(widths) < 3 or len(set(widths)) != len(widths) or min(widths) < 1:
        raise GradscopeError(f"widths={widths}: give three or more distinct positive widths (an exponent's "
                             f"uncertainty needs three points)")
    if steps < 1:
        raise GradscopeError(f"steps={steps}: train at least one step")
    if batches is not None and len(batches) < steps + 1:
        raise GradscopeError(f"batches: {len(batches)} given, {steps + 1} needed (a probe batch, then one per step)")
    rows: List[Dict[str, Any]] = []
    for depth in (list(depths) if depths else [None]):
        for width in widths:
            torch.manual_seed(seed)
            model = _build(factory, width, depth)
            data = list(batches) if batches is not None else _default_batches(model, steps, batch_size, seed)
            measured = _train_one(model, optimizer(model), data[:steps + 1], blocks, loss_fn)
            for (block, pos, quantity), value in measured.items():
                rows.append({"depth": depth, "width": width, "block": block, "position": pos, "quantity": quantity,
                             "value": value})
    values = pd.DataFrame(rows, columns=["depth", "width", "block", "position", "quantity", "value"])
    return SweepResult(values, _fits(values, tolerance), tolerance)


def _fits(values: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    rows: List[Dict[str, Any]] = []
    by_depth = values.groupby(["depth", "block", "quantity"], dropna=False, sort=False)
    for (depth, block, quantity), g in by_depth:
        a, se, k = fit_exponent(list(g["width"]), list(g["value"]))
        word, low, high = verdict(a, se, k, tolerance, "width")
        rows.append({"against": "width", "depth": depth, "width": math.nan, "block": block, "quantity": quantity,
                     "exponent": a, "se": se, "low": low, "high": high, "n_sizes": k, "verdict": word})
    if values["depth"].notna().any() and values["depth"].nunique() >= 2:
        logs = values[values["value"] > 0].assign(ln=lambda d: np.log(d["value"]))
        means = logs.groupby(["width", "quantity", "depth"])["ln"].mean().reset_index()
        for (width, quantity), g in means.groupby(["width", "quantity"], sort=False):
            a, se, k = fit_exponent(list(g["depth"]), list(np.exp(g["ln"])))
            word, low, high = verdict(a, se, k, tolerance, "depth")
            rows.append({"against": "depth", "depth": math.nan, "width": width, "block": "(mean over blocks)",
                         "quantity": quantity, "exponent": a, "se": se, "low": low, "high": high, "n_sizes": k,
                         "verdict": word})
    return pd.DataFrame(rows, columns=list(FIT_COLUMNS))
