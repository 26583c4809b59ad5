"""Hugging Face ``Trainer`` callback: gradscope inside ``transformers.Trainer``.

    from gradscope.integrations.transformers import GradscopeCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradscopeCallback(out="runs/exp1")])

Where it hooks (transformers 5.x; the same hooks exist from 4.41 on):

- ``on_train_begin``: attaches to the model the Trainer holds (under DDP, the module inside the wrapper:
  statistics are combined over ranks; the main process writes), with its optimizer (``update_ratio``) and, under
  fp16 AMP, the accelerator's ``GradScaler``.
- a forward hook on the model keeps each training forward's loss (when the model computes it from the labels), so
  the step's loss (as the Trainer reports it) reaches ``loss_spike``, ``divergence``, ``scope.losses()`` and
  ``out/records``.
- ``on_pre_optimizer_step``: closes the step, right before ``optimizer.step()``. The Trainer calls it after the
  backward passes of all accumulation micro-batches and **after its own gradient clipping** (``max_grad_norm``,
  default 1.0, which also unscales fp16 gradients): ``param_grad_norm`` is the clipped gradient (each block's norm
  times ``min(1, max_grad_norm / total_norm)``), while ``grad_norm``/``grad_in_norm`` are measured during backward,
  before any clipping. For unclipped parameter-gradient norms train with ``max_grad_norm=0``; the Trainer's own
  logged ``grad_norm`` is the total norm before clipping.
- ``on_train_end``: detaches, writes the report to ``out`` and completes ``provenance.json``. The Trainer has no
  exception callback: the records streamed to ``out/records/`` are flushed at interpreter exit, or call
  :meth:`GradscopeCallback.close` in a ``finally``.

Needs ``transformers`` (``pip install 'torch-gradscope[transformers]'``).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from gradscope.integrations import require
from gradscope.integrations.common import Session, compact_scalars

_hf = require("transformers", "transformers")


class GradscopeCallback(_hf.TrainerCallback):
    """Record per-block statistics of a ``transformers.Trainer`` run.

    Args:
        blocks, every, metrics: as for :func:`gradscope.attach` (``"auto"`` finds ``transformer.h.N`` and the like).
        out: a folder for the records (``out/records/``), the report and ``provenance.json``; None keeps the
            rows in memory only (:meth:`frame`).
        log: also put a compact set of scalars (min and max over blocks of ``act_var``, ``grad_norm``,
            ``param_grad_norm``, ``update_ratio``; the non-finite count) into the Trainer's next log entry:
            ``state.log_history``, the printed logs and the ``report_to`` trackers (TensorBoard, wandb, MLflow,
            ...) see them. The Trainer calls its trackers before user callbacks, so this callback moves itself
            ahead of them when the Trainer is built (or when training starts, for one added with
            ``trainer.add_callback``); :meth:`attach_to` does the same for a Trainer built without it.
        sinks: tracker sinks (:mod:`gradscope.integrations`) fed each recorded step's rows.
        report: write the report to ``out`` when training ends (default True).
        **options: further :func:`gradscope.attach` options (``on_nonfinite``, ``flush_every``, ...).
    """

    def __init__(self, blocks: Any = "auto", every: Any = 1, out: Union[str, Path, None] = None, *,
                 log: bool = False, metrics: Optional[Sequence[str]] = None, sinks: Iterable[Any] = (),
                 report: bool = True, **options: Any) -> None:
        self._log = log
        self._pending: dict = {}
        self._writer = True
        self._loss_hook: Any = None  # a forward hook on the model: each training forward's loss
        self.session = Session("transformers", blocks=blocks, every=every, out=out, metrics=metrics, sinks=sinks,
                               report=report, options=options)

    @property
    def scope(self) -> Any:
        """The live :class:`gradscope.Scope` while training (None before and after)."""
        return self.session.scope

    def frame(self) -> Any:
        """Everything recorded, as :meth:`gradscope.Scope.frame` (also after training)."""
        return self.session.frame()

    def losses(self) -> Any:
        """The loss of each recorded step (``{step: loss}``), as :meth:`gradscope.Scope.losses` (also after
        training)."""
        return self.session.run_losses()

    def close(self, error: Optional[BaseException] = None) -> Optional[Path]:
        """End the recording now (rows kept, report written): for a ``finally`` around ``trainer.train()``."""
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        return self.session.finish(error, writer=self._writer)

    def attach_to(self, trainer: Any) -> "GradscopeCallback":
        """Add this callback to ``trainer`` ahead of its ``report_to`` trackers; returns the callback.

        ``GradscopeCallback(log=True).attach_to(trainer)`` is the one line for a Trainer built without it.
        """
        handler = trainer.callback_handler
        if self not in handler.callbacks:
            handler.callbacks.append(self)
        _ahead_of_trackers(self, handler.callbacks)
        return self

    # ---- Trainer events ------------------------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._go_first(sys._getframe(1))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        self._go_first(sys._getframe(1))
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        self._writer = bool(state.is_world_process_zero)
        extra = [self._collect] if self._log else []
        self.session.start(model, optimizer=inner, scaler=getattr(optimizer, "scaler", None), writer=self._writer,
                           config=_args_config(args), seeds={"args.seed": args.seed, "args.data_seed": args.data_seed},
                           extra_sinks=extra)
        if self._loss_hook is not None:
            self._loss_hook.remove()
        self._loss_hook = model.register_forward_hook(self._keep_loss, with_kwargs=True) if model is not None \
            else None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.step()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if logs is not None and self._pending:
            logs.update(self._pending)
            if state.log_history:  # the Trainer appended a copy of this entry before calling back
                state.log_history[-1].update(self._pending)
            self._pending = {}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def _keep_loss(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        """A training forward's loss, when the model computed it (labels given): a ``ModelOutput`` or dict with a
        ``loss``. The Trainer divides it for the accumulation unless the model normalised it by the whole step's
        ``num_items_in_batch``; a loss computed outside the model (``compute_loss_func``, label smoothing) is not
        seen, and then no loss is given; an overridden ``compute_loss`` that changes the model's loss is not seen
        either (the model's own is given)."""
        if self.session.scope is None:  # the run ended (an exception the Trainer has no event for): let go
            if self._loss_hook is not None:
                self._loss_hook.remove()
                self._loss_hook = None
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.session.losses.add(loss, summed=kwargs.get("num_items_in_batch") is not None)

    def _go_first(self, caller: Any) -> None:
        """Move ahead of the tracker callbacks in the list of the ``CallbackHandler`` calling this event.

        The handler is the caller's ``self`` (``CallbackHandler.call_event``); moving within the list it is
        iterating is safe: this callback goes to an earlier index, every later callback keeps its index.
        """
        handler = caller.f_locals.get("self") if caller is not None else None
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and self in callbacks:
            _ahead_of_trackers(self, callbacks)
        elif self._log:
            warnings.warn("gradscope: could not find the Trainer's callback list; the report_to trackers may not "
                          "see the log=True scalars: use GradscopeCallback(...).attach_to(trainer)",
                          RuntimeWarning, stacklevel=3)

    def _collect(self, rows: Any) -> None:
        for _, values in sorted(compact_scalars(rows).items()):
            self._pending.update(values)


def _is_tracker(callback: Any) -> bool:
    """A ``report_to`` callback: one of the Trainer's integrations (TensorBoard, wandb, MLflow, Comet, ...)."""
    return type(callback).__module__.startswith("transformers.integrations")


def _ahead_of_trackers(callback: Any, callbacks: list) -> None:
    """Move ``callback`` (in ``callbacks``) to just before the first tracker, if a tracker comes before it."""
    first = next((i for i, c in enumerate(callbacks) if _is_tracker(c)), None)
    if first is not None and callbacks.index(callback) > first:
        callbacks.remove(callback)
        callbacks.insert(first, callback)


def _args_config(args: Any) -> dict:
    """The TrainingArguments that shape what gradscope records."""
    names = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
             "max_grad_norm", "learning_rate", "fp16", "bf16", "seed", "world_size")
    return {n: getattr(args, n, None) for n in names}
