"""Overhead of gradscope against an uninstrumented training step: interleaved twins in one process.

For each model (ResNet-56, ResNet-110, a 50-block BatchNorm MLP of width 256; batch 64, CIFAR-shaped input, SGD)
every configuration trains a *twin*: a copy of one initial model with its own optimizer, instrumented at the
start of each repeat and kept attached through it, as in a real run. All twins train on the same batch, so they do the same arithmetic;
they take turns step by step in a shuffled order, so machine noise hits all of them alike:

* ``baseline``: no hooks; ``baseline2``: a second uninstrumented twin. Its ratio to ``baseline`` is the
  resolution of the measurement (two identical twins differ only by where their memory lies);
* ``floor``: the least any per-block tool can do, as issue 8 defines it: one extra read of every block output
  (``mean()`` plus ``vector_norm()``), of every block-output gradient and of every parameter gradient
  (``vector_norm()``), nothing read back to the host. gradscope records far more than this;
* ``every1``: ``gradscope.attach(model, optimizer=opt)``, every step recorded, every default metric (the update
  ratio included, which needs the optimizer);
* ``every1-noupd``: ``gradscope.attach(model)`` without the optimizer, so no update ratio: what this benchmark
  measured as ``every1`` before 2026-12-07;
* ``every10``: ``attach(model, optimizer=opt, every=10)``: one step in ten recorded;
* ``naive``: the usual forum snippet: forward hooks and full backward hooks that call ``.item()`` on a mean and a
  norm per block (it records less than gradscope).

Which twin a configuration drives rotates from repeat to repeat (see ``time_model``). It prints, per
configuration, the ratio of its total step time to the baseline's over whole rotations (the figure to quote: each
configuration drove every twin equally often), the median ratio (with min-max over repeats), the ratio of ``every1`` and ``every1-noupd`` to the floor, and the peak RSS of a 1,000-step recorded run of the MLP
against an uninstrumented one, each in a fresh subprocess. Threads are pinned to one (``torch.set_num_threads(1)``).

    python benchmarks/overhead.py            # all models, one whole rotation (+ transformers rows:
                                             # a TransformerEncoder LM, and HF GPT-2 / Llama if installed)
    python benchmarks/overhead.py --models encoder,gpt2,llama   # the language models only
    python benchmarks/overhead.py --quick    # ResNet-56 (2 repeats) and the MLP (3), no forum snippet: medians only

A repeat is 10 training steps of each configuration (20 for the MLP, whose steps are short), so ``every10``
records one step in ten within every repeat, as a long run would.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import gradscope
from gradscope.analysis.stats import t975
from gradscope.models import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)


class TokenLM(nn.Module):
    """A language model for the transformer rows: embedding, blocks, head; logits flattened to (tokens, vocab) so
    the benchmark's cross-entropy applies. ``encoder``: a 6-layer ``nn.TransformerEncoder`` of width 128; ``gpt2`` and
    ``llama``: Hugging Face configs (6 x 256 and 4 x 256) built without a download."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "encoder":
            self.embed = nn.Embedding(VOCAB, 128)
            layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
            self.head = nn.Linear(128, VOCAB)
            return
        import transformers  # only for the Hugging Face rows

        if kind == "gpt2":
            config = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=4, n_positions=128, vocab_size=VOCAB)
            self.hf = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                                              num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                              max_position_embeddings=128)
            self.hf = transformers.LlamaForCausalLM(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "encoder":
            return self.head(self.encoder(self.embed(x))).flatten(0, 1)
        return self.hf(input_ids=x).logits.flatten(0, 1)


VOCAB = 512
LANGUAGE_MODELS = ("encoder", "gpt2", "llama")


def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def make_model(name: str) -> nn.Module:
    if name == "mlp50-bn":
        return build("mlp", depth=50, width=256, bn=True, seed=0)
    if name in LANGUAGE_MODELS:
        torch.manual_seed(0)
        return TokenLM(name)
    return build(name, seed=0)


def batch_for(name: str):
    g = torch.Generator().manual_seed(0)
    if name in LANGUAGE_MODELS:  # 8 sequences of 128 tokens; the targets are the tokens themselves
        tokens = torch.randint(0, VOCAB, (8, 128), generator=g)
        return tokens, tokens.reshape(-1)
    return torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)


class Naive:
    """The forum snippet: `.item()` in forward hooks and in full backward hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.records: List[float] = []
        self.handles = []
        for site in gradscope.find_blocks(model):
            self.handles.append(site.module.register_forward_hook(self._fwd))
            self.handles.append(site.module.register_full_backward_hook(self._bwd))

    def _fwd(self, module, inputs, output):
        self.records += [output.mean().item(), output.norm().item()]

    def _bwd(self, module, grad_in, grad_out):
        self.records.append(grad_out[0].norm().item())

    def step(self) -> None:
        pass

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


class Floor:
    """Issue 8's floor: mean + vector_norm of each block output, vector_norm of each block-output gradient and of each
    parameter gradient; the results stay tensors (a real tool would keep them for one transfer per step)."""

    def __init__(self, model: nn.Module) -> None:
        self.kept: List[torch.Tensor] = []
        self.handles = [site.module.register_forward_hook(self._fwd) for site in gradscope.find_blocks(model)]
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _fwd(self, module, inputs, output):
        with torch.no_grad():
            self.kept += [output.mean(), torch.linalg.vector_norm(output)]
        if output.requires_grad:
            output.register_hook(lambda g: self.kept.append(torch.linalg.vector_norm(g)))

    def step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self.kept += list(torch._foreach_norm(grads))
        self.kept = []

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


class NoScope:
    def step(self) -> None:
        pass

    def detach(self) -> None:
        pass


def instrument(config: str, model: nn.Module, opt):
    """The instrument of ``config`` on its twin ``model`` (attached once, for the whole run)."""
    if config.startswith("baseline"):
        return NoScope()
    if config == "every1":
        return gradscope.attach(model, optimizer=opt)
    if config == "every1-noupd":
        return gradscope.attach(model)
    if config == "every10":
        return gradscope.attach(model, optimizer=opt, every=10)
    if config == "naive":
        return Naive(model)
    if config == "floor":
        return Floor(model)
    raise ValueError(config)


def steps_per_repeat(name: str) -> int:
    """Steps in one timed block: 10 (every10 records one of them), 20 for the short MLP steps (two)."""
    return 20 if name.startswith("mlp") else 10


def quick_repeats(name: str) -> int:
    """Repeats under ``--quick``: 2 for ResNet-56, 3 for the fast MLP."""
    return 2 if name.startswith("resnet") else 3


def make_twins(name: str, count: int) -> List[tuple]:
    """``count`` copies of one initial model, each with its own optimizer: ``[(model, optimizer), ...]``."""
    model = make_model(name)
    twins = []
    for _ in range(count):
        twin = copy.deepcopy(model)
        twins.append((twin, torch.optim.SGD(twin.parameters(), lr=1e-3)))
    return twins


def time_model(name: str, repeats: int, steps_per_repeat: int, configs: List[str],
               last: Optional[Dict[str, object]] = None) -> Dict[str, List[float]]:
    """Per config, a list (one per repeat) of mean step times.

    Every config trains a twin (a copy of one initial model; all train on one batch, so they do the same
    arithmetic), the twins taking turns *step by step* in a shuffled order, so slow drifts of a shared machine hit
    them alike. Which twin a config drives rotates from one repeat to the next, so that where a twin's memory lies
    (a few percent between identical twins on this machine) does not follow one config through the run. At the start
    of a repeat each config's instrument is attached to its twin and one untimed step is run (every10 records it),
    so a repeat's ``steps_per_repeat`` timed steps are those of a scope that is already running: ``every10``
    records exactly one of them. ``last`` (if given) receives the instruments of the last repeat, detached.
    """
    twins = make_twins(name, len(configs))
    x, y = batch_for(name)
    loss_fn = nn.CrossEntropyLoss()

    def one_step(model: nn.Module, opt, scope) -> float:
        gc.collect()  # garbage of earlier steps is collected here, untimed, not inside another config's step
        start = time.perf_counter()
        loss_fn(model(x), y).backward()
        scope.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: Dict[str, List[float]] = {c: [] for c in configs}
    for r in range(repeats):
        driven = {c: twins[(i + r) % len(twins)] for i, c in enumerate(configs)}
        scopes = {c: instrument(c, model, opt) for c, (model, opt) in driven.items()}
        for c in configs:  # untimed: the scope's first step
            one_step(*driven[c], scopes[c])
        total = {c: 0.0 for c in configs}
        for _ in range(steps_per_repeat):
            order = configs[:]
            random.shuffle(order)
            for c in order:
                total[c] += one_step(*driven[c], scopes[c])
        for c in configs:
            times[c].append(total[c] / steps_per_repeat)
            scopes[c].detach()
        if last is not None:
            last.clear()
            last.update(scopes)
    return times


def ratios(times: Dict[str, List[float]], against: str = "baseline") -> Dict[str, Dict[str, float]]:
    """Per config: the median, min and max over repeats of its step time divided by ``against``'s in the same
    repeat, its median step time in ms, and ``rotations``: the ratio of its total time to ``against``'s over the
    whole rotations among the repeats (each config drove every twin equally often there, so the twins' own
    differences cancel; None with fewer repeats than configs)."""
    base = times[against]
    whole = len(base) - len(base) % len(times)
    out = {}
    for config, values in times.items():
        r = [v / b for v, b in zip(values, base)]
        out[config] = {"median": statistics.median(r), "min": min(r), "max": max(r),
                       "step_ms": 1e3 * statistics.median(values),
                       "rotations": sum(values[:whole]) / sum(base[:whole]) if whole else None,
                       "interval": repeat_interval(r)}
    return out


def repeat_interval(r: List[float]) -> Optional[Tuple[float, float]]:
    """A 95% interval of the ratio from the per-repeat ratios (Student's t on their logarithms), None with fewer
    than 3 repeats. Conservative: a single repeat's ratio also carries the differences between the twins it happened
    to drive, which cancel in the whole-rotation ratio. A target outside this interval is resolved by the run."""
    if len(r) < 3:
        return None
    logs = [math.log(v) for v in r]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = t975(len(logs) - 1) * sd / math.sqrt(len(logs))
    return math.exp(mean - half), math.exp(mean + half)


def rss_child(config: str, steps: int) -> None:
    """Run `steps` MLP training steps under `config` and print peak RSS (KiB) and frame size as JSON."""
    torch.set_num_threads(1)
    model = make_model("mlp50-bn")
    x, y = batch_for("mlp50-bn")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scope = instrument(config, model, opt)
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        scope.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    frame_bytes = 0
    if config != "baseline":
        frame_bytes = int(scope.frame().memory_usage(deep=True).sum())
    scope.detach()
    print(json.dumps({"rss_kib": peak_rss_kib(), "frame_bytes": frame_bytes}))


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: ``VmHWM`` on Linux, which starts afresh at ``exec``.

    Why not ``getrusage``: on Linux its ``ru_maxrss`` keeps the parent's peak across fork and exec, so a child
    started after the parent timed ResNet-110 reported the parent's 1,089 MiB for both configurations."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_rss(steps: int) -> Dict[str, Dict[str, int]]:
    """Peak RSS of ``steps`` MLP training steps without and with gradscope, in two subprocesses run side by side
    (peak memory does not depend on timing)."""
    procs = {config: subprocess.Popen([sys.executable, __file__, "--rss-child", config, "--rss-steps", str(steps)],
                                      stdout=subprocess.PIPE, text=True) for config in ("baseline", "every1")}
    out = {}
    for config, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the {config} memory run failed (exit status {proc.returncode})")
        out[config] = json.loads(stdout.strip().splitlines()[-1])
    return out


def _whole(r: Dict[str, float]) -> str:
    """The whole-rotation ratio as printed (the figure to quote), or a note that there was no whole rotation, and
    the 95% interval over repeats when there are three or more."""
    whole = f"x{r['rotations']:.3f} over whole rotations," if r["rotations"] is not None else "(no whole rotation)"
    if r.get("interval") is None:
        return whole
    lo, hi = r["interval"]
    return f"{whole} 95% over repeats [x{lo:.3f}, x{hi:.3f}],"


#: issue 23's eager targets: (what, the figure's name in the printout, the most it may be)
TARGETS = {
    "resnet56": (("every step / floor", "every1 / floor", 1.02), ("every 10th step", "every10", 1.01)),
    "resnet110": (("every step / floor", "every1 / floor", 1.02), ("every 10th step", "every10", 1.01)),
    "mlp50-bn": (("every step / floor", "every1 / floor", 1.10), ("every 10th step", "every10", 1.01)),
}


def judge(ratio: Dict[str, float], target: float) -> str:
    """``met``, ``not met`` or ``unresolved`` for a ratio against the most it may be: by its 95% interval over
    repeats when there is one (a target inside the interval is not decided by the run), else ``unresolved``."""
    interval = ratio.get("interval")
    if interval is None:
        return "unresolved (fewer than 3 repeats: no interval)"
    lo, hi = interval
    if hi <= target:
        return "met"
    if lo > target:
        return "not met"
    return f"unresolved (x{target:.2f} lies in [x{lo:.3f}, x{hi:.3f}])"


def print_targets(name: str, r: Dict[str, Dict[str, float]], of_floor: Dict[str, Dict[str, float]]) -> None:
    """The issue-23 verdict of each target of ``name`` (nothing for a model without targets)."""
    for what, figure, target in TARGETS.get(name, ()):
        ratio = of_floor["every1"] if figure == "every1 / floor" else r[figure]
        whole = ratio["rotations"] if ratio["rotations"] is not None else ratio["median"]
        print(f"  target: {what} at most x{target:.2f}: x{whole:.3f}, {judge(ratio, target)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models", default=None)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-steps", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.rss_steps)
        return
    torch.set_num_threads(1)
    random.seed(0)
    models = (args.models.split(",") if args.models else
              (["resnet56", "mlp50-bn"] if args.quick else
               ["resnet56", "resnet110", "mlp50-bn", "encoder"] + (["gpt2", "llama"] if has_transformers() else [])))
    configs = ["baseline", "baseline2", "floor", "every1", "every1-noupd", "every10"] + \
        ([] if args.quick else ["naive"])
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "models": {}}
    print(f"torch {torch.__version__}, 1 thread; ratio = step time / baseline, interleaved twins")
    print(f"machine: {describe()}")
    for name in models:
        repeats = args.repeats or (quick_repeats(name) if args.quick else len(configs))
        times = time_model(name, repeats, steps_per_repeat(name), configs)
        r, of_floor = ratios(times), ratios(times, against="floor")
        results["models"][name] = {"repeats": repeats, **r,
                                   "of_floor": {c: of_floor[c] for c in ("every1", "every1-noupd")}}
        print(f"\n{name} (baseline {r['baseline']['step_ms']:.1f} ms/step, {repeats} repeats)")
        for config in configs[1:]:
            print(f"  {config:20s} {_whole(r[config])} median x{r[config]['median']:.3f}  "
                  f"(min x{r[config]['min']:.3f}, max x{r[config]['max']:.3f})")
        for config in ("every1", "every1-noupd"):
            print(f"  {config + ' / floor':20s} {_whole(of_floor[config])} median x{of_floor[config]['median']:.3f}  "
                  f"(min x{of_floor[config]['min']:.3f}, max x{of_floor[config]['max']:.3f})")
        print_targets(name, r, of_floor)
    rss_steps = 100 if args.quick else args.rss_steps
    rss = measure_rss(rss_steps)
    results["rss"] = {"steps": rss_steps, **rss}
    base, rec = rss["baseline"]["rss_kib"], rss["every1"]["rss_kib"]
    print(f"\npeak RSS, mlp50-bn, {rss_steps} steps: baseline {base / 1024:.1f} MiB, recorded every step "
          f"{rec / 1024:.1f} MiB (x{rec / base:.3f}); the frame itself {rss['every1']['frame_bytes'] / 2**20:.1f} MiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
