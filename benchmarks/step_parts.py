"""Where a recorded step's time goes: forward, backward, ``scope.step()`` and ``optimizer.step()`` timed apart.

Interleaved twins as in ``overhead.py`` (same models, batch, rotation of twins between repeats), each step cut into
four parts. Besides the configurations of ``overhead.py`` it times two gradscope twins whose reductions are replaced
by constants, so the cost of the arithmetic and the cost of the hook machinery around it can be told apart:

* ``stub-forward``: every default metric, but the block-output reductions (sum, sum of squares, zero count) return
  constants;
* ``stub-both``: the block-output gradient norms return a constant too.

The constants are wrong values, so these twins exist only here, to measure. A row is the median over every timed
step of each part, in milliseconds.

    python benchmarks/step_parts.py                       # the 50-block MLP, 6 repeats of 20 steps
    python benchmarks/step_parts.py --model resnet56 --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

import gradscope
from gradscope.engine import gradwatch, probes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)

HERE = Path(__file__).resolve().parent
STUB = {"forward": False, "grad": False}
_real_sums, _real_norm = probes.activation_sums, gradwatch.squared_norm


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sums(y: torch.Tensor, **kwargs):
    if STUB["forward"]:
        width = 3 + sum(len(k) for k in kwargs.get("extras", ()))
        return (0.0, 0.0, float(y.numel())) + (0.0,) * (width - 3)
    return _real_sums(y, **kwargs)


def _norm(g: torch.Tensor) -> torch.Tensor:
    if STUB["grad"]:
        return torch.ones(1, dtype=torch.float32)
    return _real_norm(g)


def install_stubs() -> None:
    """Route the hooks' reductions through the switchable stubs above (the real ones while both flags are off)."""
    probes.activation_sums, gradwatch.squared_norm = _sums, _norm


def instrument(overhead, config: str, model: nn.Module, opt):
    if config.startswith("stub-"):
        return gradscope.attach(model, optimizer=opt)
    return overhead.instrument(config, model, opt)


def measure(overhead, name: str, configs: List[str], repeats: int, steps: int) -> Dict[str, List[List[float]]]:
    """``config -> [forward, backward, scope.step, optimizer.step]`` times (s) of every timed step."""
    twins = overhead.make_twins(name, len(configs))
    x, y = overhead.batch_for(name)
    loss_fn = nn.CrossEntropyLoss()
    parts: Dict[str, List[List[float]]] = {c: [[], [], [], []] for c in configs}

    def one(config: str, model: nn.Module, opt, scope, keep: bool) -> None:
        STUB["forward"] = config in ("stub-forward", "stub-both")
        STUB["grad"] = config == "stub-both"
        gc.collect()
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        scope.step()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        STUB["forward"] = STUB["grad"] = False
        if keep:
            for k, v in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[config][k].append(v)

    for r in range(repeats):
        driven = {c: twins[(i + r) % len(twins)] for i, c in enumerate(configs)}
        scopes = {c: instrument(overhead, c, *driven[c]) for c in configs}
        for c in configs:
            one(c, *driven[c], scopes[c], keep=False)
        for _ in range(steps):
            order = configs[:]
            random.shuffle(order)
            for c in order:
                one(c, *driven[c], scopes[c], keep=True)
        for scope in scopes.values():
            scope.detach()
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp50-bn")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    overhead = _load("overhead")
    install_stubs()
    configs = ["baseline", "floor", "every1", "every1-noupd", "stub-forward", "stub-both"]
    parts = measure(overhead, args.model, configs, args.repeats, overhead.steps_per_repeat(args.model))
    print(f"{args.model}: median ms per step part, interleaved twins; machine: {describe()}")
    print(f"{'config':14s} {'forward':>8s} {'backward':>8s} {'scope':>8s} {'optim':>8s} {'sum':>8s}")
    for c in configs:
        med = [1e3 * statistics.median(v) for v in parts[c]]
        print(f"{c:14s} " + " ".join(f"{m:8.2f}" for m in med) + f" {sum(med):8.2f}")


if __name__ == "__main__":
    main()
