"""Weights & Biases sink: each recorded step's rows as ``gradscope/<metric>/<block>`` in a run's history, plotted
against ``gradscope/step``, and a heatmap image every N recorded steps. Offline mode (``WANDB_MODE=offline``)
works: nothing here needs the network.

    run = wandb.init(project="exp", mode="offline")
    scope = gradscope.attach(model, sinks=[WandbSink(run, image_every=10)])

Rows are logged without ``step=``, with ``gradscope/step`` as their x-axis (``define_metric``), the way
Lightning's and the Hugging Face Trainer's W&B loggers do. Each such call advances W&B's internal step, so log your
own metrics the same way, against a step metric of your own (``run.define_metric("loss",
step_metric="train/step")``, then ``run.log({"train/step": i, "loss": ...})``): a ``run.log(..., step=i)`` whose
``i`` lies behind W&B's internal step is dropped by W&B (with a warning that ``WANDB_SILENT`` hides).
Needs ``wandb`` (``pip install 'torch-gradscope[wandb]'``).
"""
from __future__ import annotations

from typing import Any, Optional

from gradscope.errors import GradscopeError
from gradscope.integrations import require
from gradscope.integrations.common import History, by_step

_wandb = require("wandb", "wandb")


class WandbSink:
    """Log gradscope rows to a W&B run (``run=None``: the current ``wandb.run``).

    Args:
        run: a run from ``wandb.init``; ``None`` uses ``wandb.run`` (``wandb.init`` must have been called).
        prefix: the first part of every key.
        image_every: every this many recorded steps, log ``prefix/heatmap/<metric>`` images; 0 for none.
        finish: call ``run.finish()`` at ``close()`` (default: leave the run open for your own logging).
    """

    def __init__(self, run: Optional[Any] = None, *, prefix: str = "gradscope", image_every: int = 0,
                 finish: bool = False) -> None:
        self.run = run if run is not None else _wandb.run
        if self.run is None:
            raise GradscopeError("WandbSink needs a W&B run: call wandb.init(...) first (mode='offline' works "
                                 "without an account) or pass run=")
        self.prefix = prefix
        self.step_key = f"{prefix}/step"
        self.history = History(image_every)
        self._finish = finish
        self.run.define_metric(self.step_key)
        self.run.define_metric(f"{prefix}/*", step_metric=self.step_key)

    def __call__(self, rows: Any) -> None:
        for step, values in by_step(rows, self.prefix).items():
            self.run.log({self.step_key: step, **values})
        for metric, step, image in self.history.add(rows):
            self.run.log({self.step_key: step, f"{self.prefix}/heatmap/{metric}": _wandb.Image(image)})

    def close(self) -> None:
        if self._finish:
            self.run.finish()
