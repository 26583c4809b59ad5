"""Lightning callback: gradscope inside ``lightning.Trainer``.

    from gradscope.integrations.lightning import GradscopeCallback
    trainer = lightning.Trainer(callbacks=[GradscopeCallback(every=10, out="runs/exp1", log=True)])

Where it hooks (Lightning 2.x):

- ``on_fit_start``: attaches to the ``LightningModule`` (under DDP, the module inside the wrapper: statistics are
  combined over ranks; rank 0 writes), with the trainer's optimizer (``update_ratio``) and, under 16-bit AMP, its
  ``GradScaler``.
- ``on_before_backward``: keeps each micro-batch's loss (automatic optimization; Lightning's division by
  ``accumulate_grad_batches`` and AMP's loss scale undone), so the step's loss (the mean of its micro-batch losses)
  reaches ``loss_spike``, ``divergence``, ``scope.losses()`` and ``out/records``.
- ``on_before_optimizer_step``: closes the step. Lightning calls it after backward (and after the DDP all-reduce
  and the gradient accumulation), after ``scaler.unscale_`` under AMP and *before* its own gradient clipping
  (``gradient_clip_val``): ``param_grad_norm`` is the unclipped, unscaled, global gradient; activation-gradient
  norms are divided by the loss scale as they are recorded.
- ``on_train_batch_start`` of a batch Lightning runs without backward (``StochasticWeightAveraging``'s last epoch,
  which refreshes BatchNorm statistics): the run is over; detach and write the report then.
- ``on_fit_end`` and ``on_exception``: detach (the rows recorded so far are kept), write the report to ``out``
  (``report.html``, ``records.parquet``, ...; ``records/`` holds the parts streamed while training) and complete
  ``provenance.json``.

A step is one step of the (first) optimizer: any gradient accumulation; with several optimizers each block's
``update_ratio`` is measured across the step of the optimizer that holds its parameters. Under manual optimization
(``automatic_optimization = False``: GANs) a step is one training batch, closed in ``on_train_batch_end`` with the
loss ``training_step`` returned (none when it returned none: a GAN's two losses are not one step's loss), and each
block's ``param_grad_norm`` is read at the step of the optimizer that holds it (in its ``on_before_optimizer_step``),
so it is the gradient that optimizer stepped with. Under automatic optimization with a closure optimizer (LBFGS)
Lightning calls ``on_before_optimizer_step`` after every evaluation of the closure, so each evaluation is a step of
its own (up to ``max_iter`` per optimizer step). Needs ``lightning``
(``pip install 'torch-gradscope[lightning]'``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from gradscope import schema as S
from gradscope.errors import GradscopeError
from gradscope.integrations import require
from gradscope.integrations.common import Session, by_step, compact_scalars

_pl = require("lightning.pytorch", "lightning")


class GradscopeCallback(_pl.Callback):
    """Record per-block statistics of a ``lightning.Trainer`` run.

    Args:
        blocks, every, metrics: as for :func:`gradscope.attach`.
        out: a folder for the records (``out/records/``), the report and ``provenance.json``; None keeps the
            rows in memory only (:meth:`frame`).
        log: what goes to the trainer's loggers (CSV, TensorBoard, wandb, ...) at each recorded step:
            ``False`` nothing; ``True`` (or ``"compact"``) a few scalars (min and max over blocks of ``act_var``,
            ``grad_norm``, ``param_grad_norm``, ``update_ratio``; the count of non-finite outputs);
            ``"blocks"`` one series per block and metric, ``gradscope/<metric>/<block>`` (``:callN`` for a
            module's later calls), as Lightning's ``grad_norm`` logs one per layer; a list of metric names: the
            per-block series of those metrics only (e.g. ``log=["grad_norm", "act_var"]``).
        sinks: tracker sinks (:mod:`gradscope.integrations`) fed each recorded step's rows.
        report: write the report to ``out`` when fitting ends (default True).
        **options: further :func:`gradscope.attach` options (``on_nonfinite``, ``flush_every``, ...).
    """

    def __init__(self, blocks: Any = "auto", every: Any = 1, out: Union[str, Path, None] = None, *,
                 log: Union[bool, str, Sequence[str]] = False, metrics: Optional[Sequence[str]] = None, sinks: Iterable[Any] = (),
                 report: bool = True, **options: Any) -> None:
        super().__init__()
        self._log = log_mode(log)
        self.session = Session("lightning", blocks=blocks, every=every, out=out, metrics=metrics, sinks=sinks,
                               report=report, options=options)
        self._trainer: Any = None
        self._first: Any = None

    # ---- results -------------------------------------------------------------------------------------------------
    @property
    def scope(self) -> Any:
        """The live :class:`gradscope.Scope` while fitting (None before and after)."""
        return self.session.scope

    def frame(self) -> Any:
        """Everything recorded, as :meth:`gradscope.Scope.frame` (also after fitting)."""
        return self.session.frame()

    def losses(self) -> Any:
        """The loss of each recorded step (``{step: loss}``), as :meth:`gradscope.Scope.losses` (also after
        fitting)."""
        return self.session.run_losses()

    # ---- Lightning hooks -----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        self._trainer = trainer
        self._first = optimizers[0] if optimizers else None
        extra = [self._log_rows] if self._log else []
        self.session.start(pl_module, optimizer=optimizers or None,
                           scaler=getattr(trainer.precision_plugin, "scaler", None),
                           writer=trainer.is_global_zero, config=_trainer_config(trainer), extra_sinks=extra,
                           seeds={"PL_GLOBAL_SEED": os.environ.get("PL_GLOBAL_SEED")})

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # a batch Lightning runs without backward (StochasticWeightAveraging's last epoch, which only refreshes the
        # BatchNorm statistics of the averaged weights; it sets the flag in its own epoch-start hook, which may run
        # after this callback's) trains nothing: the run is over, and its forwards are not a training step
        # (recorded, they made a step of forwards with the last step's gradients read again)
        if self.session.scope is not None and getattr(trainer.fit_loop, "_skip_backward", False):
            self.session.finish(writer=trainer.is_global_zero)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        # automatic optimization: the closure's loss, divided by accumulate_grad_batches (also in an epoch's last,
        # shorter accumulation) and, under 16-bit AMP, already multiplied by the GradScaler's scale: both are
        # undone, so the step's loss is the mean of its micro-batches' own losses (manual optimization may run
        # several backwards of different losses in one batch: its step's loss is what training_step returned)
        if pl_module.automatic_optimization:
            self.session.losses.add(own_loss(loss, trainer), summed=False)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not pl_module.automatic_optimization:
            # manual optimization: each optimizer's gradient is read now, at its own step (another optimizer's
            # backward may add to it, or zero_grad/toggle_optimizer clear it, before the batch ends); the step
            # closes at the end of the batch (on_train_batch_end)
            if self.session.scope is not None:
                self.session.scope._read_grads_of(optimizer)
            return
        # with several optimizers a step is the first optimizer's step
        if getattr(optimizer, "_optimizer", optimizer) is self._first:
            self.session.step()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not pl_module.automatic_optimization:
            # manual optimization: the step's loss is the one training_step returned (Lightning hands it over as
            # outputs["loss"], detached); a step that returned none (a GAN's two losses) gets none
            loss = returned_loss(outputs)
            if loss is not None:
                self.session.losses.add(loss, summed=True)
            self.session.step()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.finish(writer=trainer.is_global_zero)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.finish(exception, writer=trainer.is_global_zero)

    def _log_rows(self, rows: Any) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.loggers:
            return
        if self._log == "compact":
            series = compact_scalars(rows)
        else:
            series = by_step(rows if self._log == "blocks" else rows[rows[S.METRIC].isin(self._log)])
        for step, values in series.items():
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)


def own_loss(loss: Any, trainer: Any) -> Any:
    """The micro-batch's loss as ``training_step`` returned it, from the one Lightning hands ``on_before_backward``
    (divided by ``accumulate_grad_batches``; under 16-bit AMP multiplied by the scaler's scale, read as a tensor:
    no synchronisation)."""
    loss = loss.detach() * getattr(trainer, "accumulate_grad_batches", 1)
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    scale = getattr(scaler, "_scale", None) if scaler is not None and getattr(scaler, "is_enabled", bool)() else None
    return loss / scale.to(loss.device) if scale is not None else loss


def returned_loss(outputs: Any) -> Any:
    """The loss ``training_step`` returned under manual optimization (``outputs["loss"]`` of
    ``on_train_batch_end``, a tensor or a bare tensor returned), or None when it returned none or no single
    number (a loss of several elements is not a step's loss)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    if hasattr(loss, "detach") and hasattr(loss, "numel") and loss.numel() == 1:
        return loss.detach().reshape(())
    return None


def log_mode(log: Any) -> Any:
    """``log=`` checked: False, ``"compact"``, ``"blocks"`` or a tuple of metric names (GradscopeError otherwise)."""
    if log is True or log == "compact":
        return "compact"
    if log is False or log is None:
        return False
    if log == "blocks":
        return "blocks"
    names = [log] if isinstance(log, str) else list(log) if isinstance(log, (list, tuple, set)) else None
    unknown = [m for m in names or [log] if m not in S.ALL_METRICS]
    if names is None or unknown or not names:
        raise GradscopeError(f"log={log!r}: pass True (a few min/max scalars), 'blocks' (every block's series) or "
                             f"a list of metrics from {', '.join(S.ALL_METRICS)}")
    return tuple(names)


def _trainer_config(trainer: Any) -> dict:
    """The trainer settings that shape what gradscope records."""
    names = ("max_steps", "max_epochs", "accumulate_grad_batches", "gradient_clip_val", "precision", "world_size",
             "num_devices", "strategy")
    out = {}
    for name in names:
        value = getattr(trainer, name, None)
        if name == "precision":
            value = getattr(trainer.precision_plugin, "precision", value)
        out[name] = value if isinstance(value, (int, float, str, type(None))) else type(value).__name__
    return out
