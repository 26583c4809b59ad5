"""The GradScaler adapter: the loss scale hooks divide by, and whether parameter gradients still carry it.

A ``torch.amp.GradScaler`` multiplies the loss, so every gradient a hook sees is scaled. Gradient hooks divide by the
scale read on the device when backward ran (no synchronisation); parameter gradients read at ``scope.step()`` are
divided too unless ``scaler.unscale_``/``scaler.step`` already unscaled them.

Whether they did is read from two facts. Before ``scaler.update()``, the scaler's own stage for the optimizer
(``READY``: still scaled). After it the stage is forgotten, so the optimizer's step post-hook keeps a token of the
gradients it stepped with (a weak reference to one ``.grad`` and its version counter): the same tensor at the same
version at ``scope.step()`` means no backward has run since, so ``scaler.step`` unscaled them. A flag set by the
optimizer step and cleared by ``scope.step()`` cannot tell this: in the loop ``backward, scope.step(),
scaler.step(opt), scaler.update()`` it was still set at the next ``scope.step()``, after a new scaled backward, and
``param_grad_norm`` came out multiplied by the scale from the second step on.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Tuple

import torch

from gradscope.errors import GradscopeError


class ScalerState:
    """Tracks one GradScaler (or none) beside one optimizer (or none) across a step."""

    def __init__(self, scaler: Any = None, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise GradscopeError(f"scaler={type(scaler).__name__} is not a GradScaler; pass torch.amp.GradScaler")
        self.scaler = scaler
        self.optimizer = optimizer
        self.stepped: Optional[Tuple[Any, int]] = None  # a token of the gradients optimizer.step() last used

    @property
    def enabled(self) -> bool:
        """Whether a scaler was given (gradient hooks then divide by its scale)."""
        return self.scaler is not None

    def scale_tensor(self) -> Optional[torch.Tensor]:
        """The GradScaler's scale as a device tensor (no sync), or None when it is disabled or not yet set."""
        scaler = self.scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return None
        scale = getattr(scaler, "_scale", None)
        return scale if isinstance(scale, torch.Tensor) else None

    def note_optimizer_step(self, optimizer: Any, *args: Any) -> None:
        """An optimizer step post-hook: ``scaler.step()`` unscaled the gradients before it called
        ``optimizer.step()``; keep a token of them (:func:`grad_token`)."""
        if optimizer is self.optimizer:
            self.stepped = grad_token(optimizer)

    def grads_still_scaled(self, grad_scale: Optional[torch.Tensor]) -> bool:
        """Parameter gradients hold the loss scale unless ``scaler.unscale_``/``scaler.step`` ran on them already
        (known only when ``optimizer=`` was given; otherwise gradscope assumes ``scope.step()`` came first).
        ``grad_scale`` is the scale this step's backward saw (None: no scaled backward ran)."""
        if grad_scale is None:
            return False
        if self.optimizer is None:
            return True
        if self.stepped is not None and same_grads(self.stepped, grad_token(self.optimizer)):
            return False  # the gradients the optimizer stepped with: scaler.step() unscaled them
        states = getattr(self.scaler, "_per_optimizer_states", {})
        stage = states.get(id(self.optimizer), {}).get("stage")
        return stage is None or getattr(stage, "name", str(stage)) == "READY"


def grad_token(optimizer: Any) -> Optional[Tuple[Any, int]]:
    """A weak reference to the first ``.grad`` among ``optimizer``'s parameters and its version counter (None when
    no parameter has one). A backward that accumulates into it bumps the version; one after ``zero_grad()`` makes a
    new tensor (the reference then points elsewhere or is dead)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if grad is not None:
                return weakref.ref(grad), grad._version
    return None


def same_grads(token: Tuple[Any, int], now: Optional[Tuple[Any, int]]) -> bool:
    """Whether two tokens name the same gradient tensor, unchanged since the first was taken."""
    if now is None:
        return False
    kept = token[0]()
    return kept is not None and kept is now[0]() and token[1] == now[1]
