"""Build the built-in networks by name: ``build(name, **options)`` and ``available()``.

Names: the families ``"resnet"``, ``"plain"`` (CIFAR nets of any depth 6n+2, default 20) and ``"mlp"``, and the
paper's depths ``resnet20 .. resnet110`` and ``plain20 .. plain110`` (He et al. 2016, Table 6). Every model
gets ``model.gradscope_config``, a dict that says what was built (name, family, residual, bn, shortcut, preact,
init, zero_init_last, activation, width, depth, num_blocks, ...), for the theory and report layers to read.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.errors import ModelError
from gradscope.models.cifar import PAPER_DEPTHS, plain, resnet
from gradscope.models.mlp import mlp

_FAMILIES: dict[str, Callable[..., nn.Module]] = {"resnet": resnet, "plain": plain, "mlp": mlp}
#: name -> (family, fixed options)
_REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {
    **{family: (family, {}) for family in _FAMILIES},
    **{f"{family}{depth}": (family, {"depth": depth}) for family in ("plain", "resnet") for depth in PAPER_DEPTHS},
}


def available() -> list[str]:
    """Every name :func:`build` accepts, sorted."""
    return sorted(_REGISTRY)


def facts(name: str) -> dict[str, Any]:
    """What the name ``name`` builds, without building it: ``family`` ("plain", "resnet", "mlp"), ``depth`` and
    ``residual`` (the builder's defaults where the name fixes nothing). Unknown names raise like :func:`build`."""
    builder, fixed = _resolve(name)
    family = _REGISTRY[name.lower()][0]
    defaults = {k: p.default for k, p in inspect.signature(builder).parameters.items()
                if p.default is not inspect.Parameter.empty}
    residual = True if family == "resnet" else bool(defaults.get("residual", False))
    return {"family": family, "depth": fixed.get("depth", defaults.get("depth")), "residual": residual}


def _close_matches(word: str, choices: list[str]) -> str:
    matches = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(map(repr, matches))}? " if matches else ""


def _resolve(name: str) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """The builder and fixed options of ``name``; a ModelError that suggests close names otherwise."""
    if not isinstance(name, str):
        raise ModelError(f"model name {name!r} must be a string; available: {', '.join(available())}")
    key = name.lower()
    if key not in _REGISTRY:
        names = available()
        raise ModelError(f"unknown model {name!r}; {_close_matches(key, names)}"
                         f"available: {', '.join(names)}")
    family, fixed = _REGISTRY[key]
    return _FAMILIES[family], fixed


def _merge_options(name: str, builder: Callable[..., nn.Module], fixed: dict[str, Any],
                   options: dict[str, Any]) -> dict[str, Any]:
    """``options`` on top of the name's fixed ones, refusing options the builder lacks or that contradict the name."""
    accepted = list(inspect.signature(builder).parameters)
    for option in options:
        if option not in accepted:
            raise ModelError(f"{name} takes no option {option!r}; {_close_matches(option, accepted)}"
                             f"options: {', '.join(accepted)}")
    for option, value in fixed.items():
        if option in options and options[option] != value:
            raise ModelError(f"{name} has {option}={value}, not {options[option]!r}; "
                             f"use build({builder.__name__!r}, {option}={options[option]!r}) instead")
    return {**options, **fixed}


def build(name: str, *, seed: int | None = None, **options: Any) -> nn.Module:
    """Build the network ``name`` with ``options``, initialised and in training mode.

    ``seed``: when given, the weights are drawn from ``torch.manual_seed(seed)`` inside a forked RNG, so the
    same seed gives the same weights and the caller's global RNG is left as it was; when None, torch's global
    RNG is used. Unknown names and options raise :class:`gradscope.errors.ModelError` with close matches.

    >>> build("resnet56", bn=False).gradscope_config["num_blocks"]
    27
    """
    builder, fixed = _resolve(name)
    kwargs = _merge_options(name, builder, fixed, options)
    if seed is None:
        return builder(**kwargs)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ModelError(f"seed={seed!r} must be an int or None")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(**kwargs)
