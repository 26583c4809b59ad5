"""Parameter statistics as pure functions: norms, gradient norms and the update ratio of every block.

A block owns its parameters recursively; a parameter shared by two blocks counts in both. :class:`ParamIndex` lays
the parameters out once, in a flat order, so each statistic is one ``torch._foreach_norm`` call for all blocks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from gradscope.engine.metrics import GroupIndex, Scratch, group_norms, tensor_norms
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


#: elements of the work buffer in which :func:`update_norms` forms ``theta_after - theta_before`` a chunk of
#: parameters at a time (grown to the largest parameter): 4 MiB in float32
_DELTA_CHUNK = 1 << 20


class Snapshot:
    """The copies of an index's parameters taken before an optimizer step, for ``update_ratio``.

    Why the buffers are kept: on the CPU, every fresh parameter-sized allocation is served by ``mmap`` and
    page-faulted in again, which cost more than the copy itself (50-block MLP, 3.3 M parameters: 9 ms of clones and
    13 ms of differences per recorded step, against 1 ms for a copy into kept buffers). So the copies of CPU
    parameters live in buffers kept from one recorded step to the next (one copy of the parameters, held while the
    scope lives); on a GPU the caching allocator already reuses blocks, and the copies are freed after the step, as
    before. A buffer is made again when its parameter's shape, dtype or device changed (``model.to()``).
    """

    def __init__(self, index: ParamIndex) -> None:
        self.index = index
        self._kept: Optional[List[torch.Tensor]] = None  # one buffer per parameter of ``index.params``

    def take(self) -> List[torch.Tensor]:
        """Copy every parameter now; returns the copies in ``index.order`` (a parameter of two sites appears
        twice, copied once)."""
        current = [self.index.tensor(i).detach() for i in range(len(self.index.params))]
        kept = self._kept
        if kept is None or not all(_same_layout(b, t) for b, t in zip(kept, current)):
            kept = [torch.empty_like(t) for t in current]
        _copy_all(kept, current)
        self._kept = kept if all(t.is_cpu for t in current) else None
        return [kept[i] for i in self.index.order]


def _same_layout(buffer: torch.Tensor, t: torch.Tensor) -> bool:
    return buffer.shape == t.shape and buffer.dtype == t.dtype and buffer.device == t.device and \
        buffer.stride() == t.stride()


def _copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all ``i``: one foreach call where the tensors allow it."""
    with torch.no_grad():
        try:
            torch._foreach_copy_(dst, src)
        except (RuntimeError, TypeError, AttributeError):  # sparse, mixed devices, an old torch
            for d, t in zip(dst, src):
                d.copy_(t)


def snapshot(index: ParamIndex) -> List[torch.Tensor]:
    """Copies of every parameter (in ``index.order``), before an optimizer step (fresh tensors; a scope keeps a
    :class:`Snapshot` instead)."""
    return Snapshot(index).take()


def update_norms(index: ParamIndex, before: List[torch.Tensor], n_sites: int,
                 scratch: Optional[Scratch] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(||theta_after - theta_before||, ||theta_before||)`` of each site in ``index.sites_with_params``.

    The differences are formed a chunk of parameters at a time in one reused work buffer (``scratch``, else a
    fresh one), never all at once: ``before`` stays intact (a NaN's replay may still need it) and no
    parameter-sized tensor is allocated per step."""
    after = [index.tensor(i).detach() for i in index.order]
    with torch.no_grad():
        delta = group_norms_of_differences(after, before, index.groups, n_sites, scratch or Scratch(), index.cache)
        base = group_norms(before, index.groups, n_sites)
    sites = index.site_tensor(delta.device)
    return delta[sites], base[sites]


def group_norms_of_differences(after: List[torch.Tensor], before: List[torch.Tensor], groups: List[int],
                               n_groups: int, scratch: Scratch, cache: Optional[GroupIndex] = None) -> torch.Tensor:
    """The L2 norm of ``after[i] - before[i]`` over each group (as :func:`group_norms`), each difference computed
    exactly as ``after[i] - before[i]`` would be, in views of one work buffer."""
    if not after:
        return group_norms([], groups, n_groups)
    norms: List[torch.Tensor] = []
    for chunk in _chunks(after):
        like = after[chunk[0]]
        total = sum(after[i].numel() for i in chunk)
        work = scratch.get(max(total, 1), like)
        views, offset = [], 0
        for i in chunk:
            n = after[i].numel()
            views.append(work[offset:offset + n].view(after[i].shape))
            offset += n
        _copy_all(views, [after[i] for i in chunk])
        subtract_all(views, [before[i] for i in chunk])
        norms.append(tensor_norms(views))
    device = after[0].device
    squared = torch.zeros(n_groups, dtype=torch.float32, device=device)
    index = cache.index(device, groups) if cache is not None else torch.tensor(groups, device=device)
    squared.index_add_(0, index, torch.cat(norms).square())
    return squared.sqrt()


def _chunks(tensors: List[torch.Tensor]) -> List[List[int]]:
    """Runs of consecutive indices of one device and dtype, each at most ``_DELTA_CHUNK`` elements (or a single
    larger tensor)."""
    chunks: List[List[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        prev = tensors[chunks[-1][-1]] if chunks else None
        same = prev is not None and prev.device == t.device and prev.dtype == t.dtype and \
            not t.is_sparse and not prev.is_sparse
        if chunks and same and size + t.numel() <= _DELTA_CHUNK:
            chunks[-1].append(i)
            size += t.numel()
        else:
            chunks.append([i])
            size = t.numel()
    return chunks


def subtract_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """``dst[i] -= src[i]`` for all ``i``: one foreach call where the tensors allow it."""
    try:
        torch._foreach_sub_(dst, src)
    except (RuntimeError, TypeError, AttributeError):
        for d, t in zip(dst, src):
            d.sub_(t)


def passes_closure(optimizer: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether an ``optimizer.step`` call (as its step pre-hook sees it) was given a closure.

    The hook's ``args`` start with the optimizer itself, then ``step``'s positional arguments.
    """
    positional = args[1:] if args and args[0] is optimizer else args
    return (bool(positional) and positional[0] is not None) or kwargs.get("closure") is not None
