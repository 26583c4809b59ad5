"""Global statistics under ``torch.distributed`` (DDP): one collective per recorded step.

Each rank measures its own shard of the global batch. At a recorded step's flush every rank packs its buffer into
one float64 vector and ``all_gather``s it, then combines locally, so every rank holds the same global frame. Each
metric's rule is named by its spec (:mod:`gradscope.engine.spec`); the rules are:

* forward moments (``[mean, var, rms, zero_frac, nonfinite, max_abs]`` over ``n`` elements): counts and sums are
  combined exactly: ``mean = sum(n_r mean_r) / N``, ``var = sum(n_r (var_r + (mean_r - mean)^2)) / N``, zero
  fractions weighted by ``n_r``, non-finite counts summed, ``max_abs`` maximised;
* gradient norms w.r.t. block outputs and inputs: DDP averages parameter gradients over ranks, which is the gradient
  of the global loss ``L = mean_r L_r``; its derivative w.r.t. rank r's activations is ``g_r / W``, so the global
  norm is ``sqrt(sum_r |g_r|^2) / W`` (non-finite counts summed);
* parameter norms and parameter-gradient norms are read after DDP's all-reduce, so they are already global and
  equal on all ranks: rank 0's value is kept;
* under FSDP2 (``fully_shard``) parameter statistics are norms over each rank's shards (entry layouts
  :data:`gradscope.engine.spec.SHARDED_LAYOUTS`), combined as ``sqrt(sum_r |theta_r|^2 / replicas)`` from the raw
  values in the same gather (see :mod:`gradscope.engine.sharding`).

Each rank's raw values are finished with that rank's own element counts (an uneven last batch, a rank whose expert
received no token), then combined. A recorded step costs one ``all_gather``: each rank sends its buffer's size and
a fingerprint of its layout (which blocks ran, how often, with which metrics) beside its values, padded to a length
all ranks agreed on; a buffer longer than that (the first recorded step, or more blocks ran) makes every rank gather
again with a larger one. Where the layouts differ (a mixture of experts that skips an expert on one rank:
``if rows.numel() == 0: continue``), the ranks exchange their layouts (``all_gather_object``); each block's values
combine the ranks that ran it, a warning names the blocks that ran on some ranks only, a block this rank did not run
still gets its rows from the ranks that ran it, and the blocks' depths follow one order merged over the ranks.
Only rank 0 writes files.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from gradscope.engine import spec
from gradscope.errors import GradscopeError


class DistributedCombiner:
    """Combines per-rank buffers into global statistics with one ``all_gather`` per flush."""

    def __init__(self, world_size: int, rank: int, group=None, replicas: int = 1) -> None:
        self.world_size = world_size
        self.rank = rank
        self.group = group
        self.replicas = replicas  # ranks holding each parameter shard (FSDP2: 1; HSDP: the replicate size)
        self.names: List[str] = []  # the sites' names, for the warning about layouts that differ (set by attach)
        self.depth: Dict[int, int] = {}  # the step state's site depths, merged over ranks when layouts differ
        self._warned_layout = False
        self._capacity = 0  # the buffer length every rank pads to: agreed through the gathers, grown when exceeded

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @classmethod
    def create(cls, distributed: Union[bool, str], sharding: Any = None) -> Optional["DistributedCombiner"]:
        """A combiner when asked for (``True``) or when ``"auto"`` finds an initialised process group of size > 1.

        ``sharding`` (a :class:`gradscope.engine.sharding.Sharding`): the model's parameters are FSDP2 shards, which
        only a combiner can turn into global norms, so ``distributed=False`` is refused for it.
        """
        if distributed is False:
            if sharding is not None:
                raise GradscopeError("distributed=False with an FSDP2 (fully_shard) model: each rank holds only shards "
                                     "of the parameters, so their norms must be combined over ranks; leave "
                                     "distributed='auto'")
            return None
        if distributed not in (True, "auto"):
            raise GradscopeError(f"distributed={distributed!r}: use 'auto', True or False")
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        if not ready:
            if distributed is True:
                raise GradscopeError("distributed=True but torch.distributed is not initialised; call "
                                     "torch.distributed.init_process_group() first (torchrun does the set-up)")
            return None
        world = dist.get_world_size()
        replicas = 1 if sharding is None else sharding.replicas
        return cls(world, dist.get_rank(), replicas=replicas) if world > 1 else None

    def reduce(self, entries: List, packed: torch.Tensor) -> Tuple[List[Any], List[List[float]]]:
        """``(entries, values)``: global metric values for each entry, from this rank's raw ``packed`` values and
        every other rank's; where the ranks' layouts differ, the entries also hold those of blocks that ran on other
        ranks only (so every rank's frame holds every block that ran)."""
        import torch.distributed as dist

        counts = torch.tensor([float(e.count) for e in entries], dtype=torch.float64, device=packed.device)
        local = torch.cat([packed.to(torch.float64), counts])
        layout = layout_of(entries)
        head = (float(local.numel()), float(fingerprint(layout)))
        rows = self._gather(head, local)
        if max(int(r[0]) for r in rows) > self._capacity:  # a buffer longer than the agreed size: gather again
            # the same on every rank (it comes from the gather), with room for a step that records a little more
            self._capacity = 2 * max(int(r[0]) for r in rows)
            rows = self._gather(head, local)
        heads = [(r[0], r[1]) for r in rows]
        rows = [r[2:2 + int(r[0])] for r in rows]
        if all(h == heads[0] for h in heads):
            places = [_places(layout)] * self.world_size
        else:
            shared: List[Any] = [None] * self.world_size
            dist.all_gather_object(shared, (layout, dict(self.depth)), group=self.group)
            layouts = [lay for lay, _ in shared]
            places = [_places(lay) for lay in layouts]
            self._warn_layouts(entries, layouts)
            merged = merge_depths([d for _, d in shared])  # one block order for every rank's frame
            self.depth.clear()
            self.depth.update(merged)
            mine = set(layout)
            remote = list(dict.fromkeys(k for lay in layouts for k in lay if k not in mine))
            entries, layout = list(entries) + [_entry_of(k) for k in remote], list(layout) + remote
        return entries, [self._combine_entry(entry, key, rows, places) for entry, key in zip(entries, layout)]

    def _gather(self, head: Tuple[float, float], local: torch.Tensor) -> List[List[float]]:
        """Every rank's ``[size, layout fingerprint, values...]``, each padded to the agreed capacity (a gather
        needs one size on all ranks); the values of a buffer longer than the capacity are cut, and its size tells
        every rank to gather again with a larger one."""
        import torch.distributed as dist

        vector = torch.zeros(2 + self._capacity, dtype=torch.float64, device=local.device)
        vector[0], vector[1] = head
        n = min(local.numel(), self._capacity)
        vector[2:2 + n] = local[:n]
        gathered = [torch.empty_like(vector) for _ in range(self.world_size)]
        dist.all_gather(gathered, vector, group=self.group)
        return torch.stack(gathered).tolist()  # the one transfer of this recorded step

    def _combine_entry(self, entry: Any, key: Tuple[Any, ...], rows: List[List[float]],
                       places: List["Places"]) -> List[float]:
        """One entry's global values from the ranks whose buffers hold its key (each finished with its counts)."""
        from gradscope.engine.recorder import finish_entries

        raw, counts = [], []
        for row, (where, n_values) in zip(rows, places):
            if key in where:
                offset, width, index = where[key]
                raw.append(row[offset:offset + width])
                counts.append(row[n_values + index])
        if entry.reduce in spec.SHARDED_LAYOUTS:  # combined from raw norms: a ratio of ratios would be wrong
            return spec.combine_shards(raw, entry.reduce, self.replicas)
        finished = [finish_entries([entry], values, [n])[0] for values, n in zip(raw, counts)]
        return _combine(entry, finished, counts, self.world_size)

    def _name(self, site: int) -> str:
        return repr(self.names[site]) if 0 <= site < len(self.names) else "the loss or parameter metrics"

    def _warn_layouts(self, entries: List[Any], layouts: List[Any]) -> None:
        """Once per scope: which blocks ran on some ranks only in this recorded step."""
        if self._warned_layout:
            return
        self._warned_layout = True
        sites = [{k[1] for k in lay} for lay in layouts]
        partial = sorted(set().union(*sites) - set.intersection(*sites))
        where = "; ".join(f"{self._name(i)} on rank(s) {[r for r, s in enumerate(sites) if i in s]}"
                          for i in partial[:6])
        step = entries[0].step if entries else "?"
        what = f" ({where})" if where else " (the same blocks, called a different number of times or in another order)"
        warnings.warn(f"gradscope: in recorded step {step} the ranks did not run the same blocks{what}; each "
                      f"block's values combine the ranks that ran it, and the frame's depths follow one order "
                      f"merged over the ranks (warned once)", RuntimeWarning, stacklevel=4)


#: where an entry's values lie in one rank's gathered row: key -> (offset, width, index among the counts), and
#: where the counts start
Places = Tuple[Dict[Tuple[Any, ...], Tuple[int, int, int]], int]


def layout_of(entries: List[Any]) -> List[Tuple[Any, ...]]:
    """Each entry's key, in buffer order: (step, site, call, metric group, layout, width, sites of a many-site
    entry, occurrence), unique within a buffer (the occurrence counts entries that agree on everything else)."""
    seen: Dict[Tuple[Any, ...], int] = {}
    keys = []
    for e in entries:
        base = (e.step, e.site, e.call, tuple(e.group), e.reduce,
                e.values.numel() if isinstance(e.values, torch.Tensor) else len(e.values),
                tuple(e.sites) if e.sites is not None else None)
        seen[base] = seen.get(base, -1) + 1
        keys.append(base + (seen[base],))
    return keys


def fingerprint(layout: List[Tuple[Any, ...]]) -> int:
    """A layout as an integer below 2**52 (exact in float64), the same in every process (``hash()`` of a string is
    salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(layout).encode(), digest_size=8).digest(), "big") >> 12


def merge_depths(maps: List[Dict[int, int]]) -> Dict[int, int]:
    """One depth per site for every rank: sites ordered by their earliest position on any rank (ties: the order
    the blocks were picked in), numbered from 0. Each rank numbers its blocks by first call, so ranks that route
    differently disagree, and a block one rank never ran has no depth there."""
    first: Dict[int, int] = {}
    for depth in maps:
        for site, position in depth.items():
            first[site] = min(position, first.get(site, position))
    return {site: i for i, site in enumerate(sorted(first, key=lambda site: (first[site], site)))}


def _entry_of(key: Tuple[Any, ...]) -> Any:
    """A buffer entry for a block that ran on other ranks only: its key, no values of this rank (count 0)."""
    from gradscope.engine.recorder import Entry

    step, site, call, group, reduce, width, sites, _ = key
    return Entry(step, site, call, group, (0.0,) * width, 0, reduce, list(sites) if sites is not None else None)


def _places(layout: List[Tuple[Any, ...]]) -> Places:
    """Where each key's raw values and count lie in a row gathered from a rank with this layout."""
    where, offset = {}, 0
    for index, key in enumerate(layout):
        where[key] = (offset, key[5], index)
        offset += key[5]
    return where, offset


def _combine(entry, values: List[List[float]], n: List[float], world: int) -> List[float]:
    """Combine one entry's per-rank metric values into the global ones: each metric's rule from its spec."""
    return spec.combine(entry.group, values, n, world, entry.reduce)
