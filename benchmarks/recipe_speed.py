"""Iteration time of He et al.'s CIFAR recipe on this machine, with gradscope recording as the recipe does.

    python benchmarks/recipe_speed.py [--models resnet20 resnet110] [--iterations 20] [--device cuda] [--amp]

Prints seconds per iteration (median of the timed iterations after warm-up), the cost of the full recipe
(64k iterations) per run in device-hours, and of Fig. 6 + Table 6 (the recipe's nine nets, one seed), with the
device, the CPU model and the load average, so that a cost figure in the docs can be reproduced.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    from gradscope.study import recipe as R
    from gradscope.study.recipe_train import train_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet110"])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 4 * R.HE2016.batch_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    recipe = R.Recipe(name="speed", iterations=args.warmup + args.iterations, eval_every=10**9, record_every=100,
                      train_images=n - R.HE2016.batch_size)
    data = R.prepare(images, labels, images[:0], labels[:0], recipe)
    device = args.device
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    total = 0.0
    for model in args.models:
        stamps = []

        def tick(iteration: int) -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        train_run(model, recipe, data, device=device, amp=args.amp, channels_last=args.channels_last,
                  on_iteration=tick)
        per = statistics.median(b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:]))
        hours = per * R.HE2016.iterations / 3600
        total += hours * (2 if model in ("resnet20", "resnet56") else 1)  # plain twins of 20/56 cost about the same
        print(f"{model:>10}: {per * 1000:8.1f} ms/iteration (batch {R.HE2016.batch_size}); full recipe "
              f"{hours:7.2f} device-hours per run")
    print(f"the models above (with plain twins of resnet20/56): ~{total:.1f} device-hours for one seed")


if __name__ == "__main__":
    main()
