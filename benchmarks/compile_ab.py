"""Same-process A/B of the traced (compiled) hooks: this checkout's against an older ``gradscope/engine/traced.py``.

Three compiled copies of one model take turns step by step (shuffled, as in ``compile_overhead.py``): an
uninstrumented twin, gradscope with the older file's traced hooks (``note_pre``, ``note_post``, ``note_sub``,
``Tap``; no shared input taps), and gradscope as checked out. The older functions are swapped in only while the
"before" copy is traced; the timed steps then skip Dynamo's guard evaluation (each copy has one cache entry on a code
object of its own), so each copy keeps the graph it was traced with. Two separate runs of ``compile_overhead.py`` on
a shared machine differ by several percent; an interleaved pair in one process shares the noise.

    git show 522410e:gradscope/engine/traced.py > /tmp/traced_before.py
    python benchmarks/compile_ab.py --before /tmp/traced_before.py --backend aot_eager --repeats 8

The older file must write the same buffer layout (rows of ``SiteBuffers``) as this checkout's ``drain`` reads.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_overhead as CO  # noqa: E402
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)

import gradscope  # noqa: E402
from gradscope.engine import traced as T  # noqa: E402

SWAPPED = ("note_pre", "note_post", "note_sub", "Tap")
CONFIGS = ("baseline", "before", "after")


def load_before(path: str):
    """The older traced module, importable by name (Dynamo imports the modules of the functions it traces)."""
    spec = importlib.util.spec_from_file_location("gradscope_traced_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="path of an older gradscope/engine/traced.py")
    parser.add_argument("--model", default="resnet20", help="resnet20, encoder (compile_overhead.py's models)")
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    old = load_before(args.before)
    new = {name: getattr(T, name) for name in SWAPPED}
    model, batch, loss_fn, blocks = CO.make_model(args.model)
    torch._dynamo.reset()
    counters.clear()

    def attach(config: str, twin: torch.nn.Module):
        if config == "baseline":
            return None
        scope = gradscope.attach(twin, blocks=blocks)
        if config == "before":  # the older hooks had no shared input taps
            scope._probe.shared_in = [None] * len(scope.sites)
        return scope

    runs, scopes, opts = CO.compiled_copies(model, args.backend, CONFIGS, attach)
    one_step = CO.stepper(runs, scopes, opts, loss_fn, batch)

    try:
        for config in CONFIGS:  # traced here, each with its own hooks
            for name in SWAPPED:
                setattr(T, name, getattr(old, name) if config == "before" else new[name])
            one_step(config)
            one_step(config)
    finally:
        for name in SWAPPED:
            setattr(T, name, new[name])
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
        times = CO.interleaved(one_step, CONFIGS, args.repeats, args.steps)
    for scope in scopes.values():
        scope.detach()
    base = times["baseline"]
    print(f"machine: {describe()}")
    print(f"{args.model}, {args.backend}: twin {1e3 * statistics.median(base):.1f} ms/step, {args.repeats} repeats x "
          f"{args.steps} steps; graphs {counters['stats']['unique_graphs']}, graph breaks "
          f"{sum(counters['graph_break'].values())}")
    pairs = (("before", times["before"], base), ("after", times["after"], base),
             ("after/before", times["after"], times["before"]))
    for label, num, den in pairs:
        r = [a / b for a, b in zip(num, den)]
        print(f"  {label:12s} median x{statistics.median(r):.3f} (min x{min(r):.3f}, max x{max(r):.3f})")


if __name__ == "__main__":
    main()
