"""FSDP2 (``fully_shard``) with 2 CPU processes (gloo): the frame equals one process on the whole batch.

Both ranks shard every Linear and the root (FSDP2 on a 1-D mesh, and HSDP on a (replicate 2, shard 1) mesh); each
takes half of every batch. Every metric, parameter norms,
parameter-gradient norms and update ratios included, must equal the single-process value to 1e-5 (``batch_size``
excepted: it is the per-rank batch, half of the single process's), and each recorded
``scope.step()`` must issue exactly one collective. Setups gradscope cannot handle (FSDP1's flat parameters, tensor
parallelism) are refused with a message that says why; they are built for real in the same processes.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradscope
from tests import nets

WORLD = 2
STEPS = 3
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "all_to_all_single")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nets.mlp(width=15, depth=3)  # 15 and 5 output rows: uneven shards (8 + 7, 3 + 2)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(STEPS)]


class _Counter:
    """Counts torch.distributed collectives while ``active`` (patched on both modules that export them)."""

    def __init__(self) -> None:
        self.active = False
        self.calls = 0
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            for name in _COLLECTIVES:
                original = getattr(module, name, None)
                if original is not None:
                    setattr(module, name, self._wrap(original))

    def _wrap(self, original):
        def counted(*args, **kwargs):
            if self.active:
                self.calls += 1
            return original(*args, **kwargs)

        return counted


def _train(model, scope, opt, rank=0, world=1, counter=None):
    per_step = []
    for x, y in _batches():
        loss = nn.functional.cross_entropy(model(x[rank::world]), y[rank::world])
        loss.backward()
        if counter is not None:
            counter.active, counter.calls = True, 0
        scope.step(loss=loss)  # the loss travels in the same collective
        if counter is not None:
            counter.active = False
            per_step.append(counter.calls)
        opt.step()
        opt.zero_grad()
    return per_step


def _refusal(build) -> str:
    try:
        gradscope.attach(build())
    except gradscope.GradscopeError as exc:
        return str(exc)
    return "accepted"


def _fsdp1():
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(_model(), use_orig_params=False, device_id=torch.device("cpu"))


def _tensor_parallel():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    return parallelize_module(model, init_device_mesh("cpu", (WORLD,)), {"0": ColwiseParallel(),
                                                                        "2": RowwiseParallel()})


def _worker(rank: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        counter = _Counter()
        result = {}
        hsdp = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
        for name, mesh in (("fsdp", None), ("hsdp", hsdp)):
            model = _model()  # HSDP on a (2, 1) mesh: each rank holds whole shards, the replicate size is 2
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            with gradscope.attach(model, blocks=nn.Linear, optimizer=opt, out=Path(out) / name) as scope:
                result[name] = _train(model, scope, opt, rank, WORLD, counter)
            scope.frame().to_parquet(Path(out) / f"{name}-rank{rank}.parquet")
            result[f"{name}-losses"] = scope.losses()
        model = _model()  # every=2: unrecorded steps issue no collective at all
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradscope.attach(model, blocks=nn.Linear, optimizer=opt, every=2) as sparse:
            result["every2"] = _train(model, sparse, opt, rank, WORLD, counter)
        result.update(kinds=sorted({s.kind for s in scope.sites}), fsdp1=_refusal(_fsdp1),
                      tp=_refusal(_tensor_parallel))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("name", ["fsdp", "hsdp"])
def test_two_rank_fsdp2_frame_equals_single_process(fsdp_run, one_thread, name):
    single = copy.deepcopy(_model())
    opt = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    with gradscope.attach(single, blocks=nn.Linear, optimizer=opt) as scope:
        _train(single, scope, opt)
    want = scope.frame()
    assert set(want.metric) >= {"act_var", "grad_norm", "param_norm", "param_grad_norm", "update_ratio"}
    for rank in range(WORLD):
        got = pd.read_parquet(fsdp_run / f"{name}-rank{rank}.parquet")
        merged = want.merge(got, on=["step", "block", "call", "metric"], suffixes=("_single", "_fsdp"),
                            how="outer", indicator=True)
        assert (merged["_merge"] == "both").all(), rank
        assert (merged.kind_single == merged.kind_fsdp).all()  # "Linear", not FSDP2's generated "FSDPLinear"
        # batch_size is the per-rank batch by design (what BN without SyncBatchNorm would normalise over): 4 of 8
        batch = merged[merged.metric == "batch_size"]
        assert batch.value_single.tolist() == [8.0] * STEPS, rank
        assert batch.value_fsdp.tolist() == [8.0 / WORLD] * STEPS, rank
        for metric, rows in merged[merged.metric != "batch_size"].groupby("metric"):
            assert rows.value_fsdp.to_numpy() == pytest.approx(rows.value_single.to_numpy(), rel=1e-5, abs=1e-7), \
                (rank, metric)
        losses = json.loads((fsdp_run / f"rank{rank}.json").read_text())[f"{name}-losses"]
        assert [losses[str(k)] for k in range(STEPS)] == pytest.approx([scope.losses()[k] for k in range(STEPS)],
                                                                       rel=1e-6)
    # only rank 0 wrote files, and they hold the global frame
    assert gradscope.load(fsdp_run / name).equals(pd.read_parquet(fsdp_run / f"{name}-rank0.parquet"))


def test_one_collective_per_recorded_step(fsdp_run):
    """One all_gather per recorded step, after the first: that one also agrees on the length every rank pads its
    buffer to (ranks may hold different buffers: an uneven batch, an expert skipped on one rank)."""
    for rank in range(WORLD):
        result = json.loads((fsdp_run / f"rank{rank}.json").read_text())
        assert result["fsdp"] == result["hsdp"] == ([2] + [1] * (STEPS - 1)), rank
        assert result["every2"] == [2, 0, 1][:STEPS], rank
        assert result["kinds"] == ["Linear"]


def test_unsupported_sharding_is_refused_with_the_reason(fsdp_run):
    result = json.loads((fsdp_run / "rank0.json").read_text())
    assert "FullyShardedDataParallel" in result["fsdp1"] and "fully_shard" in result["fsdp1"], result["fsdp1"]
    assert "tensor parallel" in result["tp"] and "'0.weight'" in result["tp"], result["tp"]
