"""Parameter statistics as pure functions: norms, gradient norms and the update ratio of every block.

A block owns its parameters recursively; a parameter shared by two blocks counts in both. :class:`ParamIndex` lays
the parameters out once, in a flat order, so each statistic is one ``torch._foreach_norm`` call for all blocks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from gradscope.engine.metrics import GroupIndex, group_norms, tensor_norms
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

    def in_order(self) -> List[torch.Tensor]:
        """The parameter of every (site, parameter) pair, in ``order`` (shards when sharded)."""
        if self.sharded:
            return [self.tensor(i) for i in self.order]
        params = self.params
        return [params[i] for i in self.order]

    def grad(self, i: int) -> Optional[torch.Tensor]:
        """The ``.grad`` of parameter ``i`` (this rank's shard of it when sharded), or None."""
        g = self.params[i].grad
        return None if g is None else (local(g) if self.sharded else g)

    def site_tensor(self, device: torch.device) -> torch.Tensor:
        """``sites_with_params`` as a cached long tensor on ``device``."""
        if device not in self._site_tensor:
            self._site_tensor[device] = torch.tensor(self.sites_with_params, dtype=torch.long, device=device)
        return self._site_tensor[device]


# ---- parameters registered after attach -------------------------------------------------------------------------
_REGISTERED = [0]  # parameters and child modules registered anywhere while some scope listens
_LISTENING: List[Any] = []  # the handles of torch's global registration hooks
_LISTENERS = [0]  # scopes attached


def _count_registration(*args: Any) -> None:
    _REGISTERED[0] += 1


def listen() -> None:
    """A scope attaches: count every parameter and child module registered from now on (torch's global
    registration hooks, one per process however many scopes listen).

    Why: a block's parameters are indexed at ``attach()``. A child replaced inside a block (a LoRA wrapper),
    ``load_state_dict(..., assign=True)`` or a parametrization (``weight_norm``) registers new parameters, and the
    index would go on measuring the old ones (``param_norm`` frozen, ``param_grad_norm`` missing). Every such change
    goes through ``register_parameter`` or ``Module.__setattr__``/``add_module``, which call these hooks; a count
    that moved tells the scope to index again (:func:`registrations`). Writing ``module._parameters`` by hand is not
    seen."""
    if _LISTENERS[0] == 0:
        from torch.nn.modules import module as torch_module

        for name in ("register_module_parameter_registration_hook", "register_module_module_registration_hook"):
            register = getattr(torch_module, name, None)
            if register is not None:
                _LISTENING.append(register(_count_registration))
    _LISTENERS[0] += 1


def unlisten() -> None:
    """A scope detaches: the last one removes the global hooks."""
    _LISTENERS[0] = max(_LISTENERS[0] - 1, 0)
    if _LISTENERS[0] == 0:
        while _LISTENING:
            _LISTENING.pop().remove()


def registrations() -> int:
    """How many parameters and child modules were registered while some scope listened (see :func:`listen`)."""
    return _REGISTERED[0]


def layout_key(optimizers: List[Any]) -> Tuple[int, Tuple[Tuple[int, ...], ...]]:
    """What a scope's parameter index and optimizer coverage were made from: the registration count
    (:func:`registrations`) and each optimizer's group sizes (``add_param_group``). A different key at the next
    recorded step makes the scope index its blocks' parameters again."""
    return registrations(), tuple(tuple(len(g["params"]) for g in opt.param_groups) for opt in optimizers)


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


def same_params(a: ParamIndex, b: ParamIndex) -> bool:
    """Whether two indexes hold the same parameter objects in the same blocks and order."""
    return a.groups == b.groups and a.order == b.order and len(a.params) == len(b.params) and \
        all(x is y for x, y in zip(a.params, b.params))


def _dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def param_norms(index: ParamIndex, n_sites: int) -> torch.Tensor:
    """||theta|| of each site in ``index.sites_with_params`` (a device vector in that order)."""
    norms = group_norms(index.in_order(), index.groups, n_sites, index.cache)
    return norms[index.site_tensor(norms.device)]


def param_grad_norms(index: ParamIndex, n_sites: int,
                     scale: Optional[torch.Tensor] = None) -> Optional[Tuple[List[int], torch.Tensor]]:
    """``(sites, norms)``: ||d L / d theta|| of each site whose parameters have a ``.grad``, divided by ``scale``
    when given (a GradScaler's scale still in the gradients); None when no parameter has a gradient."""
    params = index.params
    raw = [params[i].grad for i in index.order]
    if all(g is not None and not g.is_sparse for g in raw) and not index.sharded:  # the usual step: one layout
        gnorms = group_norms(raw, index.groups, n_sites, index.cache)
        sites, picked = index.sites_with_params, index.site_tensor(gnorms.device)
    else:
        pairs = [(index.grad(i), g) for i, g in zip(index.order, index.groups) if params[i].grad is not None]
        if not pairs:
            return None
        groups = [g for _, g in pairs]
        gnorms = group_norms([_dense(g) for g, _ in pairs], groups, n_sites, index.cache)
        sites = sorted(set(groups))
        picked = index.cache.index(gnorms.device, sites)
    if scale is not None:
        gnorms = gnorms / scale.to(gnorms.device, gnorms.dtype)
    return list(sites), gnorms[picked]


#: elements of the work buffer in which :func:`update_norms` forms ``theta_after - theta_before`` a chunk of
#: parameters at a time (grown to the largest parameter): 4 MiB in float32
_DELTA_CHUNK = 1 << 20
#: a parameter of at least this many elements is differenced by its own ``torch.sub(..., out=)`` pass (its
#: memory traffic outweighs a call); smaller ones go together through foreach calls
_ALONE = 1 << 14


class Snapshot:
    """The copies of an index's parameters taken before an optimizer step, for ``update_ratio``.

    Why the buffers are kept: inside a CPU training loop, fresh parameter-sized allocations cost more than the
    copying itself (probably glibc handing large blocks back to the system between steps and faulting them in again;
    50-block MLP, 3.3 M parameters: about 30 ms per recorded step for the copies and differences, about 9 ms with
    kept buffers, docs/performance.md). So the copies of CPU
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


def update_norms(index: ParamIndex, before: List[torch.Tensor], n_sites: int,
                 work: Optional["Differences"] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(||theta_after - theta_before||, ||theta_before||)`` of each site in ``index.sites_with_params``.

    The differences are formed a chunk of parameters at a time in a reused work buffer (``work``, kept by the scope;
    else a fresh one), never all at once: ``before`` stays intact (a NaN's replay may still need it) and no
    parameter-sized tensor is allocated per step.

    ``||theta_before||`` is always measured on the copy: the norms ``param_norm`` measured just before would save a
    pass (1.9 ms a recorded step on the 50-block MLP), but nothing proves the weights unchanged in between. A write
    through ``p.data`` (WGAN's weight clipping, weight decay by hand, ``vector_to_parameters``) leaves ``p._version``
    as it was, and reusing them gave ratios off by 2x and more (removed 2026-12-07)."""
    after = index.in_order()
    with torch.no_grad():
        delta = (work or Differences()).group_norms(after, before, index.groups, n_sites, index.cache)
        sites = index.site_tensor(delta.device)
        base = group_norms(before, index.groups, n_sites, index.cache)
    return delta[sites], base[sites]


class Differences:
    """The work buffer in which :func:`update_norms` forms ``after[i] - before[i]``, cut once into views.

    The parameters are packed into chunks of at most ``_DELTA_CHUNK`` elements of one device and dtype (a larger
    parameter is a chunk of its own), whatever their order; one buffer per (device, dtype) holds the largest chunk.
    In a chunk, each parameter of ``_ALONE`` elements or more is differenced by one ``torch.sub(..., out=)`` (its
    memory traffic outweighs a call), the small ones by one foreach copy and one foreach subtraction; then one
    foreach norm per chunk. The views and the packing are made once and reused while the parameters keep their
    shapes, dtypes and devices (making ~160 views costs more than the arithmetic on ResNet-56)."""

    def __init__(self) -> None:
        self._key: Optional[Tuple[Any, ...]] = None
        self._chunks: List[Tuple[List[int], List[torch.Tensor], List[int], List[int]]] = []
        self._packed: List[int] = []  # the indices of ``after`` in the order their norms come out

    def group_norms(self, after: List[torch.Tensor], before: List[torch.Tensor], groups: List[int], n_groups: int,
                    cache: Optional[GroupIndex] = None) -> torch.Tensor:
        """The L2 norm of ``after[i] - before[i]`` over each group (as :func:`group_norms`); each difference is the
        one ``after[i] - before[i]`` gives."""
        if not after:
            return group_norms([], groups, n_groups)
        norms: List[torch.Tensor] = []
        for chunk, views, alone, small in self._plan(after):
            if not views:  # a sparse parameter: its own difference, as before
                norms.append(tensor_norms([after[chunk[0]] - before[chunk[0]]]))
                continue
            for k in alone:
                torch.sub(after[chunk[k]], before[chunk[k]], out=views[k])
            if small:
                _copy_all([views[k] for k in small], [after[chunk[k]] for k in small])
                _subtract_all([views[k] for k in small], [before[chunk[k]] for k in small])
            norms.append(tensor_norms(views))
        device = after[0].device
        squared = torch.zeros(n_groups, dtype=torch.float32, device=device)
        packed_groups = [groups[i] for i in self._packed]
        index = cache.index(device, packed_groups) if cache is not None else \
            torch.tensor(packed_groups, device=device)
        squared.index_add_(0, index, torch.cat(norms).square())
        return squared.sqrt()

    def _plan(self, after: List[torch.Tensor]) -> List[Tuple[List[int], List[torch.Tensor], List[int], List[int]]]:
        key = tuple((t.shape, t.dtype, t.device, t.is_sparse) for t in after)
        if key != self._key:
            chunks = _chunks(after)
            sizes: Dict[Tuple[torch.device, torch.dtype], int] = {}
            for chunk in chunks:
                like = after[chunk[0]]
                if not like.is_sparse:
                    k = (like.device, like.dtype)
                    sizes[k] = max(sizes.get(k, 1), sum(after[i].numel() for i in chunk))
            buffers = {k: torch.empty(n, dtype=k[1], device=k[0]) for k, n in sizes.items()}
            self._chunks = []
            for chunk in chunks:
                alone = [k for k, i in enumerate(chunk) if after[i].numel() >= _ALONE]
                small = [k for k, i in enumerate(chunk) if after[i].numel() < _ALONE]
                self._chunks.append((chunk, _views(buffers, after, chunk), alone, small))
            self._packed = [i for chunk in chunks for i in chunk]
            self._key = key
        return self._chunks


def _views(buffers: Dict[Tuple[torch.device, torch.dtype], torch.Tensor], after: List[torch.Tensor],
           chunk: List[int]) -> List[torch.Tensor]:
    """Views of the work buffer shaped like ``after[i]`` for ``i`` in ``chunk`` (none for a sparse tensor)."""
    like = after[chunk[0]]
    if like.is_sparse:
        return []
    work, views, offset = buffers[(like.device, like.dtype)], [], 0
    for i in chunk:
        n = after[i].numel()
        views.append(work[offset:offset + n].view(after[i].shape))
        offset += n
    return views


def _chunks(tensors: List[torch.Tensor]) -> List[List[int]]:
    """Indices packed into chunks of one device and dtype, each at most ``_DELTA_CHUNK`` elements (in first-fit
    order); a larger parameter, or a sparse one, is a chunk of its own."""
    chunks: List[List[int]] = []
    open_chunk: Dict[Tuple[torch.device, torch.dtype], Tuple[List[int], List[int]]] = {}  # -> (chunk, [size])
    for i, t in enumerate(tensors):
        n = t.numel()
        if t.is_sparse or n > _DELTA_CHUNK:
            chunks.append([i])
            continue
        key = (t.device, t.dtype)
        current = open_chunk.get(key)
        if current is None or current[1][0] + n > _DELTA_CHUNK:
            current = ([], [0])
            open_chunk[key] = current
            chunks.append(current[0])
        current[0].append(i)
        current[1][0] += n
    return chunks


def _subtract_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
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
