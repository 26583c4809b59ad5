"""Channels-last against contiguous for the default study's nets: the training step the study's worker processes run.

The default study (``gradscope profile`` with no options) trains plain/residual 20- and 56-layer BN nets on 16x16
images, batch 32, one torch thread per worker. Its CPU time is almost all convolution and BatchNorm arithmetic, so
the memory order of images and weights is the one setting that changes its cost without changing what is computed.
This times SGD training steps of each net in both layouts, taking turns step by step on the same batches (the twins
start from the same weights), and prints the median ratio channels-last / contiguous with the CPU and the load:

    python benchmarks/study_layout.py                 # plain20, resnet20, plain56, resnet56; 40 steps each
    python benchmarks/study_layout.py --steps 80 --models resnet56

The study applies the layout through ``Settings.channels_last`` (default on; ``--no-channels-last`` turns it off);
``tests/study/test_layout.py`` checks that both layouts give the same frame and losses to float32 rounding.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)


def twins(name: str) -> Tuple[nn.Module, nn.Module]:
    """The same initialised net twice: contiguous and channels-last."""
    from gradscope.models import build

    contiguous = build(name, seed=0)
    last = build(name, seed=0).to(memory_format=torch.channels_last)
    return contiguous, last


def step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One SGD training step (forward, backward, update); its wall time in seconds."""
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def compare(name: str, steps: int, warmup: int = 5, image: int = 16, batch: int = 32) -> Tuple[float, float, float]:
    """``(contiguous s/step, channels-last s/step, ratio)``: medians over ``steps`` interleaved steps."""
    nets = twins(name)
    opts = [torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) for n in nets]
    gen = torch.Generator().manual_seed(1)
    times: List[List[float]] = [[], []]
    for i in range(steps + warmup):
        x = torch.randn(batch, 3, image, image, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        order = (0, 1) if i % 2 == 0 else (1, 0)  # who goes first alternates
        for k in order:
            xk = x.contiguous(memory_format=torch.channels_last) if k == 1 else x
            t = step(nets[k], opts[k], xk, y)
            if i >= warmup:
                times[k].append(t)
    a, b = statistics.median(times[0]), statistics.median(times[1])
    return a, b, b / a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="plain20,resnet20,plain56,resnet56")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the study's workers run
    print(f"machine: {describe()}")
    for name in args.models.split(","):
        a, b, ratio = compare(name, args.steps)
        print(f"{name:10s} contiguous {1e3 * a:7.1f} ms/step   channels-last {1e3 * b:7.1f} ms/step   "
              f"ratio x{ratio:.3f}", flush=True)
    print(f"after: {describe()}")


if __name__ == "__main__":
    main()
