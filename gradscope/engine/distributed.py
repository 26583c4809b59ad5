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

All ranks must run the same blocks in the same order in a recorded step (true for DDP and FSDP2). Only rank 0 writes
files.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

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

    def reduce(self, entries: List, packed: torch.Tensor) -> List[List[float]]:
        """Global metric values for each entry, from this rank's raw ``packed`` values and every other rank's."""
        import torch.distributed as dist

        from gradscope.engine.recorder import finish_entries

        counts = torch.tensor([float(e.count) for e in entries], dtype=torch.float64, device=packed.device)
        local = torch.cat([packed.to(torch.float64), counts])
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        rows = torch.stack(gathered).tolist()  # the one transfer of this recorded step
        n_values = packed.numel()
        per_rank = [finish_entries(entries, row[:n_values]) for row in rows]
        ns = [row[n_values:] for row in rows]
        out, offset = [], 0
        for i, entry in enumerate(entries):
            width = entry.values.numel() if isinstance(entry.values, torch.Tensor) else len(entry.values)
            if entry.reduce in spec.SHARDED_LAYOUTS:  # combined from raw norms: a ratio of ratios would be wrong
                out.append(spec.combine_shards([row[offset:offset + width] for row in rows], entry.reduce,
                                               self.replicas))
            else:
                out.append(_combine(entry, [rank[i] for rank in per_rank], [n[i] for n in ns], self.world_size))
            offset += width
        return out


def _combine(entry, values: List[List[float]], n: List[float], world: int) -> List[float]:
    """Combine one entry's per-rank metric values into the global ones: each metric's rule from its spec."""
    return spec.combine(entry.group, values, n, world, entry.reduce)
