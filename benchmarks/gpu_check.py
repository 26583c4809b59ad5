"""The GPU path, checked in one short run: no host synchronisation inside hooks, the same numbers as on the CPU,
and the overhead of a recorded step on the device.

Run it whenever a CUDA machine is at hand (the project's CI machines have none):

    python benchmarks/gpu_check.py                  # CUDA: all checks, eager and compiled; exit status 0 when they pass
    python benchmarks/gpu_check.py --device cpu     # a dry run of the same code on the CPU (no sync check)
    python benchmarks/gpu_check.py --no-compile     # the eager checks only

Checks 1 and 2 run on ResNet-20 eager, on ResNet-20 compiled (inductor, attach then compile) and on a transformer
encoder LM compiled; under compile the first recorded step compiles (and may synchronise), the second is checked.

1. **No sync in hooks, one per recorded step.** A recorded ResNet-20 training step runs forward and backward under
   ``torch.cuda.set_sync_debug_mode("error")``: any hook that reads a value back (``.item()``, ``.tolist()``, a
   Python ``if`` on a tensor, a device-to-host copy) raises there. ``scope.step()`` then runs under
   ``set_sync_debug_mode("warn")``, whose warnings are counted: the host synchronisations of a recorded step (target
   1: eager and compiled, every measurement of the step comes back in one transfer). On the CPU (``--device cpu``)
   the same count comes from the calls that would synchronise on a GPU (``.tolist()``, ``.item()``, ``.cpu()``...).
2. **Same numbers.** The device frame is compared with a CPU frame of the same model, weights and batch (TF32
   off), metric by metric, to ``--rtol`` (default 1e-3: convolution algorithms sum in different orders).
3. **Overhead.** Median step time of ``attach(model)`` and ``attach(model, every=10)`` against an uninstrumented
   step, the three taking turns step by step (batch 128, ResNet-56), with ``torch.cuda.synchronize()`` around each.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Dict, List, Tuple

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gradscope
from gradscope.models import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)

READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"}


class ReadCounter(TorchFunctionMode):
    """Counts calls that read tensor values back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts host synchronisations: on CUDA the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` (one per
    synchronising call), on the CPU the calls that would synchronise on a GPU (a dry run of the same count)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.count = 0
        self._reads = ReadCounter()
        self._caught: "warnings.catch_warnings | None" = None
        self._log: List[warnings.WarningMessage] = []

    def __enter__(self) -> "SyncCounter":
        if self.cuda:
            torch.cuda.synchronize()
            self._caught = warnings.catch_warnings(record=True)
            self._log = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._reads.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            assert self._caught is not None
            self._caught.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._log)
        else:
            self._reads.__exit__(*exc)
            self.count = len(self._reads.calls)


def batch(n: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


class TokenLM(nn.Module):
    """A 2-layer TransformerEncoder LM (width 64): the transformer case."""

    def __init__(self, vocab: int = 128, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x))).flatten(0, 1)


def _case(model_name: str, device: str):
    """(model, inputs, targets, blocks) of a check case, with the same weights on every device."""
    if model_name == "encoder":
        torch.manual_seed(0)
        model = TokenLM().to(device)
        tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0)).to(device)
        return model, tokens, tokens.reshape(-1), r"encoder\.layers\.\d+"
    x, y = batch(32, device)
    return build(model_name, seed=0).to(device), x, y, "auto"


def recorded_frame(device: str, check_sync: bool, model_name: str = "resnet20",
                   backend: "str | None" = None) -> Tuple[object, List[str], List[str], int]:
    """A recorded training step of ``model_name`` on ``device``, eager or compiled with ``backend`` (attach, then
    compile; the first step compiles, the second is the one checked): (frame of the checked step, sync errors,
    reads at its scope.step(), host synchronisations counted at its scope.step())."""
    model, x, y, blocks = _case(model_name, device)
    errors: List[str] = []
    with gradscope.attach(model, blocks=blocks) as scope:
        run = torch.compile(model, backend=backend) if backend else model
        steps = 2 if backend else 1
        for step in range(steps):
            checked = step == steps - 1
            if check_sync and checked:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                nn.functional.cross_entropy(run(x), y).backward()
            except RuntimeError as exc:  # a synchronising call inside a hook
                errors.append(str(exc).splitlines()[0])
            finally:
                if check_sync and checked:
                    torch.cuda.set_sync_debug_mode(0)
            with ReadCounter() as reads, SyncCounter(device) as syncs:
                scope.step()
            model.zero_grad(set_to_none=True)  # no optimizer step: both steps see the same weights
        frame = scope.frame()
    return frame[frame.step == steps - 1], errors, reads.calls, syncs.count


def compare(dev_frame, cpu_frame, rtol: float) -> List[str]:
    """Rows whose values differ by more than ``rtol`` (relative, with a small absolute floor)."""
    key = ["block", "metric", "call"]
    merged = dev_frame.merge(cpu_frame, on=key, suffixes=("_dev", "_cpu"), how="outer", indicator="side")
    problems = [f"{r.block} {r.metric}: only on {'device' if r.side == 'left_only' else 'cpu'}"
                for r in merged.itertuples() if r.side != "both"]
    for r in merged[merged.side == "both"].itertuples():
        a, b = r.value_dev, r.value_cpu
        if not (math.isclose(a, b, rel_tol=rtol, abs_tol=1e-7) or (math.isnan(a) and math.isnan(b))):
            problems.append(f"{r.block} {r.metric}: device {a:.6g} vs cpu {b:.6g}")
    return problems


def overhead(device: str, steps: int) -> Dict[str, float]:
    """Median step time ratio of every1 and every10 against no hooks, configs taking turns step by step."""
    model = build("resnet56", seed=0).to(device)
    x, y = batch(128, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    counts = {"baseline": 0, "every1": 0, "every10": 0}
    times: Dict[str, List[float]] = {c: [] for c in counts}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for i in range(steps + 2):
        for config in counts:
            k = counts[config]
            scope = (None if config == "baseline" else gradscope.attach(model) if config == "every1"
                     else gradscope.attach(model, every=lambda s, k=k: (k + s) % 10 == 0))
            counts[config] += 1
            sync()
            start = time.perf_counter()
            nn.functional.cross_entropy(model(x), y).backward()
            if scope is not None:
                scope.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= 2:  # warm-up
                times[config].append(time.perf_counter() - start)
            if scope is not None:
                scope.detach()
    base = statistics.median(times["baseline"])
    return {c: statistics.median(t) / base for c, t in times.items()} | {"baseline_ms": 1e3 * base}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cases")
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or pass --device cpu for a dry run", file=sys.stderr)
        return 2
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    print(f"machine: {describe(args.device)}")
    failures = 0

    cases = [("resnet20", None)] + ([] if args.no_compile else [("resnet20", "inductor"), ("encoder", "inductor")])
    for model_name, backend in cases:
        label = f"{model_name} {backend or 'eager'}:"
        dev_frame, errors, reads, syncs = recorded_frame(args.device, on_cuda, model_name, backend)
        if errors:
            failures += 1
            print(f"FAIL {label} sync inside hooks: {errors[0]}")
        else:
            print(f"ok   {label} no synchronisation in forward or backward" + ("" if on_cuda else
                                                                                " (not checked on the CPU)"))
        print(f"{'ok  ' if syncs == 1 else 'FAIL'} {label} host synchronisations per recorded step: {syncs} "
              f"(target 1; reads at scope.step(): {reads})")
        failures += int(syncs != 1)
        cpu_frame, _, _, _ = recorded_frame("cpu", False, model_name, None)  # the eager CPU run is the reference
        problems = compare(dev_frame, cpu_frame, args.rtol)
        failures += int(bool(problems))
        print(f"{'FAIL' if problems else 'ok  '} {label} {len(dev_frame)} values against eager CPU (rtol {args.rtol})")
        for line in problems[:10]:
            print("     ", line)

    ratios = overhead(args.device, args.steps)
    print(f"     overhead, ResNet-56 batch 128 ({ratios['baseline_ms']:.1f} ms/step): every step "
          f"x{ratios['every1']:.3f}, every 10th step x{ratios['every10']:.3f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
