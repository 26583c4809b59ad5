"""gradscope: see how forward signals and backward gradients travel through every block of a PyTorch model.

The public API is what this module exports (see ``__all__``); everything else is an implementation detail.
``import gradscope`` pulls in torch only: pandas loads when a frame is built, seaborn/matplotlib when a report is
drawn, rich in the CLI.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Union

from gradscope.errors import GradscopeError
from gradscope.engine.alerts import Alert, AlertRules, AnomalyError
from gradscope.engine.scope import NonFiniteError, Scope, attach
from gradscope.engine.sites import Site, find_blocks

from gradscope.schema import __version__

_LAZY_MODULES = ("analysis", "data", "models", "schema", "theory")


def load(path: Union[str, "os.PathLike[str]"]) -> Any:
    """Read the records that ``attach(..., out=DIR)`` streamed to ``DIR`` back into one DataFrame.

    See :func:`gradscope.store.load`.
    """
    from gradscope.store import load as _load

    return _load(path)


def report(frame: Any, out: Any, **options: Any) -> Any:
    """Write a report folder (records, heatmaps, depth profiles, verdicts, summary.md, report.html) for ``frame``.

    Returns the folder's path. See :func:`gradscope.render.report.write_report` for the options.
    """
    from gradscope.render.report import write_report

    return write_report(frame, out, **options)


def verdicts(frame: Any, **options: Any) -> Any:
    """Classify the forward and backward signal of each run as vanishing, healthy or exploding.

    See :func:`gradscope.agreement.verdicts` (measurement: :func:`gradscope.analysis.verdicts`) for the
    columns, thresholds and options.
    """
    from gradscope.agreement import verdicts as _verdicts

    return _verdicts(frame, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradscope' has no attribute {name!r}")


__all__ = sorted([
    "Alert",
    "AlertRules",
    "AnomalyError",
    "GradscopeError",
    "NonFiniteError",
    "Scope",
    "Site",
    "attach",
    "find_blocks",
    "load",
    "report",
    "verdicts",
])
