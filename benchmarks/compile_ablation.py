"""Where a compiled recorded step's overhead goes: gradscope every step with subsets of its default metrics.

One compiled twin without gradscope and one compiled copy per subset take turns step by step (shuffled), as in
``compile_overhead.py``; each ratio is the median over repeats of a copy's mean step time to the twin's. Dropping a
metric group removes its traced operations from the graph (``grad_in_norm``: the input taps; ``grad_norm`` and
``grad_in_norm``: every tap; the forward metrics: the forward sums).

    python benchmarks/compile_ablation.py --backend aot_eager --repeats 3
    python benchmarks/compile_ablation.py --backend inductor --variants full,no_grads,no_forward
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_overhead as CO  # noqa: E402
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)

import gradscope  # noqa: E402
from gradscope import schema as S  # noqa: E402


def variants() -> Dict[str, Tuple[str, ...]]:
    """Metric subsets by name: everything by default, then without one group each."""
    d = S.DEFAULT_METRICS
    drop = {"full": (), "no_grad_in": (S.GRAD_IN_NORM,), "no_grad_out": (S.GRAD_NORM,),
            "no_grads": (S.GRAD_IN_NORM, S.GRAD_NORM), "no_counts": (S.ACT_ZERO_FRAC, S.ACT_NONFINITE),
            "no_forward": S.FORWARD_METRICS}
    return {name: tuple(m for m in d if m not in gone) for name, gone in drop.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--variants", default="full,no_grad_in,no_grads,no_forward", help=", ".join(variants()))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    chosen = {name: variants()[name] for name in args.variants.split(",")}
    model, batch, loss_fn, blocks = CO.make_model(args.model)
    torch._dynamo.reset()
    runs, scopes, opts = CO.compiled_copies(
        model, args.backend, ("baseline",) + tuple(chosen), lambda name, twin: None if name == "baseline" else
        gradscope.attach(twin, blocks=blocks, metrics=chosen[name]))
    one_step = CO.stepper(runs, scopes, opts, loss_fn, batch)
    for name in runs:
        one_step(name)
        one_step(name)
    times = CO.interleaved(one_step, list(runs), args.repeats, args.steps)
    for scope in scopes.values():
        scope.detach()
    base = times["baseline"]
    print(f"machine: {describe()}")
    print(f"{args.model}, {args.backend}: twin {1e3 * statistics.median(base):.1f} ms/step, {args.repeats} repeats x "
          f"{args.steps} steps")
    for name in chosen:
        print(f"  {name:12s} x{statistics.median([t / b for t, b in zip(times[name], base)]):.3f}")


if __name__ == "__main__":
    main()
