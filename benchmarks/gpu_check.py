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
4. **The recipe on the device.** ``--recipe-iterations`` (default 300 on CUDA, 4 on the CPU) iterations of
   ResNet-20 through ``train_run``, the function ``--recipe he2016`` runs (batch 128, pad-4 crops and flips, SGD
   with the recipe's schedule squeezed into the run, gradscope recording every 100th iteration), on a CIFAR-10
   folder generated in a temporary directory (nothing is downloaded), twice: float32 with contiguous tensors, and
   ``--amp --channels-last`` (bfloat16 autocast, channels-last). Printed: iterations per second (the mean over
   the iterations after the first 10, recorded ones included, the final evaluation left out), the training error
   reached (mean mini-batch error of the last 50 iterations), the test error, and whether every loss is finite.
   A variant passes when every iteration ran with a finite loss and, in a run of 150 iterations or more, the
   training error ended below 0.3 (chance: 0.9; on the CPU, float32 reached 0.04 after 150 iterations).
   TF32 is at torch's defaults here, as in a user's run (checks 1 and 2 turn it off).

A table of every check closes the output. The whole check should take a few minutes on one GPU (the compiled
cases compile first; not yet measured); ``--no-compile`` and ``--recipe-iterations 0`` shorten it, and on CUDA a
check not started within ``--budget`` seconds (480) is skipped so that the table prints within a 10-minute limit.
The CPU dry run takes smaller defaults (3 overhead steps, 4 recipe iterations, no budget).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gradscope
from gradscope.models import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)
from recipe_speed import time_iterations, write_cifar_folder  # noqa: E402  (the recipe's timing, generated data)

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


#: a summary row: (check, True passed / False failed / None skipped, detail).
Row = Tuple[str, Optional[bool], str]


#: the recipe check's two runs: (label, amp, channels_last).
RECIPE_VARIANTS = (("float32", False, False), ("bf16 + channels-last", True, True))


def recipe_data(n_train: int, n_test: int, n_val: int, recipe: "object") -> "object":
    """The recipe's splits of a CIFAR-10 folder written into a temporary directory and read back by the reader
    ``--data`` uses (``n_val`` of the ``n_train`` training images held out for validation)."""
    from gradscope.data import read_cifar10_pixels
    from gradscope.study.recipe import prepare

    with tempfile.TemporaryDirectory() as tmp:
        pixels = read_cifar10_pixels(write_cifar_folder(Path(tmp), n_train, n_test))
    return prepare(*pixels, replace(recipe, train_images=n_train - n_val))


def check_recipe(device: str, iterations: int, amp: bool, channels_last: bool, data: "object",
                 batch_size: Optional[int] = None, warmup: int = 10, window: int = 50) -> Dict[str, object]:
    """``iterations`` of ResNet-20 under the he2016 recipe squeezed into the run (milestones at 1/2 and 3/4, one
    evaluation at the end, signals recorded every 100th iteration as in the full recipe), through ``train_run``:
    iterations per second after ``warmup``, the training error of the last ``window`` iterations, the final test
    error, and whether every loss is finite and every iteration ran."""
    from gradscope.study.recipe import HE2016

    recipe = replace(HE2016.shortened(iterations, name="gpu-check"), eval_every=iterations,
                     record_every=HE2016.record_every, batch_size=batch_size or HE2016.batch_size,
                     train_images=len(data.train_x))
    start = time.perf_counter()
    seconds, run = time_iterations("resnet20", recipe, data, device, amp, channels_last,
                                   warmup=min(warmup, max(0, iterations - 3)))
    losses = run.losses
    return {"iterations": len(losses), "per_second": len(seconds) / sum(seconds) if seconds else math.nan,
            "train_error": float(1 - losses["accuracy"].tail(window).mean()) if len(losses) else math.nan,
            "test_error": float(losses["test_error"].iloc[-1]) if len(losses) else math.nan,
            "finite": bool(len(losses)) and bool(losses["loss"].map(math.isfinite).all()),
            "finished": bool(run.config.get("finished")), "seconds": time.perf_counter() - start}


#: a recipe check this long must have learned the generated images: ResNet-20 reached a training error of 0.04
#: (and a test error of 0) after 150 float32 iterations of batch 128 on the CPU, where chance is 0.9.
LEARN_ITERATIONS, LEARNED_ERROR = 150, 0.3


def recipe_verdict(result: Dict[str, object], iterations: int) -> Tuple[bool, str]:
    """``(passed, learned)`` of one recipe run: every iteration ran with a finite loss, and a run of at least
    :data:`LEARN_ITERATIONS` iterations ended below :data:`LEARNED_ERROR` training error (bfloat16 and
    channels-last must keep the result, not just the speed); shorter runs are not judged on learning."""
    ran = bool(result["finite"]) and bool(result["finished"]) and result["iterations"] == iterations
    if iterations < LEARN_ITERATIONS:
        return ran, f"not judged (under {LEARN_ITERATIONS} iterations)"
    learned = float(result["train_error"]) < LEARNED_ERROR  # NaN (nothing ran) is not below
    return ran and learned, "yes" if learned else f"NO (train error not below {LEARNED_ERROR})"


def recipe_checks(device: str, iterations: int, batch_size: Optional[int] = None, n_train: int = 10_000,
                  n_test: int = 2_000, deadline: float = math.inf) -> List[Row]:
    """Check 4 for every variant of :data:`RECIPE_VARIANTS`: ``(label, passed, detail)`` per variant, judged by
    :func:`recipe_verdict` (each one :func:`guarded`)."""
    from gradscope.study.recipe import HE2016

    data = recipe_data(n_train, n_test, n_val=n_test // 2, recipe=HE2016)
    rows: List[Row] = []
    for label, amp, channels_last in RECIPE_VARIANTS:
        name = f"recipe resnet20 {label}"

        def variant(amp: bool = amp, channels_last: bool = channels_last, name: str = name) -> List[Row]:
            r = check_recipe(device, iterations, amp, channels_last, data, batch_size)
            passed, learned = recipe_verdict(r, iterations)
            detail = (f"{r['per_second']:.2f} it/s over {r['iterations']} iterations, train error "
                      f"{r['train_error']:.3f}, test error {r['test_error']:.3f}, losses finite: {r['finite']}, "
                      f"learned: {learned}, {r['seconds']:.0f} s")
            print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}", flush=True)
            return [(name, passed, detail)]

        rows += guarded(name, deadline, device.startswith("cuda"), variant)
    return rows


def summary(rows: List[Row], seconds: float) -> List[str]:
    """The closing table: one line per check, its verdict and its figure."""
    width = max([len(name) for name, _, _ in rows] + [5])
    lines = [f"summary ({seconds:.0f} s):", f"  {'check':<{width}}  result  detail"]
    word = {True: "ok", False: "FAIL", None: "skip"}
    lines += [f"  {name:<{width}}  {word[ok]:<6}  {detail}" for name, ok, detail in rows]
    failed, skipped = sum(ok is False for _, ok, _ in rows), sum(ok is None for _, ok, _ in rows)
    lines.append(f"  {sum(ok is True for _, ok, _ in rows)} of {len(rows)} checks passed"
                 + (f"; {failed} FAILED" if failed else "") + (f"; {skipped} skipped" if skipped else ""))
    return lines


def case_rows(device: str, on_cuda: bool, model_name: str, backend: Optional[str], rtol: float) -> List[Row]:
    """Checks 1 and 2 for one case: no sync inside hooks, one host sync per recorded step, values equal to CPU's."""
    label = f"{model_name} {backend or 'eager'}"
    dev_frame, errors, reads, syncs = recorded_frame(device, on_cuda, model_name, backend)
    if errors:
        print(f"FAIL {label}: sync inside hooks: {errors[0]}")
    else:
        print(f"ok   {label}: no synchronisation in forward or backward" + ("" if on_cuda else
                                                                             " (not checked on the CPU)"))
    rows: List[Row] = [(f"{label}: no sync in hooks", not errors,
                        errors[0][:60] if errors else ("none" if on_cuda else "not checked on the CPU"))]
    print(f"{'ok  ' if syncs == 1 else 'FAIL'} {label}: host synchronisations per recorded step: {syncs} "
          f"(target 1; reads at scope.step(): {reads})")
    rows.append((f"{label}: host syncs per recorded step", syncs == 1, f"{syncs} (target 1)"))
    cpu_frame, _, _, _ = recorded_frame("cpu", False, model_name, None)  # the eager CPU run is the reference
    problems = compare(dev_frame, cpu_frame, rtol)
    print(f"{'FAIL' if problems else 'ok  '} {label}: {len(dev_frame)} values against eager CPU (rtol {rtol})")
    for line in problems[:10]:
        print("     ", line)
    rows.append((f"{label}: same values as CPU", not problems,
                 f"{len(dev_frame) - len(problems)} of {len(dev_frame)} within rtol {rtol}"))
    return rows


def overhead_rows(device: str, steps: int) -> List[Row]:
    """Check 3: the overhead ratios, printed and not judged."""
    ratios = overhead(device, steps)
    print(f"     overhead, ResNet-56 batch 128 ({ratios['baseline_ms']:.1f} ms/step): every step "
          f"x{ratios['every1']:.3f}, every 10th step x{ratios['every10']:.3f}", flush=True)
    return [("resnet56 overhead (measured, no target here)", True,
             f"every step x{ratios['every1']:.3f}, every 10th x{ratios['every10']:.3f}, "
             f"baseline {ratios['baseline_ms']:.1f} ms/step")]


def guarded(name: str, deadline: float, on_cuda: bool, check: Callable[[], List[Row]]) -> List[Row]:
    """Run one check so that nothing it does can cost the others: past ``deadline`` it is skipped, and an exception
    (a compile error, running out of memory...) becomes a FAIL row with its message; the time it took is printed."""
    if time.perf_counter() > deadline:
        print(f"skip {name}: the time budget is spent (--budget)")
        return [(name, None, "skipped: the time budget (--budget) was spent")]
    start = time.perf_counter()
    try:
        rows = check()
    except Exception as exc:  # one broken check must not hide the others' results
        message = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
        print(f"FAIL {name}: {message}")
        rows = [(name, False, message)]
    finally:
        if on_cuda:
            torch.cuda.set_sync_debug_mode(0)
    print(f"     ({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed overhead steps per configuration (default 30 on CUDA, 3 on the CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cases")
    parser.add_argument("--recipe-iterations", type=int, default=None,
                        help="iterations of each recipe run (default 300 on CUDA, 4 on the CPU; 0 skips check 4)")
    parser.add_argument("--recipe-batch", type=int, default=None, help="the recipe runs' batch (default 128)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which the checks not yet started are skipped, so that the summary "
                             "prints within a time limit (default 480 on CUDA, none on the CPU; 0: no limit)")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or pass --device cpu for a dry run", file=sys.stderr)
        return 2
    started = time.perf_counter()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # torch's defaults
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    print(f"machine: {describe(args.device)}")
    rows: List[Row] = []

    budget = args.budget if args.budget is not None else (480 if on_cuda else 0)
    deadline = started + budget if budget else math.inf
    steps = args.steps or (30 if on_cuda else 3)
    cases = [("resnet20", None)] + ([] if args.no_compile else [("resnet20", "inductor"), ("encoder", "inductor")])
    for model_name, backend in cases:
        name = f"{model_name} {backend or 'eager'}"
        rows += guarded(name, deadline, on_cuda,
                        lambda: case_rows(args.device, on_cuda, model_name, backend, args.rtol))
    rows += guarded("resnet56 overhead", deadline, on_cuda, lambda: overhead_rows(args.device, steps))

    iterations = args.recipe_iterations if args.recipe_iterations is not None else (300 if on_cuda else 4)
    if iterations:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32  # as in a user's run
        sizes = (10_000, 2_000) if on_cuda else (640, 200)  # generated training and test images
        rows += guarded("recipe", deadline, on_cuda,
                        lambda: recipe_checks(args.device, iterations, args.recipe_batch, *sizes, deadline=deadline))
    for line in summary(rows, time.perf_counter() - started):
        print(line)
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
