"""The non-finite policy: where NaN/Inf first appeared, and whether to warn, raise or stay quiet."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

from gradscope import schema as S
from gradscope.errors import GradscopeError
from gradscope.engine.sites import Site

NONFINITE_POLICIES = ("warn", "raise", "ignore")


class NonFiniteError(GradscopeError, FloatingPointError):
    """Raised by ``Scope.step()`` under ``on_nonfinite="raise"``, after the step's records are kept."""


class NonFinitePolicy:
    """Remembers the first forward and backward NaN/Inf of a scope and applies ``on_nonfinite`` to new ones."""

    def __init__(self, policy: str, sites: List[Site]) -> None:
        if policy not in NONFINITE_POLICIES:
            raise GradscopeError(f"on_nonfinite={policy!r} is not one of {NONFINITE_POLICIES}")
        self.policy = policy
        self.sites = sites
        self.first: Dict[str, Tuple[Any, ...]] = {}
        self._warned = False
        #: ``trace(step, block) -> OpOrigin``: names the operator of the first forward NaN/Inf (engine/oporigin.py)
        self.trace: Optional[Callable[[int, str], Any]] = None
        self.origin: Any = None

    def check(self, rows: Any, start: int, depth: Dict[int, int]) -> None:
        """Look at the rows from ``start`` on; raise :class:`NonFiniteError` or warn once for new findings."""
        found = first_nonfinite_rows(rows, start, depth, self.sites)
        new = {k: v for k, v in found.items() if k not in self.first}
        if not new:
            return
        self.first.update(new)
        if "forward" in new and self.trace is not None and self.origin is None:
            self.origin = self.trace(*new["forward"])
            if self.origin.op is not None:
                self.first["operator"] = (self.origin.step, self.origin.op, self.origin.module)
        where = {k: v for k, v in self.first.items() if k in ("forward", "backward")}
        if self.policy == "raise":
            raise NonFiniteError("gradscope: non-finite values: " + "; ".join(
                f"{d} pass first at block {b!r}, step {s}" for d, (s, b) in where.items()) + self._made_by())
        if self.policy == "warn" and not self._warned:
            self._warned = True
            warn_nonfinite({k: v for k, v in new.items() if k in where}, self._made_by())

    def _made_by(self) -> str:
        return "" if self.origin is None else f"; made by {self.origin}"


def _all_finite(rows: Any, start: int) -> bool:
    """Whether ``rows[start:]`` hold no non-finite value and no positive ``act_nonfinite`` count (the usual step).

    A finite sum of all values proves every value finite (a NaN or Inf makes the sum non-finite; a finite sum that
    overflows to Inf only sends the rows to the full scan). One C-level sum and one pass over the metric names
    replace a scan that costs about a microsecond per row at every recorded step."""
    values = rows.value[start:]
    if not math.isfinite(sum(values)):
        return False
    return not any(v > 0 for m, v in zip(rows.metric[start:], values) if m == S.ACT_NONFINITE)


def first_nonfinite_rows(rows: Any, start: int, depth: Dict[int, int],
                         sites: List[Site]) -> Dict[str, Tuple[int, str]]:
    """``{"forward": (step, block), "backward": (step, block)}`` of the first NaN/Inf among ``rows[start:]``.

    The backward pass counts activation gradients (``grad_norm``, ``grad_in_norm``) and parameter gradients
    (``param_grad_norm``: an fp16 weight gradient overflows while the activation gradients stay finite). Within a
    step, a non-finite activation gradient names the block before any parameter gradient does: a parameter gradient
    is also non-finite wherever the block's forward input was, so it pinpoints less well.
    """
    if _all_finite(rows, start):
        return {}
    fwd: Optional[Tuple[int, int, int]] = None
    bwd: Optional[Tuple[int, int, int, int, int]] = None
    for i in range(start, len(rows)):
        metric, value = rows.metric[i], rows.value[i]
        site, step = rows.site[i], rows.step[i]
        d = depth.get(site, 0)
        if metric == S.ACT_NONFINITE and value > 0:
            key = (step, d, site)
            fwd = key if fwd is None or key < fwd else fwd
        elif metric in (S.GRAD_NORM, S.GRAD_IN_NORM) and not math.isfinite(value):
            # backward runs from the last block to the first: the deepest block whose gradient is non-finite at its
            # input (grad_in_norm) or output (grad_norm) is where it arose; at the input first, since a NaN born
            # inside block k reaches k's input and block k-1's output, never k's own output
            key = (step, 0, -d, 0 if metric == S.GRAD_IN_NORM else 1, site)
            bwd = key if bwd is None or key < bwd else bwd
        elif metric == S.PARAM_GRAD_NORM and not math.isfinite(value):
            key = (step, 1, -d, 0, site)
            bwd = key if bwd is None or key < bwd else bwd
    found = {}
    if fwd is not None:
        found["forward"] = (fwd[0], sites[fwd[2]].name)
    if bwd is not None:
        found["backward"] = (bwd[0], sites[bwd[4]].name)
    return found


def warn_nonfinite(first: Dict[str, Tuple[int, str]], made_by: str = "") -> None:
    """Tell the user, once, where the first NaN/Inf appeared (``made_by``: the operator, when traced)."""
    parts = [f"{direction} pass: block {block!r} at step {step}" for direction, (step, block) in first.items()]
    warnings.warn("gradscope: first NaN/Inf seen in the " + "; ".join(parts) + made_by, RuntimeWarning, stacklevel=3)
