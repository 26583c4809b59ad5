"""Optimizer-state signals: the norms of an Adam-family optimizer's moment estimates over each block's parameters.

Read on the host side at ``scope.step()`` from ``optimizer.state`` (no hook, no copy): whatever the last
``optimizer.step()`` left there. Any optimizer that keeps the states under the names Adam uses qualifies (Adam,
AdamW, NAdam, RAdam, Adamax's ``exp_avg``, LAMB-style optimizers from other libraries that follow the naming):

* ``adam_m_norm`` = ``||exp_avg||``, the L2 norm of the first-moment estimate m over the block's parameters;
* ``adam_v_norm`` = ``||sqrt(exp_avg_sq)||`` = ``sqrt(sum exp_avg_sq)``, the L2 norm of the RMS-gradient estimate
  sqrt(v); computed as the square root of a sum (v >= 0), so it costs one pass over v and no elementwise root.

Both are raw (not bias-corrected): after one step from zero, ``m = (1 - beta1) g`` and ``v = (1 - beta2) g^2``,
so ``adam_m_norm = (1 - beta1) ||g||`` and ``adam_v_norm = sqrt(1 - beta2) ||g||``. Their ratio to
``param_grad_norm`` says how much of the current gradient the moments carry; ``adam_m_norm / adam_v_norm`` is
``(1-beta1^t)/sqrt(1-beta2^t)`` for a constant gradient and falls toward 0 when its sign flips from step to step.
"""
from __future__ import annotations

from collections.abc import Mapping as AbcMapping
from typing import Any, List, Mapping, Optional, Tuple

import torch

from gradscope import schema as S
from gradscope.engine import spec
from gradscope.engine.metrics import group_norms
from gradscope.engine.params import ParamIndex
from gradscope.engine.sharding import local

#: metric -> (the optimizer-state key it reads, whether the norm is of the state's elementwise square root)
STATE_KEYS = {S.ADAM_M_NORM: ("exp_avg", False), S.ADAM_V_NORM: ("exp_avg_sq", True)}


def state_of(optimizer: Any) -> Optional[Mapping[Any, Any]]:
    """``optimizer.state`` of ``optimizer`` or of the optimizer it wraps (``.optimizer``: accelerate, Lightning)."""
    seen = 0
    while optimizer is not None and seen < 8:
        state = getattr(optimizer, "state", None)
        if isinstance(state, Mapping):
            return state
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def _any_entry_holds(state: Mapping[Any, Any], key: str) -> bool:
    """Whether any parameter's state holds ``key``: one pass over the state's values, which hashes no tensor (a
    lookup by parameter costs about a microsecond each; an optimizer without the key, SGD, paid it per parameter
    and per metric at every recorded step)."""
    for entry in state.values():
        if (type(entry) is dict or isinstance(entry, AbcMapping)) and key in entry:
            return True
    return False


def _tensors(state: Mapping[Any, Any], index: ParamIndex, key: str) -> List[Tuple[torch.Tensor, int]]:
    """``(state tensor, site)`` for every (parameter, site) pair of ``index`` whose state holds ``key``."""
    found = []
    for i, site in zip(index.order, index.groups):
        entry = state.get(index.params[i])
        # a plain dict first: typing's Mapping check costs microseconds per parameter and step
        t = entry.get(key) if type(entry) is dict or isinstance(entry, AbcMapping) else None
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            found.append((local(t) if index.sharded else t, site))
    return found


def state_norms(optimizer: Any, index: ParamIndex, n_sites: int, metric: str
                ) -> Optional[Tuple[List[int], torch.Tensor]]:
    """``(sites, norms)`` of ``metric`` (a key of :data:`STATE_KEYS`) for every site whose parameters have the
    state; None when no parameter has it (no optimizer step yet, or an optimizer without these states)."""
    state = state_of(optimizer)
    if state is None:
        return None
    key, root = STATE_KEYS[metric]
    if not _any_entry_holds(state, key):  # SGD, or no step yet: no per-parameter lookups
        return None
    pairs = _tensors(state, index, key)
    if not pairs:
        return None
    groups = [g for _, g in pairs]
    with torch.no_grad():
        if root:  # ||sqrt(v)||^2 = sum(v): a sum per tensor, summed per site, then one root
            sums = torch.stack([t.detach().sum(dtype=torch.float32) for t, _ in pairs])
            total = torch.zeros(n_sites, dtype=torch.float32, device=sums.device)
            total.index_add_(0, torch.tensor(groups, device=sums.device), sums)
            norms = total.clamp_min(0).sqrt()
        else:
            norms = group_norms([t for t, _ in pairs], groups, n_sites)
    sites = sorted(set(groups))
    return sites, norms[torch.tensor(sites, device=norms.device)]


def record_optstate(rec: Any, optimizer: Any, index: ParamIndex, n_sites: int, names: Tuple[str, ...]) -> None:
    """Buffer each of ``names`` for every site that has the state, at the recorder's current step (one device vector
    per metric, moved to the host with the step's other statistics)."""
    layout = spec.SHARD if index.sharded else spec.VALUE
    for name in names:
        found = state_norms(optimizer, index, n_sites, name)
        if found is not None:
            rec.add_per_site(rec.step, found[0], name, found[1], layout)
