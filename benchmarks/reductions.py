"""Candidate exact zero counts of a block output, timed two ways: in a loop over one cached tensor, and just after a
block's forward (where a training step runs them), interleaved.

Why this exists: a float comparison into a reused work buffer followed by a float sum looked 1.3-1.5x faster than
``x.bool().sum()`` in loops over one cached tensor, and was 1.5x *slower* right after a block's forward, where a
training step runs it (2026-12-07, AMD EPYC, one thread, load average 1.6: 29 against 19 microseconds on the MLP's
64x256 output, 140 against 95 on a 16-px study output), so gradscope keeps the bool pass. A loop over one cached
tensor measures the arithmetic alone; after a block, the work buffer and the code are cold, as in a real step.

    python benchmarks/reductions.py   # the MLP's 64x256 output, a 16-px study output and a ResNet-56 first-stage
                                      # output at batch 64: 3000, 300 and 50 repetitions

Each row: the median extra time of a candidate over the block's forward alone (``after a block``), and its median
time in a loop over one cached output (``in a loop``), in microseconds.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

from gradscope.engine.metrics import Scratch, _sum

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)

SCRATCH = Scratch()


def bool_sum(flat: torch.Tensor) -> float:
    """What gradscope runs (``metrics.nonzero_count``): one bool pass, an integer sum."""
    return float(flat.bool().sum(dtype=torch.int32).item())


def float_compare(flat: torch.Tensor) -> float:
    """``ne`` into a reused float work buffer, then a float sum (float64 beyond 2**24 elements)."""
    return float(_sum(torch.ne(flat, 0, out=SCRATCH.get(flat.numel(), flat))).item())


def sign_dot(flat: torch.Tensor) -> float:
    """``sign`` into the work buffer, then its dot product with itself (finite inputs only)."""
    work = SCRATCH.get(flat.numel(), flat)
    torch.sign(flat, out=work)
    return float(torch.dot(work, work).item())


def count_nonzero(flat: torch.Tensor) -> float:
    return float(torch.count_nonzero(flat).item())


_LANE_WORDS = 255  # 64-bit words summed at once: each of a word's 8 byte lanes then holds at most 255, no carry


def byte_lanes(flat: torch.Tensor) -> float:
    """The bool pass, then its bytes summed eight at a time as 64-bit words in blocks of 255 words (a byte lane
    cannot carry into the next), then the lanes' bytes: an integer sum over an eighth of the elements."""
    lanes = flat.bool().view(torch.uint8)
    whole = lanes.numel() - lanes.numel() % (8 * _LANE_WORDS)
    words = lanes[:whole].view(torch.int64).view(-1, _LANE_WORDS).sum(dim=1)
    return float((words.view(torch.uint8).sum(dtype=torch.int64) + lanes[whole:].sum(dtype=torch.int64)).item())


def float_sum(flat: torch.Tensor) -> float:
    """Not a zero count: one float sum of the output, the cost of a single read pass, for scale."""
    return float(flat.sum().item())


CANDIDATES: Dict[str, Callable[[torch.Tensor], float]] = {
    "bool().sum()": bool_sum, "byte lanes": byte_lanes, "ne(out=float) + sum": float_compare,
    "sign + dot": sign_dot, "count_nonzero": count_nonzero}
#: rows printed for scale, not candidates (their value is not a zero count)
REFERENCES: Dict[str, Callable[[torch.Tensor], float]] = {"(a float sum, for scale)": float_sum}


def blocks() -> Dict[str, tuple]:
    """name -> (block, input): the MLP's block and a block of the default study's 16-px ResNet stage."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU())
    conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    return {"MLP block, 64x256": (mlp, torch.randn(64, 256)),
            "16-px conv block, 32x16x16x16": (conv, torch.randn(32, 16, 16, 16)),
            "ResNet-56 first-stage block at batch 64, 64x16x32x32": (conv, torch.randn(64, 16, 32, 32))}


def after_block(block: nn.Module, x: torch.Tensor, reps: int) -> Dict[str, float]:
    """Median extra microseconds of each candidate over the block's forward alone, interleaved in shuffled order."""
    timed = {**CANDIDATES, **REFERENCES}
    names = ["(block alone)"] + list(timed)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(reps):
            random.shuffle(names)
            for name in names:
                start = time.perf_counter()
                y = block(x).reshape(-1)
                if name in timed:
                    timed[name](y)
                times[name].append(time.perf_counter() - start)
    alone = statistics.median(times["(block alone)"])
    return {n: 1e6 * (statistics.median(times[n]) - alone) for n in timed}


def in_loop(y: torch.Tensor, reps: int) -> Dict[str, float]:
    out = {}
    for name, fn in {**CANDIDATES, **REFERENCES}.items():
        fn(y)
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn(y)
            samples.append(time.perf_counter() - start)
        out[name] = 1e6 * statistics.median(samples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3000, help="repetitions for the MLP block (a tenth for conv)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    print(f"machine: {describe()}")
    for name, (block, x) in blocks().items():
        block.eval()
        reps = args.reps if "MLP" in name else max(10, args.reps // (10 if "16-px" in name else 60))
        with torch.no_grad():
            y = block(x).reshape(-1)
        exact = {n: fn(y) for n, fn in CANDIDATES.items()}
        assert len(set(exact.values())) == 1, f"the candidates disagree: {exact}"
        situ, loop = after_block(block, x, reps), in_loop(y, reps)
        print(f"\n{name}: {y.numel()} elements, {reps} repetitions; microseconds (median)")
        print(f"  {'candidate':24s} {'after a block':>14s} {'in a loop':>10s}")
        for n in list(CANDIDATES) + list(REFERENCES):
            print(f"  {n:24s} {situ[n]:14.1f} {loop[n]:10.1f}")


if __name__ == "__main__":
    main()
