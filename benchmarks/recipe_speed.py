"""Iteration time of He et al.'s CIFAR recipe on this machine, and what the full reproduction costs from it.

    python benchmarks/recipe_speed.py --device cuda --amp --channels-last    # on a GPU: GPU-hours
    python benchmarks/recipe_speed.py --device cpu --threads 1               # on the CPU: CPU-hours
    python benchmarks/recipe_speed.py --models resnet20 resnet110 --iterations 20 --seeds 5

Each net runs the recipe's training iteration through ``train_run`` (the function ``--recipe`` uses: batch 128,
augmentation, SGD, gradscope recording every 100th iteration) on generated images; the median seconds per
iteration after ``--warmup`` iterations is its figure. One evaluation (``error_rate``, eval mode, single view) is
timed on ``--eval-images`` images and scaled to the recipe's 5k validation + 10k test images. The cost is then

    run seconds  = (init batches + iterations) x seconds per iteration
                 + evaluations x (validation + test images) x seconds per evaluated image
    study hours  = sum over the nets of run seconds x seeds / 3600

for the full recipe (64k iterations, an evaluation every 1k) and for ``he2016-short`` (4k iterations). Nets of the
recipe that were not measured get the straight line in depth (seconds = a + b x depth) through the measured ones,
marked ``~`` (a plain net does the same convolutions as the residual net of its depth, so it gets that net's
figure when one was measured). Everything is printed
with the device, the CPU model (from ``lscpu``) and the load average, so that a figure in the docs names its
conditions.
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)

from gradscope.study import recipe as R  # noqa: E402
from gradscope.study.specs import DEFAULT_SEEDS  # noqa: E402

#: CIFAR-10's training and test set sizes: the recipe validates on what it does not train on, and tests on 10k.
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


# --- the cost: pure arithmetic --------------------------------------------------------------------------------
def evaluations(recipe: R.Recipe) -> int:
    """How many times a run evaluates: after every ``eval_every``-th iteration and after the last one."""
    whole = recipe.iterations // recipe.eval_every
    return whole + (1 if recipe.iterations % recipe.eval_every else 0)


def evaluated_images(recipe: R.Recipe) -> int:
    """Images of one evaluation: the validation split (50k less ``train_images``) and the 10k test images."""
    return (CIFAR_TRAIN - recipe.train_images) + CIFAR_TEST


def run_seconds(recipe: R.Recipe, per_iteration: float, per_image: float, init_batches: int = 2) -> float:
    """Seconds of one run of ``recipe``: its training iterations (and the ``init_batches`` recorded passes at
    initialisation, costed as iterations) plus its evaluations, each over :func:`evaluated_images` images."""
    return ((init_batches + recipe.iterations) * per_iteration
            + evaluations(recipe) * evaluated_images(recipe) * per_image)


def depth_of(model: str) -> int:
    """The layer count in a net's name: ``resnet110`` -> 110, ``plain56`` -> 56."""
    found = re.search(r"(\d+)$", model)
    if not found:
        raise ValueError(f"no depth in the model name {model!r}")
    return int(found.group(1))


def fill_by_depth(models: Sequence[str], measured: Mapping[str, float]) -> Dict[str, Tuple[float, bool]]:
    """``{model: (value, was_measured)}``: measured values as they are; a net of a measured depth gets the mean
    of that depth's measured nets (``plain56`` runs ``resnet56``'s convolutions); the others the least-squares
    line ``a + b x depth`` through the measured nets (through the origin when only one depth was measured)."""
    if not measured:
        raise ValueError("nothing measured: time at least one net")
    points = [(depth_of(m), v) for m, v in measured.items()]
    same: Dict[int, List[float]] = {}
    for d, v in points:
        same.setdefault(d, []).append(v)
    depths = {d for d, _ in points}
    if len(depths) == 1:
        slope, intercept = sum(v for _, v in points) / sum(d for d, _ in points), 0.0
    else:
        mean_d = sum(d for d, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        slope = (sum((d - mean_d) * (v - mean_v) for d, v in points)
                 / sum((d - mean_d) ** 2 for d, _ in points))
        intercept = mean_v - slope * mean_d

    def estimate(model: str) -> float:
        d = depth_of(model)
        return sum(same[d]) / len(same[d]) if d in same else max(0.0, intercept + slope * d)

    return {m: (measured[m], True) if m in measured else (estimate(m), False) for m in models}


def study_hours(recipe: R.Recipe, models: Sequence[str], seeds: int, per_iteration: Mapping[str, float],
                per_image: Mapping[str, float], init_batches: int = 2) -> float:
    """Device-hours of ``seeds`` runs of every net in ``models`` under ``recipe``, one run after another on one
    device (nets missing from the measurements are filled in by :func:`fill_by_depth`)."""
    iteration = fill_by_depth(models, per_iteration)
    image = fill_by_depth(models, per_image)
    total = sum(run_seconds(recipe, iteration[m][0], image[m][0], init_batches) for m in models)
    return seeds * total / 3600


# --- the measurement ------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """One net's measured seconds per training iteration and per evaluated image, and its losses' finiteness."""

    model: str
    per_iteration: float
    per_image: float
    iterations: int
    finite: bool


def write_cifar_folder(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A CIFAR-10-format folder (``data_batch_1..5``, ``test_batch``) of generated images a net can learn, for runs
    where no data can be downloaded: class k brightens channel k % 3 in rows 9 (k // 3) .. 9 (k // 3) + 2 of noise
    (bands 9 rows apart, so a pad-4 crop keeps them apart)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n: int) -> dict:
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 100, (n, 3, 32, 32)).astype(np.uint8)
        for i, k in enumerate(labels):
            data[i, k % 3, 9 * (k // 3):9 * (k // 3) + 3, :] = 250
        return {b"data": data.reshape(n, 3072), b"labels": labels.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test), protocol=2))
    return folder


def random_data(recipe: R.Recipe, n_train: int, n_test: int, seed: int = 0) -> R.RecipeData:
    """Recipe splits of random uint8 images (the speed of an iteration does not depend on what the images show)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    return R.prepare(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], recipe)


def time_iterations(model: str, recipe: R.Recipe, data: R.RecipeData, device: str, amp: bool = False,
                    channels_last: bool = False, warmup: int = 3) -> Tuple[List[float], object]:
    """Run ``train_run`` and return the seconds of each iteration after ``warmup`` (the last one, which evaluates,
    left out) and the run. On CUDA the clock is read after a ``torch.cuda.synchronize()``."""
    from gradscope.study.recipe_train import train_run

    stamps: List[float] = []

    def tick(iteration: int) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    run = train_run(model, recipe, data, device=device, amp=amp, channels_last=channels_last, on_iteration=tick)
    steady = stamps[warmup:-1] if len(stamps) > warmup + 1 else stamps
    return [b - a for a, b in zip(steady, steady[1:])], run


def time_evaluation(net: torch.nn.Module, data: R.RecipeData, device: str, channels_last: bool,
                    images: int, repeats: int = 3) -> float:
    """Seconds per image of ``error_rate`` over the first ``images`` validation (else test) images: the median of
    ``repeats`` calls after one untimed call (which pays for cudnn's algorithm choice and the allocator)."""
    x, y = (data.val_x, data.val_y) if len(data.val_x) else (data.test_x, data.test_y)
    x, y = x[:images], y[:images]
    seconds = []
    for _ in range(1 + repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        R.error_rate(net, x, y, torch.device(device), channels_last=channels_last)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:]) / max(1, len(x))


def measure(model: str, iterations: int, device: str, amp: bool = False, channels_last: bool = False,
            warmup: int = 3, eval_images: int = 1000, batch_size: Optional[int] = None) -> Timing:
    """Time ``iterations`` recipe iterations of ``model`` (after ``warmup``) and one evaluation."""
    from gradscope.models import build

    batch = batch_size or R.HE2016.batch_size
    n_train = max(4 * batch, batch + eval_images)
    recipe = replace(R.HE2016, name="speed", iterations=warmup + iterations + 2, eval_every=10**9,
                     batch_size=batch, train_images=n_train - eval_images)
    data = random_data(recipe, n_train, 0 if eval_images else 1)
    seconds, run = time_iterations(model, recipe, data, device, amp, channels_last, warmup)
    net = build(model, seed=0).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    per_image = time_evaluation(net, data, device, channels_last, eval_images) if eval_images else 0.0
    finite = bool(len(run.losses)) and bool(run.losses["loss"].map(math.isfinite).all())
    return Timing(model, statistics.median(seconds), per_image, len(seconds), finite)


def cost_lines(timings: Sequence[Timing], seeds: int, unit: str, init_batches: int = 2) -> List[str]:
    """The printed cost of the full recipe and of ``he2016-short`` from ``timings``, per net and in all."""
    per_iteration = {t.model: t.per_iteration for t in timings}
    per_image = {t.model: t.per_image for t in timings}
    lines = []
    for recipe in (R.HE2016, R.HE2016_SHORT):
        models = list(recipe.models)
        it = fill_by_depth(models, per_iteration)
        img = fill_by_depth(models, per_image)
        lines.append(f"{recipe.name}: {recipe.iterations:,} iterations, {evaluations(recipe)} evaluations of "
                     f"{evaluated_images(recipe):,} images, per run (~: estimated from the measured nets by depth):")
        for m in models:
            hours = run_seconds(recipe, it[m][0], img[m][0], init_batches) / 3600
            lines.append(f"  {' ' if it[m][1] else '~'} {m + ':':<11}{hours:9.2f} {unit}")
        for n in sorted({1, len(DEFAULT_SEEDS), seeds}):  # one seed, gradscope's default three, --seeds
            lines.append(f"  all {len(models)} nets x {n} seed{'s' if n > 1 else ''}: "
                         f"{study_hours(recipe, models, n, per_iteration, per_image, init_batches):.1f} {unit}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="nets to time (default: on CUDA all nine of the recipe, on the CPU resnet20 resnet110)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per net (CUDA 50, CPU 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (CUDA 10, CPU 2)")
    parser.add_argument("--eval-images", type=int, default=None, help="images of the timed evaluation "
                        "(CUDA 2000, CPU 256; 0: leave evaluation out of the cost)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per net in the study's cost (1 and the default 3 are also printed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast, as --amp of --recipe")
    parser.add_argument("--channels-last", action="store_true", help="as --channels-last of --recipe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or pass --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (list(R.HE2016.models) if cuda else ["resnet20", "resnet110"])
    iterations = args.iterations or (50 if cuda else 4)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    eval_images = args.eval_images if args.eval_images is not None else (2000 if cuda else 256)
    unit = "GPU-hours" if cuda else "CPU-hours"
    print(f"machine: {describe(args.device)}")
    print(f"settings: batch {R.HE2016.batch_size}, amp {args.amp}, channels-last {args.channels_last}, "
          f"{iterations} timed iterations after {warmup}, evaluation timed on {eval_images} images")
    timings = []
    for model in models:
        t = measure(model, iterations, args.device, args.amp, args.channels_last, warmup, eval_images)
        timings.append(t)
        print(f"{model:>10}: {t.per_iteration * 1000:9.1f} ms/iteration (median of {t.iterations}), "
              f"{t.per_image * 1e6:8.1f} us/evaluated image, losses finite: {t.finite}", flush=True)
    for line in cost_lines(timings, args.seeds, unit):
        print(line)
    print(f"machine after: {describe(args.device)}")
    return 0 if all(t.finite for t in timings) else 1


if __name__ == "__main__":
    sys.exit(main())
