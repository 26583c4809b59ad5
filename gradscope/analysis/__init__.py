"""Verdicts: how the forward signal and the backward gradient change across depth, as a plain DataFrame.

Pure functions from a frame (see :mod:`gradscope.schema`) to a frame; no torch, no plotting.

What is measured
----------------
Two signals per run, each read from one metric of the frame:

========== ========== ================================ =========================================
signal     metric     near end -> far end              direction of the per-block ``factor``
========== ========== ================================ =========================================
forward    act_var    first block -> last block        growth toward the output
backward   grad_norm  last block -> first block        growth toward the input
========== ========== ================================ =========================================

* **Rows used.** Only ``call == 0`` rows; every verdict reads one :class:`~gradscope.analysis.profiles.Profiles`
  pass over the frame (pass ``profiles=`` to share it between verdicts, agreement and figures).
* **Steps.** ``step="all"`` gives one row per recorded step (what a report shows for training),
  ``step=<int>``/``"first"``/``"last"`` one step, ``step=None`` one row per run from the geometric mean per block
  over all steps (meant for initialisation frames, whose batches are draws of one state).
* **Per-block factor.** A least-squares line through ``(position, ln value)`` over the blocks whose value is
  finite and positive; ``factor = exp(slope)`` (forward) or ``exp(-slope)`` (backward), with the line's ``r2``.
* **End to end** (``end_to_end``) is read from the fit, ``factor ** (positions spanned)``, so one moving end
  block does not decide it; ``near_value``/``far_value`` are the measured values at the two ends. Where the
  measured ends alone decide the class (:func:`measured_class`: a cliff the line hides), it is their ratio.
* **Units.** Ratios of the metric itself: of a *variance* forward, of a gradient *norm* (not squared) backward.

Verdict (column ``verdict``): one unit, per layer, whatever is called a block
----------------------------------------------------------------------------
A class describes the *amplitude* of a signal per *layer* (one weight layer: a Linear or a convolution, with its
normalisation and activation), so that the same net gets the same class whether its blocks are two-layer residual
blocks or its ``BatchNorm2d`` layers, and the forward variance and the backward norm, which differ by a square,
are judged by one cut:

* ``layer_factor`` = ``factor ** (1 / layers_per_block)`` backward (a norm already) and
  ``factor ** (1 / (2 layers_per_block))`` forward (the square root of a variance ratio);
* ``layers_per_block`` comes from ``layers_per_block=`` (a number, or ``{run: number}``), else from the block kind:
  single layers (``Linear``, ``Conv*d``, ``BatchNorm*``, ``LayerNorm``, ...) count 1, the built-in blocks 2 (CIFAR
  nets) or 1 (MLPs), read from the run's config (``configs=`` or the frame's ``model`` column); when it cannot be
  told, 1 (column ``unit`` says "per block", and the class is per block);
* thresholds (:func:`layer_thresholds`): vanishing below ``vanish ** (1/54)`` = x0.958, exploding above
  ``explode ** (1/54)`` = x1.044 per layer, i.e. an amplitude change of :data:`VANISH` = 0.1 or :data:`EXPLODE` =
  10 (100x in variance) over :data:`REFERENCE_LAYERS` = 54 layers, the weight layers between the stem and the
  classifier of the paper's 56-layer nets. Why an order of magnitude: with one learning rate for every layer, a
  10x difference in gradient norm between the first and the last layer is a 10x (100x in squared norm) difference
  in how fast they move, the scale at which He et al. call plain nets' norms "healthy" or not. Examples (CIFAR, 16
  channels, 16x16 images): plain-56 with BN explodes toward the input at x1.38 per block = x1.175 per layer (Yang
  et al. 2019); without BN it loses x0.88 per block = x0.94 per layer (a 23-53x loss end to end): vanishing;
  residual nets with BN stay within both cuts.

Then:

* ``diverged`` if a block held a non-finite value of that signal at that step (at any step for ``step=None``):
  forward, ``act_nonfinite > 0`` or a NaN/Inf ``act_var``; backward, a NaN/Inf ``grad_norm`` or
  ``param_grad_norm``. Such a signal is never ``healthy``; ``nonfinite_block`` is its first such block in the
  order its pass runs (forward: the shallowest; backward: the deepest);
* ``vanishing`` if the whole 95% interval of ``layer_factor`` lies below the lower threshold, or the signal is zero
  at any block (the signal is gone there, whatever the fit over the positive blocks says; a zero near end with a
  positive far end included);
* ``exploding`` if the whole interval lies above the upper threshold;
* ``healthy`` if the whole interval lies between them;
* where the fit says ``healthy`` or ``unknown``, the measured ends may still decide (:func:`measured_class`): far
  over near beyond both the cut compounded over the span and the whole band, by more than the profile's noise,
  gives ``vanishing`` or ``exploding`` (a cliff at one block that a line through many flat blocks hides);
* ``unknown`` if the interval straddles a threshold (the fit does not determine the rate: a low R² over few
  blocks), with two blocks (one ratio: n - 2 = 0 degrees of freedom, the interval is 0 to inf), or with fewer than
  two blocks holding a value. Column ``reason`` says which, e.g. "the fit does not determine the rate (R² 0.10 over
  7 blocks): x0.702 to x1.22 per layer (95%) straddles x0.958 and x1.044".

The interval (columns ``factor_low``, ``factor_high``: per block, in the units of ``factor``) is
``exp(slope ± t(0.975, n - 2) · se)`` with the least-squares standard error of the slope
(:func:`~gradscope.analysis.profiles.fit_log_slope`).

Layout (long format)
--------------------
One row per run x signal (x step), columns :data:`VERDICT_COLUMNS` then the run's config columns when the frame
has them. Frames without a ``run`` column are one run named :data:`DEFAULT_RUN`. The theory columns
(``predicted_factor, measured_factor, agreement, agrees, reference, theory_note``) are filled by
:mod:`gradscope.agreement`, for initialisation frames only.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope.analysis import text as _text
from gradscope.analysis.profiles import (DEFAULT_RUN, POSITION, Fit, Profiles, StepArg, check_frame,
                                         check_one_phase, combine_steps, fit_log_slope, profile, profile_pass,
                                         run_names, select_step, steps_of, with_run)
from gradscope.analysis.stats import t975
from gradscope.errors import DataError

#: Default thresholds: the change of a signal's *amplitude* (a norm; the square root of a variance) over
#: :data:`REFERENCE_LAYERS` layers that counts as vanishing / exploding (100x and 1/100 in variance).
VANISH = 0.1
EXPLODE = 10.0
#: Layers over which ``vanish``/``explode`` are defined: 54, the weight layers between the stem and the classifier
#: of the paper's 56-layer nets.
REFERENCE_LAYERS = 54
#: Older name, kept for renderers: thresholds are now defined over layers.
REFERENCE_BLOCKS = REFERENCE_LAYERS
#: Block kinds that are one layer each (a weight layer, or a norm/activation that follows exactly one).
LAYER_KINDS = frozenset({"Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                         "ConvTranspose3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
                         "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm",
                         "LazyLinear", "LazyConv2d", "BatchNormAct2d"})
#: The built-in blocks (:mod:`gradscope.models.blocks`): layers per block by model family.
ZOO_BLOCK_LAYERS = {"cifar": 2, "mlp": 1}
ZOO_KINDS = frozenset({"PlainBlock", "ResidualBlock"})

from gradscope.words import BACKWARD, FORWARD  # noqa: E402  (signals and verdict classes: gradscope.words)
#: signal -> (metric, direction word used in sentences)
SIGNALS = {FORWARD: (S.ACT_VAR, "toward the output"), BACKWARD: (S.GRAD_NORM, "toward the input")}

from gradscope.words import CLASSES, DIVERGED, EXPLODING, HEALTHY, UNKNOWN, VANISHING  # noqa: E402

# verdict columns
SIGNAL, N_STEPS, N_BLOCKS = "signal", "n_steps", "n_blocks"
FIRST_BLOCK, LAST_BLOCK = "first_block", "last_block"
END_TO_END, FACTOR, R2 = "end_to_end", "factor", "r2"
FACTOR_LOW, FACTOR_HIGH, REASON = "factor_low", "factor_high", "reason"
LAYERS, LAYER_FACTOR, UNIT = "layers_per_block", "layer_factor", "unit"
NEAR_VALUE, FAR_VALUE = "near_value", "far_value"
MIN_VALUE, MIN_BLOCK, MAX_VALUE, MAX_BLOCK = "min_value", "min_block", "max_value", "max_block"
VERDICT, RATE_TEXT, NONFINITE_BLOCK = "verdict", "rate_text", "nonfinite_block"
PREDICTED_FACTOR, MEASURED_FACTOR, AGREES, AGREEMENT = "predicted_factor", "measured_factor", "agrees", "agreement"
REFERENCE, THEORY_NOTE = "reference", "theory_note"
VERDICT_COLUMNS = (S.RUN, S.STEP, N_STEPS, SIGNAL, S.METRIC, N_BLOCKS, FIRST_BLOCK, LAST_BLOCK, END_TO_END, FACTOR,
                   FACTOR_LOW, FACTOR_HIGH, R2, LAYERS, LAYER_FACTOR, UNIT, NEAR_VALUE, FAR_VALUE, MIN_VALUE, MIN_BLOCK,
                   MAX_VALUE, MAX_BLOCK, VERDICT, REASON, NONFINITE_BLOCK, RATE_TEXT, PREDICTED_FACTOR, MEASURED_FACTOR, AGREEMENT, AGREES, REFERENCE, THEORY_NOTE)

sentence = _text.sentence
rate_text = _text.rate_text
_fmt_factor = _text.factor
# older private names, kept for the renderers
_with_run, _steps_of, _check_frame, _select_step = with_run, steps_of, check_frame, select_step


def layer_thresholds(vanish: float = VANISH, explode: float = EXPLODE,
                     reference_layers: int = REFERENCE_LAYERS) -> tuple[float, float]:
    """Per-layer amplitude factors below / above which a signal is vanishing / exploding: ``vanish**(1/54)`` etc."""
    return vanish ** (1.0 / reference_layers), explode ** (1.0 / reference_layers)


def rate_thresholds(vanish: float = VANISH, explode: float = EXPLODE, reference_blocks: int = REFERENCE_LAYERS, *,
                    signal: str = "backward", layers: float = 1.0) -> tuple[float, float]:
    """The same cut as :func:`layer_thresholds`, as per-block factors of the signal's own metric: raised to the
    power ``layers`` (layers per block), and squared for the forward signal (a variance ratio)."""
    lo, hi = layer_thresholds(vanish, explode, reference_blocks)
    power = layers * (2.0 if signal == FORWARD else 1.0)
    return lo ** power, hi ** power


def drawn_thresholds(layers: Iterable[float], signal: str, vanish: float = VANISH,
                     explode: float = EXPLODE) -> Optional[tuple[float, float, float]]:
    """``(low, high, layers)``: the per-block cut a figure draws for runs with these layers per block, the one the
    verdicts judge them by (:func:`rate_thresholds`); None when the runs differ in layers per block (no single line
    would be right for all of them) or there are none."""
    distinct = {float(x) for x in layers if x is not None and math.isfinite(float(x)) and float(x) > 0}
    if len(distinct) != 1:
        return None
    (n,) = distinct
    lo, hi = rate_thresholds(vanish, explode, signal=signal, layers=n)
    return lo, hi, n


def layer_factor(factor: float, signal: str, layers: float = 1.0) -> float:
    """A per-block factor of ``signal``'s metric as a per-layer amplitude factor (NaN stays NaN)."""
    if factor is None or math.isnan(factor) or factor <= 0 or not layers or math.isnan(layers):
        return math.nan if factor is None or math.isnan(factor) or factor < 0 else factor
    return factor ** (1.0 / (layers * (2.0 if signal == FORWARD else 1.0)))


def classify(factor: float, *, signal: str = "backward", layers: float = 1.0, vanish: float = VANISH,
             explode: float = EXPLODE, all_zero: bool = False, low: Optional[float] = None,
             high: Optional[float] = None) -> str:
    """Class of one signal from its fitted per-block ``factor``, judged per layer in amplitude units (the same
    per-layer rate gives the same class at any depth and at any granularity).

    ``low``/``high``: the 95% interval of the per-block factor (:func:`fit_log_slope`); without them the interval
    is the point ``factor``. ONE rule: ``vanishing`` when the whole per-layer interval lies below the lower
    threshold, ``exploding`` when it lies wholly above the upper one, ``healthy`` when it lies wholly between them,
    ``unknown`` when it straddles a threshold (the fit does not determine the class) or there is no factor.
    """
    if all_zero:
        return VANISHING
    f = layer_factor(factor, signal, layers)
    if f is None or math.isnan(f):
        return UNKNOWN
    a = f if low is None else layer_factor(low, signal, layers)
    b = f if high is None else layer_factor(high, signal, layers)
    if math.isnan(a) or math.isnan(b):
        return UNKNOWN
    lo, hi = layer_thresholds(vanish, explode)
    if b < lo:
        return VANISHING
    if a > hi:
        return EXPLODING
    if lo <= a and b <= hi:
        return HEALTHY
    return UNKNOWN


def factor_interval(fit: Fit, signal: str) -> tuple[float, float]:
    """The 95% interval of a signal's per-block factor from its fit: ``exp`` of the slope's interval forward,
    of its negation backward (the backward signal grows toward the input); ``(0, inf)`` with two points."""
    if math.isnan(fit.slope_low) or math.isnan(fit.slope_high):
        return math.nan, math.nan
    if signal == FORWARD:
        return math.exp(fit.slope_low), math.exp(fit.slope_high)
    return math.exp(-fit.slope_high), math.exp(-fit.slope_low)


def unclear_reason(fit: Fit, low: float, high: float, signal: str, layers: float, vanish: float,
                   explode: float) -> str:
    """Why a fitted rate gives no class: its per-layer interval and the threshold it straddles, with r2 and n."""
    if fit.n < 3:
        return (f"the fit does not determine the rate: {fit.n} blocks with a value fit any line exactly "
                f"(a rate needs three or more to be checked)")
    lo, hi = layer_thresholds(vanish, explode)
    a, b = layer_factor(low, signal, layers), layer_factor(high, signal, layers)
    cut = " and ".join(f"x{t:.3f}" for t, inside in ((lo, a < lo <= b), (hi, a <= hi < b)) if inside)
    return (f"the fit does not determine the rate (R² {fit.r2:.2f} over {fit.n} blocks): x{a:.3g} to x{b:.3g} "
            f"per layer (95%) straddles {cut}")


def _summarise(values: np.ndarray, blocks: Sequence[str], position: np.ndarray, signal: str,
               vanish: float, explode: float, nonfinite_block: Optional[str], layers: float = 1.0) -> dict[str, Any]:
    """The verdict fields of one signal given per-block values in depth order."""
    present = ~np.isnan(values)
    v, b, x = values[present], [bl for bl, p in zip(blocks, present) if p], position[present]
    out: dict[str, Any] = {N_BLOCKS: int(v.size), FIRST_BLOCK: b[0] if b else None, LAST_BLOCK: b[-1] if b else None,
                           NONFINITE_BLOCK: nonfinite_block, REASON: None}
    empty = {END_TO_END: math.nan, FACTOR: math.nan, FACTOR_LOW: math.nan, FACTOR_HIGH: math.nan, R2: math.nan,
             LAYER_FACTOR: math.nan, NEAR_VALUE: math.nan, FAR_VALUE: math.nan,
             MIN_VALUE: math.nan, MIN_BLOCK: None, MAX_VALUE: math.nan, MAX_BLOCK: None}
    if v.size == 0:
        out.update(empty, **{VERDICT: DIVERGED if nonfinite_block else UNKNOWN})
        if not nonfinite_block:
            out[REASON] = "no block holds a value"
        return out
    near, far = (v[0], v[-1]) if signal == FORWARD else (v[-1], v[0])
    fit = fit_log_slope(x, v)
    sign = 1.0 if signal == FORWARD else -1.0
    factor = math.exp(sign * fit.slope) if not math.isnan(fit.slope) else math.nan
    low, high = factor_interval(fit, signal)
    span = float(x[-1] - x[0]) if v.size >= 2 else 0.0
    all_zero = bool(np.all(v == 0))
    if v.size >= 2 and far == 0 and not all_zero:  # gone at the far end, whatever the near end holds
        e2e = 0.0
    else:
        e2e = factor ** span if not math.isnan(factor) else math.nan
    imin, imax = int(np.argmin(v)), int(np.argmax(v))
    if far == 0:  # of several zero blocks, the one named is the far end, which decides the class
        imin = v.size - 1 if signal == FORWARD else 0
    if nonfinite_block is not None:
        verdict = DIVERGED
    elif v.size < 2 and not all_zero:
        verdict = UNKNOWN
        out[REASON] = "one block with a value: a rate needs two or more"
    elif e2e == 0.0:
        verdict = VANISHING
    elif v.size >= 2 and bool(np.any(v == 0)) and not all_zero:
        # exactly zero at a block inside the profile or at its near end (a dead first block whose followers
        # renormalise a constant): the signal is gone there, whatever the fit over the positive blocks says
        verdict = VANISHING
    else:
        verdict = classify(factor, signal=signal, layers=layers, vanish=vanish, explode=explode, all_zero=all_zero,
                           low=low, high=high)
        if verdict == UNKNOWN:
            out[REASON] = (unclear_reason(fit, low, high, signal, layers, vanish, explode) if not math.isnan(low)
                           else "fewer than two blocks with a positive value")
        ends = measured_class(x, v, fit, signal, layers, vanish, explode) if verdict in (HEALTHY, UNKNOWN) else None
        if ends is not None:
            # the two ends differ by more than the band allows, beyond the profile's own noise: a cliff at one
            # block that a line through many flat blocks hides (R² near 0, a "healthy" slope)
            e2e = float(far / near)
            verdict, out[REASON] = ends[0], (f"{ends[1]}; the per-block fit (x{factor:.3g}, R² {fit.r2:.2f}) does "
                                             f"not describe the profile")
    out.update({END_TO_END: e2e, FACTOR: factor, FACTOR_LOW: low, FACTOR_HIGH: high, R2: fit.r2,
                LAYER_FACTOR: layer_factor(factor, signal, layers), NEAR_VALUE: float(near), FAR_VALUE: float(far),
                MIN_VALUE: float(v[imin]), MIN_BLOCK: b[imin], MAX_VALUE: float(v[imax]), MAX_BLOCK: b[imax],
                VERDICT: verdict})
    return out


def measured_class(position: np.ndarray, values: np.ndarray, fit: Fit, signal: str, layers: float, vanish: float,
                   explode: float) -> Optional[tuple[str, str]]:
    """``(class, words)`` when the measured ends alone decide a class the fit may miss, else None.

    The far end over the near end (``far / near``) must lie beyond two bounds, with a margin for the profile's own
    noise (``t(0.975, n - 2)`` times ``sqrt(2)`` residual standard deviations of the line: two ends, each as noisy
    as any block): the cut compounded over the positions between them (:func:`rate_thresholds` per block, to the
    power of the span), and the whole band itself (``vanish``/``explode`` in the signal's units: squared for a
    variance), so that a drift or a head layer that scales the signal by a few times is left to the fit, while a
    signal that fell or grew by more than the band allows over the reference depth, end to end, is not called
    healthy. A geometric profile's ends follow its line, so this only speaks where the line does not describe the
    profile: one block that scales the signal by 1e-4 among 80 near-identity blocks drops the variance 1e8-fold,
    while the line through 79 flat blocks stays near x1 per block with R² 0.04."""
    positive = np.isfinite(values) & (values > 0)
    if fit.n < 3 or not (positive[0] and positive[-1]) or math.isnan(fit.slope):
        return None
    x, y = position[positive], np.log(values[positive])
    residual = y - (y.mean() + fit.slope * (x - x.mean()))
    noise = t975(fit.n - 2) * math.sqrt(2.0 * float(residual @ residual) / (fit.n - 2))
    span = float(position[-1] - position[0])
    near, far = (values[0], values[-1]) if signal == FORWARD else (values[-1], values[0])
    measured = math.log(far / near)
    lo, hi = rate_thresholds(vanish, explode, signal=signal, layers=layers)
    power = 2.0 if signal == FORWARD else 1.0  # the band in the signal's own units
    low_bound = min(span * math.log(lo), power * math.log(vanish))
    high_bound = max(span * math.log(hi), power * math.log(explode))
    where = "toward the output" if signal == FORWARD else "toward the input"
    said = f"measured x{far / near:.3g} from the near to the far end ({where}) over {span:g} block positions"
    if measured + noise < low_bound:
        return VANISHING, (f"{said}, below x{math.exp(low_bound):.3g} (x{lo:.3g} per block compounded, and the band "
                           f"x{vanish ** power:.3g}) beyond the profile's noise")
    if measured - noise > high_bound:
        return EXPLODING, (f"{said}, above x{math.exp(high_bound):.3g} (x{hi:.3g} per block compounded, and the "
                           f"band x{explode ** power:.3g}) beyond the profile's noise")
    return None


_ZOO_NAME = re.compile(r"^(plain|resnet)\d+")


def _family(config: Optional[Mapping[str, Any]]) -> Optional[str]:
    if not config:
        return None
    if config.get("family"):
        return str(config["family"])
    name = str(config.get("name") or config.get("model") or "").lower()
    return "cifar" if _ZOO_NAME.match(name) else "mlp" if name.startswith("mlp") else None


def _check_layers(layers_per_block: Any) -> None:
    """Refuse a ``layers_per_block`` that is not a positive finite number (or a mapping of them): -1 inverted the
    class (x0.5 per block became x2.0 per layer, exploding), 0 divided by zero, and a string or True was silently
    ignored. Fractions are allowed (blocks placed at a layer's Linear and at its activation span half a layer)."""
    if layers_per_block is None:
        return
    values = list(layers_per_block.values()) if isinstance(layers_per_block, Mapping) else [layers_per_block]
    for v in values:
        number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        if not number or not math.isfinite(float(v)) or float(v) <= 0:
            raise DataError(f"layers_per_block={layers_per_block!r}: give the number of weight layers a block spans "
                            f"(a positive number such as 2, or {{run: number}})")


def block_layers(frame: pd.DataFrame, configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 layers_per_block: Union[None, float, Mapping[str, float]] = None) -> dict[str, tuple[float, str]]:
    """``{run: (layers per block, unit words)}``: how many weight layers one step between blocks spans.

    ``layers_per_block`` (a number, or ``{run: number}``) wins; else every block kind of the run is a single layer
    (:data:`LAYER_KINDS`: 1), or a built-in block (:data:`ZOO_KINDS`) of a family known from ``configs[run]`` or
    the frame's ``model`` column (:data:`ZOO_BLOCK_LAYERS`); else 1 with the unit "per block (layers unknown)".
    """
    _check_layers(layers_per_block)
    out: dict[str, tuple[float, str]] = {}
    cols = [c for c in (S.RUN, S.KIND, S.MODEL) if c in frame.columns]
    meta = frame[cols].drop_duplicates()
    meta = meta.assign(**{S.RUN: meta[S.RUN].astype(str) if S.RUN in meta.columns else DEFAULT_RUN})
    for run in run_names(frame):
        if isinstance(layers_per_block, Mapping) and run in layers_per_block:
            out[run] = (float(layers_per_block[run]), "per layer (layers per block given)")
            continue
        if isinstance(layers_per_block, (int, float)) and not isinstance(layers_per_block, bool):
            out[run] = (float(layers_per_block), "per layer (layers per block given)")
            continue
        mine = meta[meta[S.RUN] == run]
        kinds = set(mine[S.KIND].astype(str)) if S.KIND in mine.columns else set()
        cfg = dict(configs[run]) if configs and run in configs else (
            {S.MODEL: mine[S.MODEL].iloc[0]} if S.MODEL in mine.columns and len(mine) else None)
        fam = _family(cfg)
        if kinds and kinds <= LAYER_KINDS:
            out[run] = (1.0, "per layer")
        elif kinds and kinds <= ZOO_KINDS and fam in ZOO_BLOCK_LAYERS:
            out[run] = (float(ZOO_BLOCK_LAYERS[fam]), "per layer")
        else:
            out[run] = (1.0, "per block (layers per block unknown: pass layers_per_block=)")
    return out


def verdicts(frame: pd.DataFrame, *, step: StepArg = None, vanish: float = VANISH, explode: float = EXPLODE,
             profiles: Optional[Profiles] = None, configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
             layers_per_block: Union[None, float, Mapping[str, float]] = None) -> pd.DataFrame:
    """One row per run x signal (x step when asked) saying whether the signal vanishes, explodes, stays healthy
    or diverged.

    ``step``: None (geometric mean per block over all steps), "all", "first", "last" or a recorded step.
    ``vanish``/``explode``: the amplitude change over :data:`REFERENCE_LAYERS` layers that counts (per-layer
    thresholds are their 54th roots). ``profiles``: a :class:`Profiles` of ``frame`` to share (else one is
    computed). ``configs``/``layers_per_block``: how many layers a block spans (:func:`block_layers`).
    Columns: :data:`VERDICT_COLUMNS`; the theory columns stay empty here (:func:`gradscope.agreement.verdicts`).
    """
    if not (0 < vanish < 1 < explode):
        raise DataError(f"thresholds vanish={vanish}, explode={explode} must satisfy 0 < vanish < 1 < explode.")
    check_frame(frame)
    check_one_phase(frame)
    prof_set = profiles if profiles is not None else Profiles(frame)
    rows: list[dict[str, Any]] = []
    layers = block_layers(frame, configs, layers_per_block)
    for signal, (metric, _) in SIGNALS.items():
        prof = prof_set.get(metric, step)
        for key, g in prof.groupby([S.RUN, S.STEP], sort=False, dropna=False):
            run, st = key
            g = g.sort_values(POSITION)
            n_steps = len(prof_set.steps(run)) if step is None else 1
            bad = prof_set.diverged(run, None if pd.isna(st) else int(st), signal)
            n_layers, unit = layers.get(str(run), (1.0, "per block"))
            row = {S.RUN: run, S.STEP: st, N_STEPS: n_steps, SIGNAL: signal, S.METRIC: metric, LAYERS: n_layers,
                   UNIT: unit}
            row.update(_summarise(g[S.VALUE].to_numpy(dtype=float), list(g[S.BLOCK]),
                                  g[POSITION].to_numpy(dtype=float), signal, vanish, explode, bad, n_layers))
            row[RATE_TEXT] = rate_text(row[FACTOR], row[R2], row[FACTOR_LOW], row[FACTOR_HIGH])
            rows.append(row)
    out = pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))
    out[S.STEP] = out[S.STEP].astype("Int64")
    out[AGREES] = pd.array([pd.NA] * len(out), dtype="boolean")
    order = {r: i for i, r in enumerate(run_names(frame))}
    out = out.sort_values([S.RUN, S.STEP, SIGNAL], key=lambda s: s.map(order) if s.name == S.RUN else
                          (s.map({FORWARD: 0, BACKWARD: 1}) if s.name == SIGNAL else s), kind="stable")
    return _attach_config(out.reset_index(drop=True), frame)


def _attach_config(out: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in S.CONFIG_COLUMNS if c in frame.columns]
    if not cols or S.RUN not in frame.columns or out.empty:
        return out
    per_run = frame.drop_duplicates(S.RUN).assign(**{S.RUN: lambda d: d[S.RUN].astype(str)}).set_index(S.RUN)[cols]
    return out.join(per_run, on=S.RUN)


__all__ = ["BACKWARD", "CLASSES", "DEFAULT_RUN", "DIVERGED", "EXPLODE", "EXPLODING", "FACTOR_HIGH", "FACTOR_LOW",
           "FORWARD", "Fit", "HEALTHY", "LAYER_KINDS", "POSITION", "Profiles", "REASON", "REFERENCE_BLOCKS", "REFERENCE_LAYERS", "SIGNALS", "UNKNOWN", "VANISH", "VANISHING",
           "VERDICT_COLUMNS", "block_layers", "classify", "combine_steps", "drawn_thresholds", "factor_interval", "fit_log_slope", "layer_factor", "layer_thresholds", "profile", "profile_pass",
           "rate_text", "rate_thresholds", "run_names", "sentence", "unclear_reason", "verdicts"]
