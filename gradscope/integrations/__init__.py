"""Where users already train: callbacks for Lightning and the Hugging Face ``Trainer``, sinks for TensorBoard,
Weights & Biases and MLflow.

Each integration is a submodule that needs its library, installed with the extra of the same name
(``pip install 'torch-gradscope[lightning]'``, ``[transformers]``, ``[tensorboard]``, ``[wandb]``, ``[mlflow]``,
``[all]``). Nothing here is imported by ``import gradscope`` or by ``attach()``.

- :mod:`gradscope.integrations.lightning`: ``GradscopeCallback`` for ``lightning.Trainer``
- :mod:`gradscope.integrations.transformers`: ``GradscopeCallback`` for ``transformers.Trainer``
- :mod:`gradscope.integrations.tensorboard`: ``TensorBoardSink`` (``torch.utils.tensorboard.SummaryWriter``)
- :mod:`gradscope.integrations.wandb`: ``WandbSink`` (offline mode works)
- :mod:`gradscope.integrations.mlflow`: ``MlflowSink``

A sink is a callable ``rows -> None`` (see :mod:`gradscope.engine.sinks`): pass it to ``attach(..., sinks=[...])``
or ``scope.log_to(sink)``, or to a callback's ``sinks=``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from gradscope.errors import GradscopeError

#: The distribution name on the package index (``gradscope`` there is an unrelated project).
DISTRIBUTION = "torch-gradscope"


class MissingExtraError(GradscopeError, ImportError):
    """An integration's library is not installed; the message names the extra that installs it."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` with a one-line message naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"gradscope.integrations.{extra} needs {module!r}, which cannot be imported ({exc.__class__.__name__}: "
            f"{exc}); install it with: pip install '{DISTRIBUTION}[{extra}]'".replace("\n", " ")) from exc


__all__ = ["DISTRIBUTION", "MissingExtraError", "require"]
