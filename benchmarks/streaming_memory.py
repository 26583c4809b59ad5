"""Memory while streaming records to disk: RSS over many recorded steps of a 20-block MLP.

``attach(model, out=DIR)`` writes a Parquet part every ``flush_every`` recorded steps; rows already in a part leave
memory, so RSS should stay flat however long the run. This script trains a 20-block MLP (width 64, batch 32, every
step recorded, all default metrics), prints RSS every ``--report`` steps, and fits the slope in MB per 1000 steps over
the second half of the run (after allocator warm-up), then RSS after ``scope.frame()`` reads everything back.

    python benchmarks/streaming_memory.py            # 20,000 steps
    python benchmarks/streaming_memory.py --quick    # 3,000 steps
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradscope  # noqa: E402


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; ru_maxrss, the peak, elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def slope_per_1000(points: List[Tuple[int, float]]) -> float:
    """Least-squares slope of (step, MB), in MB per 1000 steps."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(s for s, _ in points) / n
    my = sum(m for _, m in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    return 1000 * sum((s - mx) * (m - my) for s, m in points) / sxx


def mlp(blocks: int = 20, width: int = 64) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def run(steps: int, report: int, flush_every: int = 10) -> Tuple[List[Tuple[int, float]], float, int]:
    """Train and record; returns the RSS points, RSS after ``frame()``, and the rows that frame holds."""
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(32, 64)
    points: List[Tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as out:
        with gradscope.attach(model, out=out, flush_every=flush_every) as scope:
            for step in range(1, steps + 1):
                model(x).square().mean().backward()
                scope.step()
                model.zero_grad(set_to_none=True)
                if step % report == 0:
                    points.append((step, rss_mb()))
                    print(f"step {step:6d}: RSS {points[-1][1]:7.1f} MB", flush=True)
        rows = len(scope.frame())
        after = rss_mb()
    return points, after, rows


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3,000 steps instead of 20,000")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (3000 if args.quick else 20000)
    report = max(steps // 20, 1)
    points, after, rows = run(steps, report)
    tail = points[len(points) // 2:]
    print(f"20-block MLP, {steps} recorded steps streamed to disk: RSS {points[0][1]:.1f} -> {points[-1][1]:.1f} MB, "
          f"slope {slope_per_1000(tail):+.2f} MB per 1000 steps (second half); {rows} rows; "
          f"RSS after frame() {after:.1f} MB")


if __name__ == "__main__":
    main()
