"""Theory beside measurement: what signal-propagation theory predicts for the built-in nets.

Three modules, one way: :mod:`~gradscope.theory.formulas` (per-layer formulas, no gradscope import),
:mod:`~gradscope.theory.nets` (per-architecture derivations built from the formulas) and this package, whose
:func:`predict` picks the family's predictor from :data:`PREDICTORS`. Pure python; imports nothing of gradscope.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

from gradscope.theory import nets
from gradscope.theory.formulas import (  # noqa: F401  (re-exported: the theory's public vocabulary)
    BN_RELU_LIMIT,
    DESMITH2020,
    FIXUP,
    GAIN2,
    GLOROT2010,
    HE2015,
    PI,
    Prediction,
    YANG2017,
    YANG2019,
    bn_relu_rate,
    bn_relu_variance,
    fit_factor,
    gauss_expect,
    linear_growth,
    relu_layer_factor,
    residual_factor,
    tanh_profiles,
    weight_gain2,
)

#: The predictor of each model family: ``(completed config, batch size or None, first act_var or None)``.
PREDICTORS: dict[str, Callable[[dict[str, Any], Optional[float], Optional[float]], Optional[Prediction]]] = {
    "mlp": nets.mlp_prediction,
    "cifar": nets.cifar_prediction,
}


_NAME = re.compile(r"^(resnet|plain)(\d+)$")


def complete_config(config: Mapping[str, Any], n_blocks: Optional[int] = None) -> Optional[dict[str, Any]]:
    """A full config from a partial one (e.g. a frame's ``model, bn, residual, shortcut, init`` columns).

    Missing keys take the builders' defaults (relu, width 16/256, no preact, no zero-init, shortcut A);
    ``"resnet56"``-style names give the CIFAR depth; an MLP's depth comes from ``n_blocks`` (blocks measured).
    Returns None for a model this module does not know.
    """
    c = dict(config)
    name = str(c.get("name", c.get("model", "")) or "").lower()
    m = _NAME.match(name)
    family = c.get("family") or ("cifar" if m else "mlp" if name.startswith("mlp") else None)
    if family not in ("cifar", "mlp"):
        return None
    c["family"] = family
    for key, default in (("activation", "relu"), ("init", "kaiming"), ("preact", False), ("zero_init_last", False)):
        if c.get(key) is None:  # absent, or an empty config column
            c[key] = default
    if c.get("residual") is None:
        c["residual"] = bool(m and m.group(1) == "resnet")
    if c.get("bn") is None:
        c["bn"] = family == "cifar"
    if family == "cifar":
        depth = int(c.get("depth") or (m.group(2) if m else 20))
        c.setdefault("depth", depth)
        c.setdefault("blocks_per_stage", (depth - 2) // 6)
        c.setdefault("num_blocks", 3 * c["blocks_per_stage"])
        c.setdefault("width", 16)
        c.setdefault("image_size", 32)
        if c["residual"] and not c.get("shortcut"):
            c["shortcut"] = "A"
    else:
        c.setdefault("width", 256)
        if not c.get("num_blocks"):
            c["num_blocks"] = c.get("depth") or n_blocks
        if not c["num_blocks"]:
            return None
    for key in ("bn", "residual", "preact", "zero_init_last"):
        c[key] = bool(c[key])
    return c


def predict(config: Mapping[str, Any], *, batch_size: Optional[int] = None,
            forward_start: Optional[float] = None, n_blocks: Optional[int] = None) -> Optional[Prediction]:
    """The theory's profiles for a model config, or None: "no theory for this model" rather than a guess.

    ``config``: a model's ``gradscope_config`` (or the frame's config columns); ``batch_size`` (or the config's
    ``batch_size``) for finite-batch BN rates, None for the large-batch limit; ``forward_start``: the measured
    act_var of the first block, needed only where the activation saturates (tanh).
    """
    c = complete_config(config, n_blocks)
    if c is None:
        return None
    batch = batch_size or c.get("batch_size")
    return PREDICTORS[c["family"]](c, batch, forward_start)
