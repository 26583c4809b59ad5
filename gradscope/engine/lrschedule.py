"""What each block's optimizer step was told: its learning rate against the schedule, for ``update_band``.

An update ratio below the band means a block learns too slowly, unless the learning rate was meant to be small at
that step. Read per parameter group (a head with its own warm-up, a second optimizer) at each optimizer step:

* **lr 0**: nothing was meant to move; the low end is not judged.
* **warming up**: the group's lr is below the base its torch scheduler records (``initial_lr``; ``max_lr`` for
  OneCycleLR) and at least as high as it has been so far. The ratio is judged at that base (divided by
  ``lr / base``): a linear warm-up from near 0 is the schedule, not a slow block.
* **decaying**: the lr is below the largest it has been. The ratio is judged as it is (a step schedule stepped per
  batch instead of per epoch, or an lr dropped by a bug, is exactly what the band is for); the alert's note says
  which fraction of its peak the lr is, so a cosine tail reads as one.
* otherwise the ratio is judged as it is (a hand-written warm-up cannot be told from an lr that is too small; the
  band's patience of three recorded steps covers its first steps).

The first step of Adam, AdamW and Adamax moves every weight with a gradient by about ``lr`` whatever the gradient
(their bias correction makes it ``lr * sign(g)``): an ``update_band`` alert there says so.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch

from gradscope.engine.alerts import OptimizerStep


def group_lr(group: Dict[str, Any]) -> Tuple[float, float]:
    """``(lr, base)`` of one parameter group: its lr now, and the base or peak its scheduler records
    (``initial_lr``, ``max_lr``; 0.0 without one)."""
    lr = base = 0.0
    for key in ("lr", "initial_lr", "max_lr"):
        value = group.get(key)
        if isinstance(value, torch.Tensor):  # a tensor lr (capturable Adam)
            value = float(value.detach().reshape(-1)[0]) if value.numel() else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            if key == "lr":
                lr = float(value)
            else:
                base = max(base, float(value))
    return lr, base


def first_adaptive(optimizer: Any) -> bool:
    """Whether ``optimizer`` is an Adam, AdamW or Adamax about to take its first step (its per-parameter state still
    empty): that step moves every weight with a gradient by about ``lr``. (RAdam's first steps are plain momentum
    steps, NAdam's are scaled otherwise: neither is named.)"""
    adaptive = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    return isinstance(inner, adaptive) and not getattr(inner, "state", True)


class LrSchedule:
    """The largest lr each parameter group has had so far, and what each block's step was told.

    ``observe`` runs at every optimizer step (recorded or not: a peak may fall between recorded steps);
    ``told`` at the recorded ones."""

    def __init__(self) -> None:
        self._peak: Dict[int, float] = {}  # id(param group) -> its largest lr so far (this step's included)
        self._previous: Dict[int, float] = {}  # id(param group) -> its largest lr before this step
        self._blocks: Dict[int, Tuple[Any, Dict[str, List[int]]]] = {}  # id(optimizer) -> (layout, groups of blocks)

    def observe(self, optimizer: Any) -> None:
        """Note the lr of each of ``optimizer``'s groups at this step."""
        for group in getattr(optimizer, "param_groups", ()):
            lr, _ = group_lr(group)
            key = id(group)
            self._previous[key] = self._peak.get(key, 0.0)
            self._peak[key] = max(self._peak.get(key, 0.0), lr)

    def told(self, optimizer: Any, params: List[Any], sites: List[List[str]]) -> Dict[str, OptimizerStep]:
        """Block name -> what its step was told, for the blocks owning ``params`` (``sites[i]``: the blocks that own
        ``params[i]``); a block whose parameters lie in several groups takes the group with the largest lr."""
        first = first_adaptive(optimizer)
        groups = list(getattr(optimizer, "param_groups", ()))
        steps = [self._step_of(group, first) for group in groups]
        out: Dict[str, OptimizerStep] = {}
        for name, owned in self._groups_of_blocks(optimizer, groups, params, sites).items():
            out[name] = max((steps[g] for g in owned), key=lambda step: step.lr)
        return out

    def _groups_of_blocks(self, optimizer: Any, groups: List[Dict[str, Any]], params: List[Any],
                          sites: List[List[str]]) -> Dict[str, List[int]]:
        """Block name -> the indices of the groups holding its parameters (made again when the groups or the
        parameters change)."""
        key = (tuple(id(p) for g in groups for p in g.get("params", ())), tuple(id(p) for p in params))
        cached = self._blocks.get(id(optimizer))
        if cached is not None and cached[0] == key:
            return cached[1]
        group_of = {id(p): g for g, group in enumerate(groups) for p in group.get("params", ())}
        owned: Dict[str, List[int]] = {}
        for p, names in zip(params, sites):
            g = group_of.get(id(p))
            if g is None:
                continue
            for name in names:
                if g not in owned.setdefault(name, []):
                    owned[name].append(g)
        self._blocks[id(optimizer)] = (key, owned)
        return owned

    def _step_of(self, group: Dict[str, Any], first: bool) -> OptimizerStep:
        lr, base = group_lr(group)
        key = id(group)
        peak, before = self._peak.get(key, lr), self._previous.get(key, 0.0)
        if lr <= 0:
            return OptimizerStep(lr, 0.0, first, 0.0)
        warming = base > lr and lr >= before  # below the scheduler's base and not below any earlier lr
        scale = lr / base if warming else 1.0
        return OptimizerStep(lr, scale, first, min(1.0, lr / peak) if peak > 0 else 1.0)


def site_names(index: Any, sites: List[Any]) -> Tuple[List[Any], List[List[str]]]:
    """The parameters of a :class:`~gradscope.engine.params.ParamIndex` and, for each, the names of the blocks that
    own it (for :meth:`LrSchedule.told`)."""
    owners: List[List[str]] = [[] for _ in index.params]
    for i, site in zip(index.order, index.groups):
        owners[i].append(sites[site].name)
    return list(index.params), owners


__all__ = ["LrSchedule", "first_adaptive", "group_lr", "site_names"]
