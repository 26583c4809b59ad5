"""Overhead of gradscope under ``torch.compile`` (attach, then compile) against an uninstrumented compiled twin.

For each model this builds three copies with identical weights, attaches gradscope to two of them (every step;
one step in ten) and compiles all three with the same backend, then times full training steps (forward, backward,
``scope.step()``, ``optimizer.step()``) with the copies taking turns step by step in a shuffled order, so noise on a
shared machine hits them alike. It prints the median ratio to the twin's step time, and for each copy the number
of graph breaks and of graphs Dynamo compiled (a recompile per step would show here) and whether Dynamo hit its
recompile limit.

    python benchmarks/compile_overhead.py            # ResNet-20 and the transformer encoder, inductor and aot_eager,
                                                     # plus HF GPT-2 / Llama-style tiny configs if transformers is installed
    python benchmarks/compile_overhead.py --quick    # the transformer encoder (inductor) and ResNet-20 (aot_eager): < 3 min

Models: ResNet-20 (batch 32, CIFAR-shaped), a 6-layer ``nn.TransformerEncoder`` LM of width 128 (batch 16 x 64
tokens), and, with ``transformers``, GPT-2 (6 x 256) and Llama (4 x 256) built from configs (no download).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import gradscope
from gradscope.models import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)
from overhead import judge, repeat_interval  # noqa: E402  (the eager benchmark's interval and target verdict)

#: issue 23's compiled targets (attach then compile; inductor and aot_eager), for these models
TARGETS = {"every1": 1.10, "every10": 1.02}
TARGET_MODELS = ("resnet20", "encoder")

Batch = Tuple[torch.Tensor, torch.Tensor]
CONFIGS = ("baseline", "every1", "every10")


class TokenLM(nn.Module):
    """Embedding, a 6-layer TransformerEncoder (width 128), a linear head: a small causal-free LM."""

    def __init__(self, vocab: int = 256, width: int = 128, layers: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def _hf(kind: str) -> Optional[nn.Module]:
    try:
        import transformers
    except ImportError:
        return None
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=4, n_positions=128, vocab_size=512)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config)


def make_model(name: str) -> Tuple[nn.Module, Batch, Callable[[nn.Module, Batch], torch.Tensor], object]:
    """(model, batch, loss function, block selector) of a benchmark model."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "resnet20":
        batch = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
        return build("resnet20", seed=0), batch, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), "auto"
    if name == "encoder":
        tokens = torch.randint(0, 256, (16, 64), generator=g)
        loss = lambda m, b: nn.functional.cross_entropy(m(b[0]).reshape(-1, 256), b[1].reshape(-1))  # noqa: E731
        return TokenLM(), (tokens, tokens), loss, r"encoder\.layers\.\d+"
    model = _hf(name)
    if model is None:
        raise SystemExit(f"{name} needs transformers (pip install transformers)")
    tokens = torch.randint(0, 512, (8, 128), generator=g)
    return model, (tokens, tokens), lambda m, b: m(input_ids=b[0], labels=b[1]).loss, "auto"


class LimitWatch(logging.Handler):
    """Notes Dynamo's 'hit config.recompile_limit' warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.hits += 1


def distinct(model: nn.Module, tag: str) -> nn.Module:
    """``model`` behind a wrapper whose ``forward`` is a code object of its own.

    Dynamo caches compiled code per code object and, by default, does not guard on module hooks
    (``torch._dynamo.config.skip_nnmodule_hook_guards``): twins of one class compiled in one process would share the
    first twin's graph, hooks or not. A wrapper per configuration keeps their caches apart, as separate processes
    would."""
    namespace: Dict[str, object] = {}
    exec(f"def forward(self, *args, **kwargs):  # {tag}\n    return self.inner(*args, **kwargs)\n", namespace)
    wrapper = type(f"Twin_{tag}", (nn.Module,), {"forward": namespace["forward"]})()
    wrapper.inner = model
    return wrapper


def _dynamo_counts() -> Tuple[int, int]:
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def compiled_copies(model: nn.Module, backend: str, names: Sequence[str],
                    attach: Callable[[str, nn.Module], Any]) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """``(runs, scopes, opts)``: per name a compiled copy of ``model`` (its own ``forward``, see :func:`distinct`),
    the scope ``attach(name, copy)`` returned (None: an uninstrumented twin, left out of ``scopes``) and an SGD
    optimizer. Attach runs before compiling, as gradscope asks."""
    runs, scopes, opts = {}, {}, {}
    for name in names:
        twin = copy.deepcopy(model)
        scope = attach(name, twin)
        if scope is not None:
            scopes[name] = scope
        runs[name] = torch.compile(distinct(twin, name), backend=backend)
        opts[name] = torch.optim.SGD(twin.parameters(), lr=1e-3)
    return runs, scopes, opts


def stepper(runs: Dict[str, Any], scopes: Dict[str, Any], opts: Dict[str, Any], loss_fn: Callable, batch: Any
            ) -> Callable[[str], float]:
    """``one_step(name)``: one timed training step of that copy (forward, backward, ``scope.step()``, update)."""
    def one_step(name: str) -> float:
        start = time.perf_counter()
        loss_fn(runs[name], batch).backward()
        if name in scopes:
            scopes[name].step()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return one_step


def interleaved(one_step: Callable[[str], float], names: Sequence[str], repeats: int, steps: int
                ) -> Dict[str, List[float]]:
    """Per name, the mean step time of each repeat; the names take turns step by step in a shuffled order."""
    times: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(repeats):
        total = {n: 0.0 for n in names}
        for _ in range(steps):
            order = list(names)
            random.shuffle(order)
            for name in order:
                total[name] += one_step(name)
        for name in names:
            times[name].append(total[name] / steps)
    return times


def time_model(name: str, backend: str, repeats: int, steps: int) -> Dict[str, Dict[str, float]]:
    """Per config: median ratio, min, max, step_ms, graph breaks and graphs compiled, recompile-limit hits."""
    model, batch, loss_fn, blocks = make_model(name)
    torch._dynamo.reset()
    counters.clear()
    watch = LimitWatch()
    logging.getLogger("torch._dynamo").addHandler(watch)
    runs, scopes, opts = compiled_copies(
        model, backend, CONFIGS, lambda config, twin: None if config == "baseline" else
        gradscope.attach(twin, blocks=blocks, every=1 if config == "every1" else 10))
    counts = {config: [0, 0, 0] for config in CONFIGS}
    step = stepper(runs, scopes, opts, loss_fn, batch)

    def one_step(config: str) -> float:
        before = _dynamo_counts()
        elapsed = step(config)
        after = _dynamo_counts()
        counts[config][0] += after[0] - before[0]
        counts[config][1] += after[1] - before[1]
        return elapsed

    for config in CONFIGS:  # warm-up: compiles, and every10 sees its unrecorded variant too
        for _ in range(2):
            one_step(config)
    times = interleaved(one_step, CONFIGS, repeats, steps)
    for scope in scopes.values():
        scope.detach()
    logging.getLogger("torch._dynamo").removeHandler(watch)
    base = times["baseline"]
    out = {}
    for config in CONFIGS:
        r = [v / b for v, b in zip(times[config], base)]
        out[config] = {"median": statistics.median(r), "min": min(r), "max": max(r),
                       "step_ms": 1e3 * statistics.median(times[config]), "graph_breaks": counts[config][0],
                       "graphs": counts[config][1], "interval": repeat_interval(r)}
    out["recompile_limit_hits"] = watch.hits
    return out


def target_lines(name: str, r: Dict[str, Any]) -> List[str]:
    """The issue-23 verdicts of one model and backend: every step and every 10th step against their targets (by the
    95% interval over repeats, as in overhead.py), and no graph break; nothing for a model without targets."""
    if name not in TARGET_MODELS:
        return []
    lines = []
    for config, target in TARGETS.items():
        c = r[config]
        what = "every step" if config == "every1" else "every 10th step"
        lines.append(f"  target: {what} at most x{target:.2f}: median x{c['median']:.3f}, {judge(c, target)}")
    breaks = sum(r[config]["graph_breaks"] for config in TARGETS)
    lines.append(f"  target: no graph break: {breaks}, {'met' if breaks == 0 else 'not met'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=None, help="comma-separated: resnet20, encoder, gpt2, llama")
    parser.add_argument("--backends", default=None, help="comma-separated: inductor, aot_eager")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10, help="steps per config in one repeat (every10 records one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    if args.models or args.backends:
        models = (args.models or "resnet20,encoder").split(",")
        plan = [(m, b) for m in models for b in (args.backends or "inductor,aot_eager").split(",")]
    elif args.quick:
        plan = [("encoder", "inductor"), ("resnet20", "aot_eager")]
    else:
        plan = [(m, b) for m in ("resnet20", "encoder") for b in ("inductor", "aot_eager")]
        if _hf("gpt2") is not None:
            plan += [("gpt2", "inductor"), ("llama", "inductor")]
    repeats = args.repeats or (2 if args.quick else 5)
    print(f"torch {torch.__version__}, 1 thread; ratio = compiled step / compiled uninstrumented twin, interleaved")
    print(f"machine: {describe()}")
    results = {}
    for name, backend in plan:
        r = time_model(name, backend, repeats, args.steps)
        results[f"{name}/{backend}"] = r
        print(f"\n{name}, {backend} (twin {r['baseline']['step_ms']:.1f} ms/step, {repeats} repeats x {args.steps} "
              f"steps; recompile-limit warnings: {r['recompile_limit_hits']})")
        for config in CONFIGS:
            c = r[config]
            ratio = "" if config == "baseline" else (f"median x{c['median']:.3f} (min x{c['min']:.3f}, "
                                                     f"max x{c['max']:.3f})  ")
            print(f"  {config:8s} {ratio}graph breaks {c['graph_breaks']}, graphs compiled {c['graphs']}")
        for line in target_lines(name, r):
            print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
