"""Sharded models: which ones gradscope measures exactly (FSDP2's ``fully_shard``), and a clear no for the rest.

Under FSDP2 every rank runs the whole model on its own part of the global batch (as under DDP), so activation
statistics and activation-gradient norms combine over ranks exactly as :mod:`gradscope.engine.distributed` does
for DDP. What changes is the parameters: each one is a ``DTensor`` whose ``to_local()`` is this rank's shard (rows
of dimension 0), and its ``.grad`` is a ``DTensor`` holding the shard of the already averaged gradient. A block's
norm over its parameters is therefore ``sqrt(sum over ranks of the local squared norms)``: each rank measures its
shards, and the ranks' squared norms are summed in the same single collective that carries the activation
statistics. Under HSDP (a ``(replicate, shard)`` mesh) each shard is held by ``replicas`` ranks, so the sum is
divided by ``replicas``. The update ratio combines its numerator and denominator the same way before dividing.

Refused, with the reason: FSDP1's ``FullyShardedDataParallel`` (parameters live in flat buffers, not per module),
``DTensor`` parameters that ``fully_shard`` does not manage (tensor parallelism: ranks then hold the same batch and
split the features, so activation statistics would not be batch shards), and any other placement or a mesh that
does not span every rank. Note that ``tensor.register_hook`` on a sharded parameter may never fire under FSDP2:
gradscope reads ``.grad`` at ``scope.step()`` and never hooks parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Set

import torch
from torch import nn

from gradscope.errors import GradscopeError


@dataclass(frozen=True)
class Sharding:
    """How the parameters of a model are sharded: each shard is held by ``replicas`` ranks (1 under FSDP2)."""

    replicas: int = 1


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed`` ``DTensor`` (checked by class name: no distributed import for plain models)."""
    return any(cls.__name__ == "DTensor" for cls in type(t).__mro__)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (no communication); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def check_sharding(model: nn.Module) -> Optional[Sharding]:
    """``None`` for an unsharded model, a :class:`Sharding` for FSDP2/HSDP; raises for what gradscope cannot measure."""
    fsdp1 = [name or type(model).__name__ for name, m in model.named_modules()
             if type(m).__name__ == "FullyShardedDataParallel"]
    if fsdp1:
        raise GradscopeError(
            f"gradscope cannot measure FSDP1 (FullyShardedDataParallel at {fsdp1[0]!r}): it keeps parameters in flat "
            f"shards that no longer belong to the blocks. Shard with FSDP2 instead (torch.distributed.fsdp."
            f"fully_shard(block) for each block, then for the model: supported), or attach to an unsharded model.")
    sharded = [(name, p) for name, p in model.named_parameters() if is_dtensor(p)]
    if not sharded:
        return None
    managed = _fsdp2_managed(model)
    replicas: Set[int] = set()
    for name, p in sharded:
        if id(p) not in managed:
            raise GradscopeError(
                f"parameter {name!r} is a DTensor that fully_shard does not manage (tensor parallel?): gradscope "
                f"measures data-parallel sharding only (FSDP2's fully_shard, HSDP), where each rank runs its own part "
                f"of the batch; under tensor parallelism ranks split features instead, and the per-block statistics "
                f"would be wrong. Attach to the model without tensor parallelism, or use fully_shard alone.")
        replicas.add(_replicas(name, p))
    if len(replicas) > 1:
        raise GradscopeError(f"parameters are sharded over meshes with different replicate sizes {sorted(replicas)}; "
                             f"gradscope needs one mesh for the whole model")
    return Sharding(replicas.pop())


def _fsdp2_managed(model: nn.Module) -> Set[int]:
    """ids of the parameters inside a module that ``fully_shard`` turned into an ``FSDPModule``."""
    ids: Set[int] = set()
    for m in model.modules():
        if any(base.__name__ == "FSDPModule" for base in type(m).__mro__):
            ids.update(id(p) for p in m.parameters())
    return ids


def _replicas(name: str, p: Any) -> int:
    """How many ranks hold the same shard of ``p``: FSDP2 ``(Shard(0),)`` -> 1, HSDP ``(Replicate(), Shard(0))`` ->
    the replicate size; anything else, or a mesh that does not span every rank, is refused."""
    import torch.distributed as dist

    mesh, placements = p.device_mesh, tuple(p.placements)
    shard_last = _is_shard0(placements[-1]) if placements else False
    replicated = all(type(pl).__name__ == "Replicate" for pl in placements[:-1])
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not (shard_last and replicated and mesh.size() == world):
        raise GradscopeError(
            f"parameter {name!r} is placed as {list(placements)} over a mesh of shape {tuple(mesh.shape)} "
            f"({world} ranks): gradscope measures FSDP2 (Shard(dim=0)) and HSDP (Replicate(), Shard(dim=0)) "
            f"on a mesh of all ranks; other placements (tensor parallel dimensions) are not supported.")
    return mesh.size() // mesh.size(len(placements) - 1)


def _is_shard0(placement: Any) -> bool:
    return type(placement).__name__ == "Shard" and getattr(placement, "dim", None) == 0


def locals_of(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """:func:`local` of each tensor."""
    return [local(t) for t in tensors]
