"""MLflow sink: each recorded step's rows as metrics ``gradscope/<metric>/<block>`` (with their step) of an MLflow
run, and a heatmap image artifact every N recorded steps. A character MLflow refuses in a key (a block named
``proj(q)``) becomes ``_``, and the key gets a short hash of the original (:func:`mlflow_key`).

    mlflow.set_tracking_uri("file:./mlruns")
    with mlflow.start_run():
        scope = gradscope.attach(model, sinks=[MlflowSink()])

Works with a local file store (MLflow 3 asks for ``MLFLOW_ALLOW_FILE_STORE=true`` to use one) or any tracking
server. Needs ``mlflow`` or ``mlflow-skinny`` (``pip install 'torch-gradscope[mlflow]'``).
"""
from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Optional

from gradscope.errors import GradscopeError
from gradscope.integrations import require
from gradscope.integrations.common import History, scalar_items

_mlflow = require("mlflow", "mlflow")

#: MLflow accepts at most this many metrics per ``log_batch`` call.
BATCH = 1000
#: characters an MLflow metric key may not hold (it takes letters, digits, ``_ - . / :`` and spaces): each becomes
#: ``_``, so that one block named ``proj(q)`` does not make MLflow refuse the whole batch, every block with it
_NOT_A_KEY = re.compile(r"[^\w\-. /:]")


def mlflow_key(key: str) -> str:
    """``key`` with every character MLflow refuses in a metric name replaced by ``_``; a key so changed ends in
    ``-`` and six hex digits of its own hash, so that two names differing only there (``proj(q)`` and ``proj[q]``)
    stay two series, named the same in every run."""
    valid = _NOT_A_KEY.sub("_", key)
    if valid == key:
        return key
    return f"{valid}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


class MlflowSink:
    """Log gradscope rows to an MLflow run (``run_id=None``: the active run).

    Args:
        run_id: the run to log to; ``None`` uses ``mlflow.active_run()`` (call ``mlflow.start_run()`` first).
        client: an ``MlflowClient`` (default: one on the current tracking URI).
        prefix: the first part of every key.
        image_every: every this many recorded steps, log ``prefix/heatmap-<metric>-<step>.png``; 0 for none.
    """

    def __init__(self, run_id: Optional[str] = None, *, client: Any = None, prefix: str = "gradscope",
                 image_every: int = 0) -> None:
        if run_id is None:
            active = _mlflow.active_run()
            if active is None:
                raise GradscopeError("MlflowSink needs an MLflow run: call mlflow.start_run() first or pass run_id=")
            run_id = active.info.run_id
        self.run_id = run_id
        self.client = client if client is not None else _mlflow.tracking.MlflowClient()
        self.prefix = prefix
        self.history = History(image_every)

    def __call__(self, rows: Any) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(key), value, now, step) for key, step, value in scalar_items(rows, self.prefix)]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])
        for metric, step, image in self.history.add(rows):
            self.client.log_image(self.run_id, image, f"{self.prefix}/heatmap-{metric}-{step:06d}.png")

    def close(self) -> None:
        """Nothing to release: the run stays yours to end."""
