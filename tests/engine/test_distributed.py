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
