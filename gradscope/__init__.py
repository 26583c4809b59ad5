"""gradscope: see how forward signals and backward gradients travel through every block of a PyTorch model.

The public API is what this module exports (see ``__all__``); everything else is an implementation detail.
``import gradscope`` pulls in torch only: pandas loads when a frame is built, seaborn/matplotlib when a report is
drawn, rich in the CLI.
"""
from __future__ import annotations

import importlib
from typing import Any

from gradscope.errors import GradscopeError
from gradscope.engine.alerts import Alert, AlertRules, AnomalyError
from gradscope.engine.attach import attach
from gradscope.engine.scope import NonFiniteError, Scope
from gradscope.engine.sites import Site, find_blocks

from gradscope.schema import __version__

_LAZY_MODULES = ("analysis", "data", "models", "schema", "testing", "theory")


#: Public functions that live in the pandas/plotting layers, loaded on first use (PEP 562) so that
#: ``import gradscope`` and ``attach()`` need torch only; the attribute IS the real function, so ``help()``, IDEs and
#: ``inspect.signature`` show its real arguments.
_LAZY_FUNCTIONS = {
    "compare": ("gradscope.analysis.compare", "compare"),  # two configurations, block by block, against seed noise
    "load": ("gradscope.store", "load"),                 # records streamed by attach(out=DIR) -> one DataFrame
    "profile": ("gradscope.pipeline", "profile"),        # the claim check (gradscope profile) -> Results
    "report": ("gradscope.render.report", "write_report"),  # a report folder for a frame
    "sweep": ("gradscope.study.sweep", "sweep"),            # a width/depth coordinate check with fitted exponents
    "verdicts": ("gradscope.agreement", "verdicts"),     # vanishing / healthy / exploding / diverged, with theory
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_FUNCTIONS:
        module, attr = _LAZY_FUNCTIONS[name]
        function = getattr(importlib.import_module(module), attr)
        globals()[name] = function  # later look-ups skip __getattr__
        return function
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
    "compare",
    "find_blocks",
    "load",
    "profile",
    "report",
    "sweep",
    "verdicts",
])


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_FUNCTIONS))
