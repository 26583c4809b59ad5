"""The alert rules on series whose answer is known: how often healthy noise fires, whether real faults still fire,
and what detection costs per recorded step (the numbers of docs/alerts.md).

* healthy i.i.d. series, several seeds x ``--steps`` recorded steps each: exponential batch losses (a classifier at
  batch 1), log-normal losses (sd 0.5, 0.3), log-normal gradient norms (sd 0.3, 0.5, 0.7), and a batch-8 mixture
  (one batch in eight holds a hard example that lifts its loss 2-5x) over 1.5x as many steps; every alert there is
  a false one;
* faults: four isolated 30x losses and 10x gradient norms in a calm series (each must fire), and a gradient norm
  that grows 1.3-1.5x a step under log-noise (steps until the first alert, over 20 seeds);
* cost: ``Detector.observe`` fed the rows of 300 recorded steps of 50 blocks (best of 5), and the optimizer hooks'
  reading of each block's learning rate in a real run of 50 and 400 blocks.

``--before REV`` runs the same on the detector of another git revision (its ``gradscope/engine/alerts.py``, loaded
from ``git show``), for the before/after columns.

    python benchmarks/alert_rules.py
    python benchmarks/alert_rules.py --before de3e8e2
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, load average)

from gradscope.schema import GRAD_NORM, UPDATE_RATIO  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def detector_module(rev: str = "") -> Any:
    """``gradscope.engine.alerts`` of this checkout, or of git revision ``rev`` (one file, loaded apart)."""
    if not rev:
        from gradscope.engine import alerts
        return alerts
    text = subprocess.run(["git", "show", f"{rev}:gradscope/engine/alerts.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "alerts_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("alerts_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def loss_alerts(det: Any, losses: List[float]) -> List[int]:
    return [a.step for s, v in enumerate(losses) for a in det.observe([], [(s, v)])]


def grad_alerts(det: Any, norms: List[float]) -> List[int]:
    return [a.step for s, v in enumerate(norms) for a in det.observe([(s, "b", 0, 0, GRAD_NORM, v)])]


def heavy(rng: random.Random) -> float:
    return 0.5 * math.exp(rng.gauss(0, 0.08)) + (rng.uniform(0.6, 2.0) if rng.random() < 0.125 else 0.0)


def false_alarms(module: Any, steps: int, seeds: int) -> Dict[str, int]:
    """Alerts on healthy series, summed over seeds."""
    new = module.Detector
    losses: Dict[str, Callable[[random.Random], float]] = {
        "loss: exponential (batch 1)": lambda r: r.expovariate(math.log(2)),
        "loss: log-normal sd 0.5": lambda r: math.exp(r.gauss(0, 0.5)),
        "loss: log-normal sd 0.3": lambda r: math.exp(r.gauss(0, 0.3)),
    }
    out = {}
    for name, draw in losses.items():
        out[name] = sum(len(loss_alerts(new(), [draw(r) for r in [random.Random(s)] for _ in range(steps)]))
                        for s in range(seeds))
    for sd in (0.3, 0.5, 0.7):
        out[f"grad_norm: log-normal sd {sd}"] = sum(
            len(grad_alerts(new(), [math.exp(r.gauss(0, sd)) for r in [random.Random(s)] for _ in range(steps)]))
            for s in range(seeds))
    long = steps * 3 // 2
    out[f"loss: batch-8 mixture ({long} steps)"] = sum(
        len(loss_alerts(new(), [heavy(r) for r in [random.Random(s)] for _ in range(long)])) for s in range(seeds))
    return out


def faults(module: Any) -> Dict[str, Any]:
    """Steps of the alerts on four isolated faults, and how many steps a growing gradient takes to fire."""
    rng = random.Random(0)
    losses = [1.0 + 0.05 * rng.gauss(0, 1) for _ in range(400)]
    norms = [math.exp(rng.gauss(0, 0.1)) for _ in range(400)]
    for s in (100, 150, 200, 250):
        losses[s], norms[s] = 30.0, 10.0
    out: Dict[str, Any] = {"four 30x losses at 100, 150, 200, 250": loss_alerts(module.Detector(), losses),
                           "four 10x gradient norms there": grad_alerts(module.Detector(), norms)}
    for sigma, rate in ((0.1, 1.3), (0.15, 1.3), (0.2, 1.3), (0.1, 1.5)):
        delays = []
        for seed in range(20):
            r = random.Random(seed)
            series = [math.exp(r.gauss(0, sigma)) * rate ** max(0, s - 60) for s in range(85)]
            fired = [s for s in grad_alerts(module.Detector(), series) if s >= 60]
            delays.append(fired[0] - 60 if fired else None)
        caught = [d for d in delays if d is not None]
        out[f"growth x{rate}/step, log-noise sd {sigma}"] = (
            f"caught in {len(caught)}/20 seeds, after {min(caught, default='-')}-{max(caught, default='-')} steps")
    return out


def cost(module: Any, repeats: int = 5) -> float:
    """Microseconds per recorded step of 50 blocks (gradient norms and update ratios) and a loss: best of ``repeats``."""
    rng = random.Random(0)
    rows = [[(s, f"b{i}", i, 0, GRAD_NORM, math.exp(rng.gauss(0, 0.1))) for i in range(50)]
            + [(s, f"b{i}", i, 0, UPDATE_RATIO, 1e-3) for i in range(50)] for s in range(300)]
    losses = [1.0 + rng.gauss(0, 0.01) for _ in range(300)]
    best = math.inf
    for _ in range(repeats):
        det = module.Detector()
        start = time.perf_counter()
        for s in range(300):
            det.observe(rows[s], [(s, losses[s])])
        best = min(best, (time.perf_counter() - start) / 300)
    return best * 1e6


def told_cost(blocks: int, steps: int = 100) -> float:
    """Microseconds per recorded step that the optimizer hooks spend noting what each block's step was told (its
    learning rate, for update_band): a model of ``blocks`` Linear+LayerNorm blocks (4 parameter tensors each)
    trained by AdamW, every step recorded."""
    import torch
    from torch import nn

    import gradscope
    from gradscope.engine import optwatch

    spent = {"s": 0.0, "n": 0}
    real = optwatch.OptimizerWatch._note_told

    def timed(self: Any, *args: Any) -> None:
        start = time.perf_counter()
        real(self, *args)
        spent["s"] += time.perf_counter() - start
        spent["n"] += 1

    optwatch.OptimizerWatch._note_told = timed
    try:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(blocks)])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(4, 8)
        with gradscope.attach(model, blocks=[str(i) for i in range(blocks)], optimizer=opt) as scope:
            for _ in range(steps):
                loss = model(x).square().mean()
                loss.backward()
                scope.step(loss=loss)
                opt.step()
                opt.zero_grad()
    finally:
        optwatch.OptimizerWatch._note_told = real
    return spent["s"] / max(spent["n"], 1) * 1e6


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="", help="also run the detector of this git revision")
    parser.add_argument("--steps", type=int, default=2000, help="recorded steps of each healthy series")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"alert rules; machine: {describe()}")
    versions = {"this version": detector_module()}
    if args.before:
        versions[args.before] = detector_module(args.before)
    for name, module in versions.items():
        print(f"\n== {name}")
        print(f"alerts on healthy series ({args.seeds} seeds x {args.steps} steps; every one is false):")
        for series, count in false_alarms(module, args.steps, args.seeds).items():
            print(f"  {series:40s} {count}")
        print("faults:")
        for fault, answer in faults(module).items():
            print(f"  {fault:40s} {answer}")
        print(f"detection: {cost(module):.0f} us per recorded step of 50 blocks (best of 5 runs of 300 steps)")
    print("\nwhat each block's optimizer step was told (this version; read at recorded steps only):")
    for blocks in (50, 400):
        print(f"  {blocks} blocks ({4 * blocks} parameter tensors): {told_cost(blocks):.0f} us per recorded step")


if __name__ == "__main__":
    main()
