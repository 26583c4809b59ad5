"""The eager gradient hooks: ``grad_norm`` and ``grad_in_norm`` of the tensors a block returns and receives.

A tensor hook registered on a block's output inside its forward hook stays on the autograd node that produced that
value, so it receives d loss / d output even when the tensor is modified in place afterwards (see
:mod:`gradscope.engine.probes`, which registers them). One reduction serves every slot that watches the same
tensor (block k's output is block k+1's input), and a hook on a leaf tensor retires once its step is over.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, List, Optional, Tuple

import torch

from gradscope.engine import spec
from gradscope.engine.metrics import readable, squared_norm
from gradscope.engine.recorder import Recorder
from gradscope.engine.state import StepState


class GradWatch:
    """The gradient hooks of one :class:`~gradscope.engine.probes.Probe` (``owner``: its ``alive`` flag and GradScaler
    ``scale`` are read when a hook runs, so :meth:`Probe.remove` silences pending hooks)."""

    def __init__(self, state: StepState, rec: Recorder, owner: Any) -> None:
        self.state, self.rec, self.owner = state, rec, owner
        self._last: Optional[Tuple[Any, int, List[Tuple[int, int, int, str]]]] = None  # latest hooked tensor
        self._leaf_handles: List[Any] = []  # hooks on leaf tensors that may outlive the scope (removed at close())

    def forget(self) -> None:
        """Share no reduction with a tensor hooked before (the module hooks were removed)."""
        self._last = None

    def close(self) -> None:
        """Remove the hooks still on leaf tensors (the user's inputs and parameters keep none after ``detach()``)."""
        while self._leaf_handles:
            self._leaf_handles.pop().remove()

    def watch(self, t: torch.Tensor, site: int, call: int, metric: str) -> None:
        """Record the gradient norm of ``t`` for (step, site, call, metric), once.

        One tensor hook serves every slot that watches the same tensor: block k's output is block k+1's input (and a
        wrapper returns its child's output), so ``grad_norm`` of one and ``grad_in_norm`` of the next share a single
        reduction, as long as nothing modified the tensor in place in between (its version is unchanged).
        """
        rec, state = self.rec, self.state
        if not state.claim_grad_slot((site, call, metric)):
            return
        target = (state.step, site, call, metric)
        last = self._last
        if last is not None and last[0]() is t and last[1] == t._version and last[2][0][0] == state.step:
            last[2].append(target)
            return
        targets = [target]
        self._last = (weakref.ref(t), t._version, targets)
        owner = self.owner
        scale = owner.scale

        def grad_hook(grad: torch.Tensor) -> None:
            if grad is None or not owner.alive:  # a backward after detach() records nothing
                return None
            state.grads_seen = True
            value = _unscaled(squared_norm(grad), scale, state)
            if readable(value):  # on the CPU a host float is cheaper to keep than a tensor
                value = (value.item(),)
            for step, s, c, name in targets:
                rec.add(step, s, c, (name,), value, grad.numel(), spec.SQNORM)
            return None

        self._register(t, grad_hook)

    def watch_all(self, tensors: List[torch.Tensor], site: int, call: int, metric: str) -> None:
        """Record the norm over the gradients of several tensors (a block input that is a list of tensors)."""
        state, rec = self.state, self.rec
        if not state.claim_grad_slot((site, call, metric)):
            return
        step, owner = state.step, self.owner
        scale = owner.scale
        pending = {"left": len(tensors), "total": None, "count": sum(t.numel() for t in tensors)}

        def part_hook(grad: torch.Tensor) -> None:
            if grad is None or not owner.alive:
                return None
            value = _unscaled(squared_norm(grad), scale, state)
            total = pending["total"]
            pending["total"] = value if total is None else total + value.to(total.device)
            pending["left"] -= 1
            if pending["left"] == 0:
                value = pending["total"]
                rec.add(step, site, call, (metric,), (value.item(),) if readable(value) else value,
                        pending["count"], spec.SQNORM)
            return None

        for t in tensors:
            self._register(t, part_hook)

    def _register(self, t: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> None:
        """``t.register_hook(hook)``; on a leaf the hook retires once its step is over.

        Why: a hook on a block's output dies with the step's graph, but a leaf (an input tensor reused across steps
        with ``requires_grad=True``, a parameter fed to a block as its input) keeps every hook gradscope ever put on
        it. Each later backward would fire all of them again, recording the new gradient under old steps (a
        spurious "second backward" warning) and costing one more reduction per recorded step so far. A leaf's hook
        records at its first call (also a late backward, after ``scope.step()``) and again within its own step (a
        real second backward, which warns); at a call in a later step it removes itself and records nothing.
        """
        if t.grad_fn is not None:
            t.register_hook(hook)
            return
        state, step, fired, handle = self.state, self.state.step, [False], []

        def leaf_hook(grad: torch.Tensor) -> None:
            if fired[0] and state.step != step:
                handle[0].remove()
                return None
            fired[0] = True
            return hook(grad)

        handle.append(t.register_hook(leaf_hook))
        if len(self._leaf_handles) >= 64:  # forget handles whose hook is gone (retired, or its tensor freed)
            self._leaf_handles = [h for h in self._leaf_handles if h.id in (h.hooks_dict_ref() or ())]
        self._leaf_handles.append(handle[0])


def _unscaled(value: torch.Tensor, scale: Optional[Callable[[], Optional[torch.Tensor]]],
              state: StepState) -> torch.Tensor:
    """``value`` (a squared gradient norm) divided by the square of a GradScaler's current scale, read on the device
    when backward runs (no sync); as it is without a scaler."""
    factor = scale() if scale is not None else None
    if factor is None:
        return value
    state.note_grad_scale(factor)
    factor = factor.detach().to(value.device, value.dtype)
    return value / (factor * factor)
