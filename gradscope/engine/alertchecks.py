"""The checks of one recorded step that need no history of a series: ``update_band`` (a block's update ratio out of
its band, with what the numbers explain) and ``divergence`` (the first NaN/Inf, in the order the step made them).
See :mod:`gradscope.engine.alerts` for the detector that runs them.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from gradscope import schema as S
from gradscope.engine.alertkinds import LOSS, Alert, Row, Told
from gradscope.schema import DIVERGENCE, UPDATE_BAND


def decay_only_ratio(lr: float, weight_decay: float, momentum: float = 0.0,
                     step: Optional[int] = None) -> Optional[float]:
    """The update ratio ||delta w|| / ||w|| of SGD when the gradient is zero: weight decay alone moves w by
    ``lr * weight_decay * (1 - momentum**(step + 1)) / (1 - momentum)`` of its norm at optimizer step ``step``
    (0-based; the momentum buffer fills up), ``lr * weight_decay / (1 - momentum)`` in the steady state
    (``step=None``). None without weight decay."""
    if weight_decay <= 0 or lr <= 0 or not 0 <= momentum < 1:
        return None
    filled = 1.0 if step is None else 1.0 - momentum ** (step + 1)
    return lr * weight_decay * filled / (1.0 - momentum)


#: How close (relative) an update ratio must be to the weight-decay-only one for the note: float32 steps of 1e-6
#: of a weight's norm carry ~1% rounding (w - (w - 1e-6 w) in float32).
DECAY_TOLERANCE = 0.05


def _decay_note(value: float, decay_ratio: Optional[float]) -> str:
    """Words for an update ratio within :data:`DECAY_TOLERANCE` of the weight-decay-only ratio, else ``""``."""
    if not decay_ratio or not value > 0 or abs(math.log(value / decay_ratio)) > DECAY_TOLERANCE:
        return ""
    return (f"the update ratio equals what weight decay alone gives (lr x weight_decay / (1 - momentum) once the "
            f"momentum has filled up; {decay_ratio:.4g} at this step, within {DECAY_TOLERANCE:.0%}): the gradient "
            f"contributes nothing to this block's update, weight decay drives it")


def below_band(rows: List[Row], band: Tuple[float, float], told: Optional[Told] = None) -> List[str]:
    """Blocks whose ``update_ratio`` is below ``band``'s low end, each judged as its optimizer step was told
    (``told``, block -> :class:`OptimizerStep`): at the base lr while its schedule warms up (the ratio divided by
    ``lr_scale``), not at all at an lr of 0 that was never above 0 (``lr_scale`` 0: nothing was meant to move).

    A ratio of exactly 0 counts only when no block moved (a learning rate too small for float32 to apply moves
    nothing); while other blocks moved, it is a block the optimizer did not move (no gradient reached it: an expert
    that got no token, the layer in front of a zero-initialised one at the first step, a frozen layer)."""
    told = told or {}
    ratios = [(block, value) for _, block, _, _, metric, value in rows
              if metric == S.UPDATE_RATIO and math.isfinite(value)]
    moved = any(value > 0 for _, value in ratios)
    out = []
    for block, value in ratios:
        scale = told[block].lr_scale if block in told else 1.0
        if scale > 0 and value / scale < band[0] and (value != 0 or not moved):
            out.append(block)
    return out


def update_band(step: int, rows: List[Row], band: Optional[Tuple[float, float]],
                decay_ratio: Optional[float] = None, told: Optional[Told] = None,
                confirmed_low: Optional[Dict[str, int]] = None) -> Optional[Alert]:
    """The earliest block (forward order) whose ``update_ratio`` lies outside ``band``; the others in ``others``.

    Above the band counts at once; below it, the blocks of :func:`below_band`, or, when given, those in
    ``confirmed_low`` (block -> the first step of its run below the band, for blocks below it now;
    :class:`Detector` keeps them). A block whose parameters were all zero before the step has no ratio (see
    ``gradscope.engine.spec.ratios``). ``threshold`` is the bound the named block's ratio crossed: the low end times
    its ``lr_scale`` while its schedule warms up.

    The note says what the numbers explain: weight decay alone (``decay_ratio``, :func:`decay_only_ratio`), the
    first step of an Adam-type optimizer, a ratio judged at the schedule's base lr, an lr below its peak, a run
    below the band.
    """
    if band is None:
        return None
    low, high = band
    low_blocks = set(confirmed_low) if confirmed_low is not None else set(below_band(rows, band, told))
    out = sorted((depth, block, value) for _, block, depth, _, metric, value in rows
                 if metric == S.UPDATE_RATIO and math.isfinite(value) and (value > high or block in low_blocks))
    if not out:
        return None
    _, block, value = out[0]
    above = value > high
    mine = (told or {}).get(block)
    threshold = high if above else low * (mine.lr_scale if mine is not None and 0 < mine.lr_scale < 1 else 1.0)
    notes = [_decay_note(value, decay_ratio)]
    if above and mine is not None and mine.first_adaptive:
        notes.append(f"this is the first step of its Adam-type optimizer, which moves every weight with a gradient "
                     f"by about lr = {mine.lr:.3g} whatever the gradient's size (its bias correction makes the first "
                     f"update lr x sign(g)), so the ratio is about lr / rms(w); a learning-rate warm-up avoids it")
    if not above and mine is not None and 0 < mine.lr_scale < 1:
        notes.append(f"judged at the base learning rate its schedule warms up to: this step's lr is "
                     f"{mine.lr_scale:.3g} of it, and {value:.3g} / {mine.lr_scale:.3g} = "
                     f"{value / mine.lr_scale:.3g} is still below {low:g}")
    if not above and mine is not None and mine.of_base < 1:
        notes.append(f"this step's lr ({mine.lr:.3g}) is {mine.of_base:.3g} of the base its scheduler records "
                     f"(initial_lr) and did not rise since the previous recorded step: a warm-up stepped once per "
                     f"epoch looks like this (step it per optimizer step to have it judged at its base), and so "
                     f"does a run resumed after a decay")
    if not above and mine is not None and mine.lr <= 0 < mine.lr_scale:
        notes.append("this step's lr is 0 after it was above 0: the optimizer moves nothing (a schedule or a bug "
                     "set the learning rate to 0)")
    elif not above and mine is not None and mine.of_peak < 1:
        notes.append(f"this step's lr ({mine.lr:.3g}) is {mine.of_peak:.3g} of the largest it has been: if the "
                     f"schedule decays it on purpose (a cosine or step tail), the block moving this little is what "
                     f"that schedule asks")
    if not above and confirmed_low and confirmed_low.get(block, step) < step:
        notes.append(f"below the band at every recorded step since step {confirmed_low[block]}")
    return Alert(step, UPDATE_BAND, block, S.UPDATE_RATIO, value, threshold,
                 tuple(b for _, b, _ in out[1:]), note="; ".join(n for n in notes if n))


def divergence(step: int, rows: List[Row], loss: Optional[float], gradients: bool = True) -> Optional[Alert]:
    """The first NaN/Inf of a step, in the order the step computed them: forward activations (earliest block),
    then the loss (finite activations and a non-finite loss: the NaN came from the loss or its targets, and the
    backward only carries it), then backward gradients (the block nearest the loss; at a block its output gradient
    before its input gradient), then parameter norms (earliest block).

    ``gradients=False`` (a GradScaler is in use) ignores non-finite gradients: an fp16 gradient that overflows is a
    step the scaler skips while it lowers the scale, and a real divergence still shows in the loss or activations.
    """
    isfinite = math.isfinite
    bad = [r for r in rows if (not isfinite(r[5]) and (gradients or r[4] not in _GRADIENT_METRICS))
           or (r[4] == S.ACT_NONFINITE and r[5] > 0)]
    if not bad and (loss is None or isfinite(loss)):
        return None
    rows = bad
    forward = sorted(((depth, metric != S.ACT_NONFINITE), block, metric, value)  # the count is the clearest value
                     for _, block, depth, _, metric, value in rows if _nonfinite_forward(metric, value))
    if forward:
        return _divergence_alert(step, forward)
    backward = sorted(((-depth, metric != S.GRAD_NORM), block, metric, value)
                      for _, block, depth, _, metric, value in rows
                      if metric in S.BACKWARD_METRICS and not math.isfinite(value))
    if loss is not None and not math.isfinite(loss):  # before the backward, which starts from it
        return Alert(step, DIVERGENCE, None, LOSS, loss, math.inf, tuple(dict.fromkeys(b for _, b, _, _ in backward)))
    if backward:
        return _divergence_alert(step, backward)
    params = sorted((depth, block, metric, value) for _, block, depth, _, metric, value in rows
                    if metric in S.PARAM_METRICS and not math.isfinite(value))
    if params:
        return _divergence_alert(step, params)
    return None


def _nonfinite_forward(metric: str, value: float) -> bool:
    if metric == S.ACT_NONFINITE:
        return value > 0
    return metric in S.FORWARD_METRICS and not math.isfinite(value)


def _divergence_alert(step: int, ordered: List[Tuple[Any, str, str, float]]) -> Alert:
    blocks: List[str] = []
    for _, block, _, _ in ordered:
        if block not in blocks:
            blocks.append(block)
    _, block, metric, value = ordered[0]
    return Alert(step, DIVERGENCE, block, metric, value, math.inf, tuple(blocks[1:]))


_GRADIENT_METRICS = frozenset(S.BACKWARD_METRICS + (S.PARAM_GRAD_NORM,))
