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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from gradscope import schema as S
from gradscope.engine.scope import attach
from gradscope.study.recipe import Recipe, RecipeData, WarmUp, batches, error_rate

#: Columns of a recipe run's per-iteration table: the study's loss columns, then the learning rate, and the
#: validation and test error measured after that iteration (NaN where no evaluation ran).
LOSS_COLUMNS = (S.RUN, S.STEP, "loss", "accuracy", "lr", "val_error", "test_error")
#: Columns of the error curves (one row per evaluation point of one run), derived by :func:`curves`.
CURVE_COLUMNS = (S.RUN, "model", "seed", "iteration", "lr", "train_loss", "train_error", "val_error", "test_error")


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


def build_net(model: str, recipe: Recipe, seed: int) -> nn.Module:
    """The paper's net ``model`` (e.g. ``resnet110``): He init, BN, the recipe's shortcut for residual nets."""
    from gradscope.models import build

    options = {"shortcut": recipe.shortcut} if model.startswith("resnet") else {}
    return build(model, seed=seed, **options)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_run(model: str, recipe: Recipe, data: RecipeData, *, seed: int = 0, device: str = "cpu",
              out: Optional[Path] = None, amp: bool = False, channels_last: bool = False, blocks: Any = "auto",
              on_iteration: Optional[Callable[[int], None]] = None) -> RecipeRun:
    """Train ``model`` by ``recipe`` on ``data``; the data order and the weights both follow ``seed``.

    ``amp`` runs the forward under bfloat16 autocast on CUDA (no loss scaling needed); ``channels_last`` stores
    images and weights channels-last (faster convolutions on recent GPUs). Records stream to ``out`` when given.
    """
    import pandas as pd

    torch_device = torch.device(device)
    net = build_net(model, recipe, seed).to(torch_device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    config = dict(getattr(net, "gradscope_config", {}))
    config.update(recipe=recipe.name, seed=seed, batch_size=recipe.batch_size, image_size=32)
    optimizer = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    warm = WarmUp(recipe, int(config.get("depth", 0)))
    loss_fn = nn.CrossEntropyLoss()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and torch_device.type == "cuda"
                else nullcontext())
    stream = batches(data, recipe, seed)
    rows: List[tuple] = []
    name = run_name(model, seed)
    net.train()
    scope = attach(net, blocks=blocks, every=recipe.record_every, optimizer=optimizer, on_nonfinite="ignore",
                   out=None if out is None else Path(out) / "train")
    try:
        for iteration in range(recipe.iterations):
            lr = recipe.lr_at(iteration, warm.active)
            _set_lr(optimizer, lr)
            x, y = next(stream)
            x, y = x.to(torch_device, non_blocking=True), y.to(torch_device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = net(x)
                loss = loss_fn(logits.float(), y)
            loss.backward()
            scope.step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            batch_error = float((logits.detach().argmax(1) != y).float().mean())
            warm.update(iteration, batch_error)
            val = test = math.nan
            if (iteration + 1) % recipe.eval_every == 0 or iteration + 1 == recipe.iterations:
                val = error_rate(net, data.val_x, data.val_y, torch_device, channels_last=channels_last)
                test = error_rate(net, data.test_x, data.test_y, torch_device, channels_last=channels_last)
            rows.append((name, iteration, loss_value, 1.0 - batch_error, lr, val, test))
            if on_iteration is not None:
                on_iteration(iteration)
            if not math.isfinite(loss_value):
                break  # a diverged run: keep what it recorded; its curves end where it stopped
    finally:
        scope.detach()
    frame = scope.frame()
    frame[S.RUN], frame[S.MODEL], frame[S.SEED] = name, model, seed
    frame[S.BN], frame[S.RESIDUAL] = config.get("bn"), config.get("residual")
    frame[S.SHORTCUT], frame[S.INIT] = config.get("shortcut"), config.get("init")
    return RecipeRun(frame=frame, losses=pd.DataFrame(rows, columns=list(LOSS_COLUMNS)), config=config,
                     warmup_ended_at=warm.ended_at)


def run_name(model: str, seed: int) -> str:
    return f"{model}-s{seed}"


def curves(losses: Any, configs: Dict[str, Dict[str, Any]]) -> Any:
    """Fig. 6's curves from per-iteration losses: one row per evaluation point of each run.

    ``train_error``/``train_loss`` are the means over the iterations since the previous point (1 - accuracy of
    each mini-batch); ``val_error``/``test_error`` are the evaluation after the point's iteration. ``configs``
    gives each run's model and seed.
    """
    import pandas as pd

    out = []
    for run, rows in losses.groupby(S.RUN, sort=False):
        rows = rows.sort_values(S.STEP)
        points = rows["test_error"].notna().to_numpy()
        interval = points[::-1].cumsum()[::-1]  # rows up to and including a point share its interval number
        for _, group in rows.groupby(-interval, sort=True):
            last = group.iloc[-1]
            if not math.isfinite(float(last["test_error"])):
                continue  # iterations after the last evaluation (a run stopped early)
            config = configs.get(run, {})
            out.append((run, config.get("name", run), config.get("seed"), int(last[S.STEP]) + 1, float(last["lr"]),
                        float(group["loss"].mean()), float(1 - group["accuracy"].mean()), float(last["val_error"]),
                        float(last["test_error"])))
    return pd.DataFrame(out, columns=list(CURVE_COLUMNS))


def table6(curves: Any) -> Any:
    """Final test error (%) per model, mean and std over seeds, beside the paper's Table 6 where it has one."""
    import pandas as pd

    from gradscope.study.recipe import PAPER_TEST_ERROR

    last = curves.sort_values("iteration").groupby(S.RUN).tail(1)
    rows = []
    for model, group in last.groupby("model", sort=False):
        errors = 100 * group["test_error"].astype(float)
        paper = PAPER_TEST_ERROR.get(model, math.nan)
        rows.append((model, len(errors), float(errors.mean()), float(errors.std(ddof=1)) if len(errors) > 1
                     else math.nan, paper, float(errors.mean()) - paper))
    return pd.DataFrame(rows, columns=["model", "runs", "test_error", "test_error_sd", "paper", "difference"])
