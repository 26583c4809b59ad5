"""DDP with 2 CPU processes (gloo): the frame equals a single-process run on the concatenated batch.

Except ``batch_size``, which is the per-rank batch by design (what each rank's BatchNorm normalises over).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
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
STEPS = 2


def _models():
    torch.manual_seed(0)
    conv = nn.Sequential(nets.ConvBNReLU(3, 8), nets.ConvBNReLU(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))
    for block in conv[:2]:  # DDP's BatchNorm normalises per rank: plain conv blocks keep the comparison exact
        block.bn = nn.Identity()
    return {"mlp": (nets.mlp(), (12,)), "conv": (conv, (3, 8, 8))}


def _batches(shape):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn((8,) + shape, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(STEPS)]


def _train(model, batches, scope, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        nn.functional.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
        scope.step()
        opt.step()
        opt.zero_grad()


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for name, (model, shape) in _models().items():
            ddp = nn.parallel.DistributedDataParallel(model)
            with gradscope.attach(ddp, out=Path(out) / name) as scope:
                _train(ddp, _batches(shape), scope, rank, WORLD)
            scope.frame().to_parquet(Path(out) / f"{name}-rank{rank}.parquet")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_frame_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for name, (model, shape) in _models().items():
        single = copy.deepcopy(model)
        with gradscope.attach(single) as scope:
            _train(single, _batches(shape), scope)
        want = scope.frame()
        for rank in range(WORLD):
            got = pd.read_parquet(tmp_path / f"{name}-rank{rank}.parquet")
            merged = want.merge(got, on=["step", "block", "call", "metric"], suffixes=("_single", "_ddp"),
                                how="outer", indicator=True)
            assert (merged["_merge"] == "both").all(), (name, rank)
            assert set(merged.metric) >= {"act_var", "act_mean", "grad_norm", "grad_in_norm", "param_grad_norm",
                                          "batch_size"}
            # batch_size is the per-rank batch (what BN without SyncBatchNorm normalises over): 8 // 2 = 4 on
            # each rank, the whole 8 in one process; every other row describes the global step and is equal
            batch = merged[merged.metric == "batch_size"]
            assert batch.value_single.tolist() == [8.0] * STEPS, (name, rank)
            assert batch.value_ddp.tolist() == [8.0 / WORLD] * STEPS, (name, rank)
            for metric, rows in merged[merged.metric != "batch_size"].groupby("metric"):
                assert rows.value_ddp.to_numpy() == pytest.approx(rows.value_single.to_numpy(), rel=1e-5, abs=1e-7), \
                    (name, rank, metric)
        # only rank 0 wrote files, and they hold the global frame
        assert gradscope.load(tmp_path / name).equals(pd.read_parquet(tmp_path / f"{name}-rank0.parquet"))


def test_cli_under_torchrun(tmp_path):
    fixture = Path(__file__).parents[1] / "fixtures" / "user_models.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "gradscope", "profile", "--model", f"{fixture}:tiny", "--input-shape", "3,8,8", "--steps", "2",
           "--train-size", "64", "--batch-size", "16", "--init-batches", "1", "--device", "cpu", "--json",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"report"') == 1  # one JSON summary: rank 0 alone prints
    assert (tmp_path / "records.parquet").exists()
    # the same folder again: rank 0 refuses it, and so does rank 1 with the same message (it used to go on into the
    # first collective and end there with a connection error from gloo once rank 0 had exited, or a timeout)
    again = [c if c != "--master_port=29517" else "--master_port=29519" for c in cmd]
    proc = subprocess.run(again, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("already holds the records of a study") == 2, proc.stderr[-3000:]


# --- ranks whose buffers differ: an uneven batch, an expert that runs on one rank only -----------------------------
class _Experts(nn.Module):
    """Two experts routed by a given assignment; an expert with no row is skipped, as MoE code usually does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.e0, self.e1, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        out = torch.zeros_like(h)
        for i, expert in enumerate((self.e0, self.e1)):
            rows = (route == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            out = out.index_add(0, rows, expert(h[rows]))
        return self.head(out)


_SIZES = (5, 3)  # rank 0: five rows, all to e0; rank 1: three rows, all to e1


def _expert_data():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 6, generator=g) + 0.5, torch.randint(0, 3, (8,), generator=g)
    route = torch.tensor([0] * _SIZES[0] + [1] * _SIZES[1])
    return x.split(_SIZES), y.split(_SIZES), route.split(_SIZES)


#: per recorded step, whether the experts are routed as _expert_data says (rank 0 -> e0, rank 1 -> e1) or all to e0
#: on both ranks (the same layout: the single-gather path, with the capacity the first step agreed)
_ROUTED = (True, False, True)


def _routes(step: int):
    _, _, routes = _expert_data()
    return routes if _ROUTED[step] else tuple(torch.zeros_like(r) for r in routes)


def _uneven_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        ddp = nn.parallel.DistributedDataParallel(_Experts(), find_unused_parameters=True)
        xs, ys, _ = _expert_data()
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with gradscope.attach(ddp, blocks=["inp", "e0", "e1", "head"], out=Path(out) / "run") as scope:
                for step in range(len(_ROUTED)):
                    nn.functional.cross_entropy(ddp(xs[rank], _routes(step)[rank]), ys[rank]).backward()
                    scope.step()
                    ddp.zero_grad()
        scope.frame().to_parquet(Path(out) / f"rank{rank}.parquet")
        Path(out, f"warnings{rank}.txt").write_text("\n".join(str(w.message) for w in caught))
    finally:
        dist.destroy_process_group()


def _expert_reference(step: int) -> dict:
    """float64, one process: each block's output moments over the rows it saw on any rank, and its gradient norm
    under DDP's global loss (the mean of the ranks' losses)."""
    model = _Experts().double()
    xs, ys, _ = _expert_data()
    outputs: dict = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs.setdefault(name, []).append(output)
        return hook

    for name in ("inp", "e0", "e1", "head"):
        getattr(model, name).register_forward_hook(keep(name))
    loss = sum(nn.functional.cross_entropy(model(x.double(), r), y) for x, y, r in zip(xs, ys, _routes(step))) / WORLD
    loss.backward()
    ref = {}
    for name, outs in outputs.items():
        values = torch.cat([o.detach().reshape(-1) for o in outs])
        ref[(name, "act_mean")] = values.mean().item()
        ref[(name, "act_var")] = values.var(unbiased=False).item()
        ref[(name, "grad_norm")] = sum(o.grad.pow(2).sum() for o in outs).sqrt().item()
    return ref


def test_uneven_batches_and_an_expert_on_one_rank_combine_to_the_global_values(tmp_path):
    """Each rank's sums were finished with this rank's element count (rank 0's act_mean -0.106 and rank 1's -0.177
    for a true -0.128), an expert that ran on one rank only mixed its statistics with the other rank's expert under
    one name, and buffers of different lengths aborted gloo. Every rank now holds the global values of every block
    that ran anywhere, the same frame with one depth order, whether the ranks' layouts differ (steps 0 and 2) or
    not (step 1), and a warning names the blocks that ran on some ranks only."""
    mp.spawn(_uneven_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    frames = [pd.read_parquet(tmp_path / f"rank{rank}.parquet") for rank in range(WORLD)]
    pd.testing.assert_frame_equal(frames[0], frames[1])  # every rank holds the same global frame
    frame = frames[0]
    assert not frame.duplicated(["step", "block", "metric", "call"]).any()
    depths = frame.groupby("block")["depth"].unique().to_dict()
    assert {b: list(d) for b, d in depths.items()} == {"inp": [0], "e0": [1], "e1": [2], "head": [3]}
    for step in range(len(_ROUTED)):
        at = frame[frame["step"] == step]
        got = {(b, m): v for b, m, v in zip(at["block"], at["metric"], at["value"])}
        for key, want in _expert_reference(step).items():
            assert key in got, (step, key)
            assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-9), (step, key, got[key], want)
        assert (step == 1) == (("e1", "act_mean") not in got)  # step 1 routes nothing to e1, on either rank
    pd.testing.assert_frame_equal(gradscope.load(tmp_path / "run"), frame)  # what rank 0 wrote
    for rank in range(WORLD):
        said = (tmp_path / f"warnings{rank}.txt").read_text()
        assert "the ranks did not run the same blocks ('e0' on rank(s) [0]; 'e1' on rank(s) [1])" in said, said
