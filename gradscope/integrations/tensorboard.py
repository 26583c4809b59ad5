"""TensorBoard sink: each recorded step's rows as scalars ``gradscope/<metric>/<block>`` of a ``SummaryWriter``,
and a block x step heatmap image every N recorded steps.

    from torch.utils.tensorboard import SummaryWriter
    from gradscope.integrations.tensorboard import TensorBoardSink
    scope = gradscope.attach(model, sinks=[TensorBoardSink(SummaryWriter("runs/exp1"), image_every=10)])

Needs the ``tensorboard`` package (``pip install 'torch-gradscope[tensorboard]'``).
"""
from __future__ import annotations

import os
from typing import Any, Union

from gradscope.integrations import require
from gradscope.integrations.common import History, scalar_items

require("tensorboard", "tensorboard")
_tb = require("torch.utils.tensorboard", "tensorboard")


class TensorBoardSink:
    """Write gradscope rows to a TensorBoard ``SummaryWriter`` (or a new one on ``logdir``).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``, or a log folder to open one on (then closed at
            ``close()``; a writer you pass is flushed, not closed).
        prefix: the first part of every tag (``prefix/metric/block``).
        image_every: every this many recorded steps, add ``prefix/heatmap/<metric>`` images (block x step,
            log10) of ``grad_norm`` and ``act_var``; 0 for none.
    """

    def __init__(self, writer: Union[Any, str, "os.PathLike[str]"], *, prefix: str = "gradscope",
                 image_every: int = 0) -> None:
        self._owned = isinstance(writer, (str, os.PathLike))
        self.writer = _tb.SummaryWriter(os.fspath(writer)) if self._owned else writer
        self.prefix = prefix
        self.history = History(image_every)

    def __call__(self, rows: Any) -> None:
        for key, step, value in scalar_items(rows, self.prefix):
            self.writer.add_scalar(key, value, step)
        for metric, step, image in self.history.add(rows):
            self.writer.add_image(f"{self.prefix}/heatmap/{metric}", image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        if self._owned:
            self.writer.close()
