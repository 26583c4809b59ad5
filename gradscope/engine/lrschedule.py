"""What each block's optimizer step was told: its learning rate against the schedule, for ``update_band``.

An update ratio below the band means a block learns too slowly, unless the learning rate was meant to be small at
that step. Read per parameter group (a head with its own warm-up, a second optimizer) at each optimizer step:

* **lr 0** before the group's lr was ever above 0 (a warm-up from 0, a group frozen by an lr of 0): nothing was
  meant to move; the low end is not judged. After it was above 0 (a schedule or a bug that sets it to 0), the ratio
  is judged as it is: training has stopped, and the note says the lr is 0.
* **warming up**: the group's lr is below the base its torch scheduler records (``initial_lr``; ``max_lr`` for
  OneCycleLR) and higher than at the previous recorded step. The ratio is judged at that base (divided by
  ``lr / base``): a linear warm-up from near 0 is the schedule, not a slow block. A flat lr below the base (a
  resumed run after a decay, a constant factor) is not warming up and is judged as it is.
* **decaying**: the lr is below the largest it has been at a recorded step. The ratio is judged as it is (a step schedule stepped per
  batch instead of per epoch, or an lr dropped by a bug, is exactly what the band is for); the alert's note says
  which fraction of its peak the lr is, so a cosine tail reads as one.
* otherwise the ratio is judged as it is (a hand-written warm-up cannot be told from an lr that is too small; the
  band's patience of three recorded steps covers its first steps). An lr that is flat below its scheduler's base
  (a warm-up stepped once per epoch, Lightning's default ``interval``; a run resumed after a decay) is judged as
  it is too, and the note gives the fraction of the base.

The first step of Adam, AdamW and Adamax moves every weight with a gradient by about ``lr`` whatever the gradient
(their bias correction makes it ``lr * sign(g)``): an ``update_band`` alert there says so.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch

from gradscope.engine.alertkinds import OptimizerStep


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
    """Per parameter group, the lr it had at the previous recorded step and the largest so far; what each block's
    step was told (:meth:`told`, at recorded steps only: an unrecorded step reads nothing, so a tensor lr on a GPU
    costs no synchronisation there). Groups are known by their optimizer and position: ``load_state_dict`` makes
    new group dicts but keeps their order."""

    def __init__(self) -> None:
        self._seen: Dict[Tuple[int, int], Tuple[float, float]] = {}  # (id(opt), group) -> (last lr, largest lr)
        self._blocks: Dict[int, Tuple[Any, Dict[str, List[int]]]] = {}  # id(optimizer) -> (layout, groups of blocks)

    def told(self, optimizer: Any, params: List[Any], sites: List[List[str]]) -> "BlockSteps":
        """What the steps of the blocks owning ``params`` were told (``sites[i]``: the blocks that own ``params[i]``);
        a block whose parameters lie in several groups takes the group with the largest lr. The cost is one read
        per parameter group: blocks are looked up only when an alert asks."""
        first = first_adaptive(optimizer)
        groups = list(getattr(optimizer, "param_groups", ()))
        steps = [self._step_of((id(optimizer), g), group, first) for g, group in enumerate(groups)]
        return BlockSteps([(steps, self._groups_of_blocks(optimizer, groups, params, sites))])

    def _groups_of_blocks(self, optimizer: Any, groups: List[Dict[str, Any]], params: List[Any],
                          sites: List[List[str]]) -> Dict[str, List[int]]:
        """Block name -> the indices of the groups holding its parameters (made again when the groups' parameter
        lists or the blocks' parameters are other objects or of other lengths)."""
        key = (tuple((id(g.get("params")), len(g.get("params", ()))) for g in groups), id(params), len(params))
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

    def _step_of(self, key: Tuple[int, int], group: Dict[str, Any], first: bool) -> OptimizerStep:
        lr, base = group_lr(group)
        last, peak = self._seen.get(key, (math.nan, 0.0))
        peak = max(peak, lr)
        self._seen[key] = (lr, peak)
        if lr <= 0:  # judged (scale 1) once the group has had an lr above 0: nothing moves any more
            return OptimizerStep(lr, 1.0 if peak > 0 else 0.0, first, 0.0)
        warming = base > lr and lr > last  # rising toward the scheduler's base since the previous recorded step
        below = lr / base if base > lr and not warming and lr >= peak else 1.0  # flat under the base, never above
        return OptimizerStep(lr, lr / base if warming else 1.0, first, min(1.0, lr / peak), below)


class BlockSteps:
    """Block name -> the :class:`OptimizerStep` its optimizer step was told, resolved when asked (a mapping of the
    few methods :mod:`gradscope.engine.alerts` reads). Several optimizers: the one with the largest lr."""

    def __init__(self, parts: List[Tuple[List[OptimizerStep], Dict[str, List[int]]]]) -> None:
        self.parts = parts  # per optimizer: the step of each of its groups, and the groups of each block

    def merged(self, other: "BlockSteps") -> "BlockSteps":
        return BlockSteps(self.parts + other.parts)

    def get(self, block: str, default: Any = None) -> Any:
        found = [steps[g] for steps, owned in self.parts for g in owned.get(block, ())]
        return max(found, key=lambda step: step.lr) if found else default

    def __contains__(self, block: object) -> bool:
        return any(block in owned for _, owned in self.parts)

    def __getitem__(self, block: str) -> OptimizerStep:
        found = self.get(block)
        if found is None:
            raise KeyError(block)
        return found


def site_names(index: Any, sites: List[Any]) -> Tuple[List[Any], List[List[str]]]:
    """The parameters of a :class:`~gradscope.engine.params.ParamIndex` and, for each, the names of the blocks that
    own it (for :meth:`LrSchedule.told`)."""
    owners: List[List[str]] = [[] for _ in index.params]
    for i, site in zip(index.order, index.groups):
        owners[i].append(sites[site].name)
    return list(index.params), owners


__all__ = ["BlockSteps", "LrSchedule", "first_adaptive", "group_lr", "site_names"]
