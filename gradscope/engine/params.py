"""Parameter statistics as pure functions: norms, gradient norms and the update ratio of every block.

A block owns its parameters recursively; a parameter shared by two blocks counts in both. :class:`ParamIndex` lays
the parameters out once, in a flat order, so each statistic is one ``torch._foreach_norm`` call for all blocks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from gradscope.engine.metrics import GroupIndex, group_norms
from gradscope.engine.sharding import local
from gradscope.engine.sites import Site


class ParamIndex:
    """Parameters owned by each site (recursively), de-duplicated per site, in a flat order for foreach norms."""

    def __init__(self) -> None:
        self.params: List[torch.nn.Parameter] = []
        self.order: List[int] = []
        self.groups: List[int] = []
        self.sites_with_params: List[int] = []
        self.cache = GroupIndex()
        self.sharded = False  # FSDP2: parameters are DTensors; every statistic reads this rank's shards
        self._site_tensor: Dict[torch.device, torch.Tensor] = {}

    def tensor(self, i: int) -> torch.Tensor:
        """Parameter ``i`` as a plain tensor: this rank's shard when the model is sharded (no communication)."""
        p = self.params[i]
        return local(p) if self.sharded else p

    def grad(self, i: int) -> Optional[torch.Tensor]:
        """The ``.grad`` of parameter ``i`` (this rank's shard of it when sharded), or None."""
        g = self.params[i].grad
        return None if g is None else (local(g) if self.sharded else g)

    def site_tensor(self, device: torch.device) -> torch.Tensor:
        """``sites_with_params`` as a cached long tensor on ``device``."""
        if device not in self._site_tensor:
            self._site_tensor[device] = torch.tensor(self.sites_with_params, dtype=torch.long, device=device)
        return self._site_tensor[device]


def param_index(sites: List[Site], sharded: bool = False, only: Optional[Set[int]] = None) -> ParamIndex:
    """The :class:`ParamIndex` of ``sites`` (``sharded``: FSDP2 DTensor parameters, measured shard by shard);
    ``only``: the positions in ``sites`` to include (the blocks one optimizer updates), all by default."""
    index = ParamIndex()
    index.sharded = sharded
    position: Dict[int, int] = {}
    for s, site in enumerate(sites):
        if only is not None and s not in only:
            continue
        own = list(site.module.parameters())
        if own:
            index.sites_with_params.append(s)
        for p in own:
            if id(p) not in position:
                position[id(p)] = len(index.params)
                index.params.append(p)
            index.order.append(position[id(p)])
            index.groups.append(s)
    return index


def _dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def param_norms(index: ParamIndex, n_sites: int) -> torch.Tensor:
    """||theta|| of each site in ``index.sites_with_params`` (a device vector in that order)."""
    norms = group_norms([index.tensor(i) for i in index.order], index.groups, n_sites, index.cache)
    return norms[index.site_tensor(norms.device)]


def param_grad_norms(index: ParamIndex, n_sites: int,
                     scale: Optional[torch.Tensor] = None) -> Optional[Tuple[List[int], torch.Tensor]]:
    """``(sites, norms)``: ||d L / d theta|| of each site whose parameters have a ``.grad``, divided by ``scale``
    when given (a GradScaler's scale still in the gradients); None when no parameter has a gradient."""
    pairs = [(index.grad(i), g) for i, g in zip(index.order, index.groups) if index.params[i].grad is not None]
    if not pairs:
        return None
    groups = [g for _, g in pairs]
    gnorms = group_norms([_dense(g) for g, _ in pairs], groups, n_sites, index.cache)
    if scale is not None:
        gnorms = gnorms / scale.to(gnorms.device, gnorms.dtype)
    sites = sorted(set(groups))
    return sites, gnorms[index.cache.index(gnorms.device, sites)]


def snapshot(index: ParamIndex) -> List[torch.Tensor]:
    """Copies of every parameter, before an optimizer step."""
    return [index.tensor(i).detach().clone() for i in index.order]


def update_norms(index: ParamIndex, before: List[torch.Tensor], n_sites: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(||theta_after - theta_before||, ||theta_before||)`` of each site in ``index.sites_with_params``."""
    after = [index.tensor(i).detach() for i in index.order]
    with torch.no_grad():
        delta = group_norms([a - b for a, b in zip(after, before)], index.groups, n_sites)
        base = group_norms(before, index.groups, n_sites)
    sites = index.site_tensor(delta.device)
    return delta[sites], base[sites]


def passes_closure(optimizer: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether an ``optimizer.step`` call (as its step pre-hook sees it) was given a closure.

    The hook's ``args`` start with the optimizer itself, then ``step``'s positional arguments.
    """
    positional = args[1:] if args and args[0] is optimizer else args
    return (bool(positional) and positional[0] is not None) or kwargs.get("closure") is not None
