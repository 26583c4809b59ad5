"""The GradScaler adapter: the loss scale hooks divide by, and whether parameter gradients still carry it.

A ``torch.amp.GradScaler`` multiplies the loss, so every gradient a hook sees is scaled. Gradient hooks divide by the
scale read on the device when backward ran (no synchronisation); parameter gradients read at ``scope.step()`` are
divided too unless ``scaler.unscale_``/``scaler.step`` already unscaled them.

Whether they did is read from three facts. Before ``scaler.update()``, the scaler's own stage for the optimizer
(``READY``: still scaled). After it the stage is forgotten, so each optimizer's step post-hook keeps a token of the
gradients it stepped with (a weak reference to one ``.grad`` and its version counter): the same tensor at the same
version at ``scope.step()`` means no backward has run since, so ``scaler.step`` unscaled them. And a scale that
changed since the backward means ``update()`` ran after it, so ``unscale_`` did, even in a step ``scaler.step``
skipped for an inf (no optimizer hook runs then); that check stays on the device. A flag set by the
optimizer step and cleared by ``scope.step()`` cannot tell this: in the loop ``backward, scope.step(),
scaler.step(opt), scaler.update()`` it was still set at the next ``scope.step()``, after a new scaled backward, and
``param_grad_norm`` came out multiplied by the scale from the second step on.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from gradscope.errors import GradscopeError


class ScalerState:
    """Tracks one GradScaler (or none) beside the given optimizers (maybe none) across a step."""

    def __init__(self, scaler: Any = None, optimizers: Sequence[Any] = ()) -> None:
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise GradscopeError(f"scaler={type(scaler).__name__} is not a GradScaler; pass torch.amp.GradScaler")
        self.scaler = scaler
        self.optimizers = list(optimizers)
        self.stepped: Dict[int, Tuple[Any, int]] = {}  # id(optimizer) -> a token of the gradients it last used

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
        """An optimizer step post-hook (installed only with a scaler): ``scaler.step()`` unscaled the gradients
        before it called ``optimizer.step()``; keep a token of them (:func:`grad_token`)."""
        token = grad_token(optimizer)
        if token is not None:
            self.stepped[id(optimizer)] = token

    def grads_still_scaled(self, grad_scale: Optional[torch.Tensor], optimizer: Any = None) -> bool:
        """Parameter gradients hold the loss scale unless ``scaler.unscale_``/``scaler.step`` ran on them already
        (known only when ``optimizer=`` was given; otherwise gradscope assumes ``scope.step()`` came first).
        ``grad_scale`` is the scale this step's backward saw (None: no scaled backward ran). ``optimizer``: the one
        whose gradients are read (at its own step); None for all of them at ``scope.step()``, where the gradients
        one of them stepped with count as unscaled, as ``scaler.step`` left them, and the scaler's stage is read
        for the first. Why the one being read: Lightning's AMP calls ``scaler.update()`` after each optimizer's
        step, which forgets the first one's stage, so a GAN's second optimizer was divided by the scale twice."""
        if grad_scale is None:
            return False
        if not self.optimizers:
            return True
        mine = self.optimizers if optimizer is None else [optimizer]
        for opt in mine:
            kept = self.stepped.get(id(opt))
            if kept is not None and same_grads(kept, grad_token(opt)):
                return False  # the gradients an optimizer stepped with: scaler.step() unscaled them
        states = getattr(self.scaler, "_per_optimizer_states", {})
        stage = states.get(id(mine[0]), {}).get("stage")
        return stage is None or getattr(stage, "name", str(stage)) == "READY"

    def still_in_grads(self, grad_scale: torch.Tensor) -> torch.Tensor:
        """The divisor for gradients :meth:`grads_still_scaled` calls scaled: ``grad_scale``, or 1 where the
        scaler's scale has changed since that backward. A changed scale means ``scaler.update()`` ran after it, so
        ``unscale_`` did too, even when ``scaler.step`` skipped the optimizer for an inf (no step hook ran, and
        ``update()`` forgot the stage). Computed on the device: no synchronisation."""
        now = self.scale_tensor()
        if now is None:
            return grad_scale
        now = now.detach().reshape(1).to(grad_scale.device, grad_scale.dtype)
        return torch.where(now == grad_scale, grad_scale, torch.ones_like(grad_scale))


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
