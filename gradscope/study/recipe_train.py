"""One run of a :class:`~gradscope.study.recipe.Recipe`: train a built-in CIFAR net, record its signals with
gradscope, and its training/validation/test error over iterations (the curves of the paper's Fig. 6).

The training error of a point is the mean mini-batch error (augmented images, train mode) over the iterations
since the previous point, as curves of this kind are usually drawn; validation and test errors are measured on the
whole split in eval mode, single view. Evaluation forwards run under ``torch.no_grad()``, which gradscope does
not take for training forwards.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from gradscope import schema as S
from gradscope.analysis.curves import curves
from gradscope.engine.attach import attach
from gradscope.errors import GradscopeError
from gradscope.study.error_claims import error_window
from gradscope.study.recipe import HE2016, Recipe, RecipeData, WarmUp, batches, error_rate
from gradscope.study.runs import LOSS_COLUMNS as STUDY_LOSS_COLUMNS, _config_of, _label
from gradscope.study.specs import RunSpec, grid
from gradscope.words import FINISHED, INIT, TRAIN

#: Columns of a recipe run's per-iteration table: the study's loss columns, then the learning rate, and the
#: validation and test error measured after that iteration (NaN where no evaluation ran).
LOSS_COLUMNS = STUDY_LOSS_COLUMNS + ("lr", "val_error", "test_error")


@dataclass
class RecipeRun:
    """What one recipe run measured: signals (``frame``), per-iteration ``losses`` with the evaluations, ``config``."""

    frame: Any
    losses: Any
    config: Dict[str, Any]
    warmup_ended_at: Optional[int] = None

    @property
    def curves(self) -> Any:
        return curves(self.losses, {self.losses[S.RUN].iloc[0]: self.config} if len(self.losses) else {})


@dataclass
class RecipeSettings:
    """How a recipe study runs: the recipe, where, and the study-level numbers every study has (``steps``,
    ``batch_size``, ``lr``, ... read from the recipe, so claims, alerts and reports read a recipe study as any)."""

    recipe: Recipe = field(default_factory=lambda: HE2016)
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    workers: int = 0
    init_batches: int = 2
    #: iterations whose mean training loss is a run's final loss (the loss table; a recipe study's claims are decided
    #: on the final training error over :attr:`error_window`).
    final_window: int = 50

    @property
    def steps(self) -> int:
        return self.recipe.iterations

    @property
    def batch_size(self) -> int:
        return self.recipe.batch_size

    @property
    def lr(self) -> float:
        return self.recipe.lr

    @property
    def momentum(self) -> float:
        return self.recipe.momentum

    @property
    def weight_decay(self) -> float:
        return self.recipe.weight_decay

    @property
    def every(self) -> int:
        return self.recipe.record_every

    @property
    def error_window(self) -> int:
        """Last iterations whose mean mini-batch error is a run's final training error, on which the training
        claims are decided (:func:`gradscope.study.error_claims.error_window`: the last 5%)."""
        return error_window(self.recipe.iterations)

    def describe(self) -> str:
        r = self.recipe
        return (f"recipe {r.name}: {r.iterations} SGD iterations (lr {r.lr:g} divided by 10 at "
                f"{', '.join(str(m) for m in r.milestones)}; momentum {r.momentum:g}, weight decay "
                f"{r.weight_decay:g}, batch {r.batch_size}, pad-{r.pad} crops and flips; training claims on the "
                f"mean training error of the last {self.error_window} iterations, test error of the last evaluation "
                f"beside them; final loss: mean of the last {min(self.final_window, r.iterations)} iterations)")


def recipe_spec(model: str, seed: int, recipe: Recipe = HE2016) -> RunSpec:
    """The run spec of the paper's net ``model`` (e.g. ``resnet110``) under ``recipe``: BN, He init, its shortcut."""
    shortcut = None if recipe.shortcut == "A" else recipe.shortcut  # option A is the nets' default
    return grid([model], bn=(True,), seeds=(seed,), shortcut=shortcut)[0]


def run_facts(spec: RunSpec, net: nn.Module, settings: RecipeSettings, data: RecipeData,
              batch: tuple) -> Dict[str, Any]:
    """A recipe run's config: the study's facts, the recipe, and the examples behind its errors (the images of a
    training mini-batch, capped at the split; the test set size), which the claims' binomial noise floor needs."""
    return {**_config_of(spec, net, settings, batch), "recipe": settings.recipe.name, "num_classes": 10,
            "batch_images": int(batch[1].shape[0]), "test_images": int(len(data.test_y))}


def mixed_precision(device: torch.device, amp: bool) -> Any:
    """The context the training forward runs in: bfloat16 autocast on ``device`` when ``amp``, else nothing.

    bfloat16 keeps float32's exponent range, so gradients need no loss scaling (no ``GradScaler``, nothing that
    exists only on CUDA); autocast on the CPU uses the same dtype. A device type without bfloat16 autocast is
    refused with the fix instead of a torch traceback.
    """
    if not amp:
        return nullcontext()
    try:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    except (RuntimeError, ValueError) as exc:
        raise GradscopeError(f"--amp (bfloat16 autocast) is not available on device {str(device)!r}: {exc}; "
                             f"run without --amp, or on cuda or cpu") from exc


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def cudnn_autotune(device: torch.device) -> Optional[bool]:
    """On a CUDA device, let cuDNN time its convolution algorithms once per input shape and keep the fastest
    (``torch.backends.cudnn.benchmark``): a recipe's shapes never change (one batch size, 32x32 images; the last,
    smaller evaluation batch is one more shape), so every iteration after the first few runs the fastest algorithm.
    Returns the setting to restore afterwards, None where nothing changed (any other device)."""
    if device.type != "cuda":
        return None
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    return before


def train_run(model: str, recipe: Recipe, data: RecipeData, *, seed: int = 0, device: str = "cpu",
              out: Optional[Path] = None, amp: bool = False, channels_last: bool = False, blocks: Any = "auto",
              init_batches: int = 2, spec: Optional[RunSpec] = None,
              on_iteration: Optional[Callable[[int], None]] = None,
              sink: Optional[List[Any]] = None) -> RecipeRun:
    """Train ``model`` by ``recipe`` on ``data``; the data order and the weights both follow ``seed``.

    First ``init_batches`` recorded forward/backward passes without an update (phase ``init``), then the recipe
    (phase ``train``). ``amp`` runs the training forward under bfloat16 autocast on the run's device, CUDA or CPU
    (no loss scaling: bfloat16 has float32's range; see :func:`mixed_precision`); the loss is taken in float32 and
    evaluations run in float32. ``channels_last`` stores images and weights channels-last (faster convolutions on
    recent GPUs), evaluation batches too. On CUDA, cuDNN picks the fastest convolution algorithm for the run's
    shapes (:func:`cudnn_autotune`; the setting is restored when the run ends). Records stream to ``out`` when given.
    ``sink`` receives ``(frame, losses, config)`` even when the run is interrupted.
    """
    import pandas as pd

    spec = spec or recipe_spec(model, seed, recipe)
    if blocks != "auto":
        from dataclasses import replace

        spec = replace(spec, blocks=blocks)
    torch_device = torch.device(device)
    net = spec.build().to(torch_device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    settings = RecipeSettings(recipe=recipe, device=device, init_batches=init_batches)
    optimizer = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    warm = WarmUp(recipe, int(spec.depth or 0))
    loss_fn = nn.CrossEntropyLoss()
    autocast = mixed_precision(torch_device, amp)
    stream = batches(data, recipe, seed)
    rows: List[tuple] = []
    frames: List[Any] = []
    config: Dict[str, Any] = {}
    net.train()

    def next_batch() -> tuple:
        x, y = next(stream)
        x, y = x.to(torch_device, non_blocking=True), y.to(torch_device, non_blocking=True)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y

    init_scope = scope = None
    autotuned = cudnn_autotune(torch_device)
    try:
        init_scope = attach(net, blocks=spec.blocks, on_nonfinite="ignore",
                            out=None if out is None else Path(out) / INIT)
        for _ in range(init_batches):
            x, y = next_batch()
            config = config or run_facts(spec, net, settings, data, (x, y))
            with autocast:
                loss_fn(net(x).float(), y).backward()
            init_scope.step()
            net.zero_grad(set_to_none=True)
        init_scope.detach()
        frames.append(_label(init_scope.frame(), spec, config, INIT))
        init_scope = None
        scope = attach(net, blocks=spec.blocks, every=recipe.record_every, optimizer=optimizer,
                       on_nonfinite="ignore", out=None if out is None else Path(out) / TRAIN)
        for iteration in range(recipe.iterations):
            lr = recipe.lr_at(iteration, warm.active)
            _set_lr(optimizer, lr)
            x, y = next_batch()
            config = config or run_facts(spec, net, settings, data, (x, y))
            with autocast:
                logits = net(x)
                loss = loss_fn(logits.float(), y)
            loss.backward()
            scope.step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # one read-back per iteration (a host synchronisation on a GPU): the loss and the batch error together
            loss_value, batch_error = torch.stack([loss.detach(), (logits.detach().argmax(1) != y).float().mean()
                                                   ]).tolist()
            warm.update(iteration, batch_error)
            val = test = math.nan
            if (iteration + 1) % recipe.eval_every == 0 or iteration + 1 == recipe.iterations:
                val = error_rate(net, data.val_x, data.val_y, torch_device, channels_last=channels_last)
                test = error_rate(net, data.test_x, data.test_y, torch_device, channels_last=channels_last)
            rows.append((spec.name, spec.config, spec.seed, iteration, loss_value, 1.0 - batch_error, lr, val, test))
            if on_iteration is not None:
                on_iteration(iteration)
            if not math.isfinite(loss_value):
                break  # a diverged run: keep what it recorded; its curves end where it stopped
        else:
            config[FINISHED] = True  # every iteration ran: an interrupted study counts this run as finished
    finally:
        if autotuned is not None:
            torch.backends.cudnn.benchmark = autotuned
        for phase, open_scope in ((INIT, init_scope), (TRAIN, scope)):
            if open_scope is not None:
                open_scope.detach()
                frames.append(_label(open_scope.frame(), spec, config, phase))
        config["warmup_ended_at"] = warm.ended_at
        result = RecipeRun(frame=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
                           losses=pd.DataFrame(rows, columns=list(LOSS_COLUMNS)), config=config,
                           warmup_ended_at=warm.ended_at)
        if sink is not None:
            sink.append((result.frame, result.losses, result.config))
    return result


def recipe_job(spec: RunSpec, data: RecipeData, settings: RecipeSettings, out: Optional[Path],
               on_step: Optional[Callable[[str, int], None]], sink: List[Any]) -> None:
    """One run of a recipe study, as :func:`gradscope.study.executors.execute` runs it (module-level: it pickles
    by name); a run that finishes leaves its snapshot for ``resume``."""
    from gradscope.study import executors

    if on_step:
        on_step(INIT, settings.init_batches)
    train_run(spec.model, settings.recipe, data, seed=spec.seed, device=settings.device,
              out=None if out is None else Path(out) / "records" / spec.name, amp=settings.amp,
              channels_last=settings.channels_last, init_batches=settings.init_batches, spec=spec,
              on_iteration=(lambda i: on_step(TRAIN, 1)) if on_step else None, sink=sink)
    if out is not None and sink:
        executors.save_finished(out, spec.name, sink[0], executors.fingerprint(spec, settings))
