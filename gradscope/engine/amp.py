"""The GradScaler adapter: the loss scale hooks divide by, and whether parameter gradients still carry it.

A ``torch.amp.GradScaler`` multiplies the loss, so every gradient a hook sees is scaled. Gradient hooks divide by the
scale read on the device when backward ran (no synchronisation); parameter gradients read at ``scope.step()`` are
divided too unless ``scaler.unscale_``/``scaler.step`` already unscaled them.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from gradscope.errors import GradscopeError


class ScalerState:
    """Tracks one GradScaler (or none) beside one optimizer (or none) across a step."""

    def __init__(self, scaler: Any = None, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise GradscopeError(f"scaler={type(scaler).__name__} is not a GradScaler; pass torch.amp.GradScaler")
        self.scaler = scaler
        self.optimizer = optimizer
        self.opt_stepped = False  # optimizer.step() ran since the last scope.step() (then grads are unscaled)

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

    def note_optimizer_step(self, *args: Any) -> None:
        """An optimizer step pre-hook: ``scaler.step()`` unscales the gradients before it calls ``optimizer.step()``."""
        self.opt_stepped = True

    def end_step(self) -> None:
        """A new step begins."""
        self.opt_stepped = False

    def grads_still_scaled(self, grad_scale: Optional[torch.Tensor]) -> bool:
        """Parameter gradients hold the loss scale unless ``scaler.unscale_``/``scaler.step`` ran on them already
        (known only when ``optimizer=`` was given; otherwise gradscope assumes ``scope.step()`` came first).
        ``grad_scale`` is the scale this step's backward saw (None: no scaled backward ran)."""
        if grad_scale is None:
            return False
        if self.optimizer is None:
            return True
        if self.opt_stepped:
            return False
        states = getattr(self.scaler, "_per_optimizer_states", {})
        stage = states.get(id(self.optimizer), {}).get("stage")
        return stage is None or getattr(stage, "name", str(stage)) == "READY"
