"""The optimizers ``attach(optimizer=...)`` is given: unwrapped, checked, and which blocks each one updates.

- **Wrappers.** accelerate's ``AcceleratedOptimizer`` (also what the Hugging Face Trainer holds) keeps the torch
  optimizer in ``.optimizer``, Lightning's ``LightningOptimizer`` in ``._optimizer``; the step hooks go on that inner
  optimizer, which steps only when the wrapper really steps.
- **Gradient accumulation.** An ``AcceleratedOptimizer`` carries accelerate's ``GradientState``: its
  ``sync_gradients`` says whether this micro-batch ends an optimizer step. :func:`accumulation_sync` returns a
  function reading it, so ``scope.step()`` can keep the step open until then (see ``docs/accelerate.md``).
- **Several optimizers.** ``update_ratio`` is measured per optimizer, across its own ``step()``, for the blocks it
  updates (:func:`coverage`). A block with trainable parameters that no given optimizer holds gets no update row:
  a 0.0 measured across someone else's step would be false (and fire ``update_band``); a warning names it once.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Set, Tuple

import torch

from gradscope.engine.sites import Site
from gradscope.errors import GradscopeError


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside ``optimizer``'s wrappers (``.optimizer``: accelerate, Hugging Face;
    ``._optimizer``: Lightning), or ``optimizer`` itself."""
    for _ in range(8):
        inner = None
        for attr in ("optimizer", "_optimizer"):
            found = getattr(optimizer, attr, None)
            if isinstance(found, torch.optim.Optimizer) and found is not optimizer:
                inner = found
                break
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


#: packages whose optimizer wrappers only pass ``step()`` on to the optimizer inside (or skip it while gradients
#: accumulate): the update is the inner optimizer's step
_DELEGATING = ("accelerate", "lightning", "pytorch_lightning", "lightning_fabric", "transformers", "deepspeed")


def acts_after_step(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a wrapper (``.optimizer``/``._optimizer``) that may change the weights itself around
    the inner optimizer's step: Lookahead pulls them toward its slow weights after it, SAM-style wrappers move them
    around it. Wrappers of the packages in :data:`_DELEGATING` only pass the step on. For such a wrapper the update
    ratio is measured when the wrapper's step is over (engine/optwatch.py), not when the inner step returns."""
    inner = unwrap_optimizer(optimizer)
    for _ in range(8):
        if optimizer is inner:
            return False
        if type(optimizer).__module__.split(".")[0] not in _DELEGATING:
            return True
        optimizer = next(found for found in (getattr(optimizer, a, None) for a in ("optimizer", "_optimizer"))
                         if isinstance(found, torch.optim.Optimizer) and found is not optimizer)
    return False


def optimizer_list(optimizer: Any) -> List[Any]:
    """``attach(optimizer=...)`` as a list: None, one optimizer, or a list/tuple of them."""
    if optimizer is None:
        return []
    if isinstance(optimizer, (list, tuple)):
        return list(optimizer)
    return [optimizer]


def check_optimizer(given: Any, inner: Any) -> None:
    """Raise a :class:`GradscopeError` unless ``inner`` (``given`` unwrapped) takes step hooks."""
    if not (hasattr(inner, "register_step_pre_hook") and hasattr(inner, "_optimizer_step_pre_hooks")
            and hasattr(inner, "param_groups")):
        raise GradscopeError(f"optimizer={type(given).__name__} is not a torch.optim.Optimizer with step hooks "
                             f"(torch>=2.0), nor a wrapper of one (.optimizer); pass the optimizer that updates "
                             f"this model (several as a list), or leave it out")


def accumulation_sync(wrappers: Sequence[Any]) -> Optional[Callable[[], bool]]:
    """A function telling whether the current micro-batch ends an optimizer step (accelerate's
    ``GradientState.sync_gradients``), or None when no wrapper accumulates gradients."""
    for wrapper in wrappers:
        state = getattr(wrapper, "gradient_state", None)
        if state is not None and hasattr(state, "sync_gradients"):
            return lambda: bool(state.sync_gradients)
    return None


def wrapped_scaler(wrappers: Sequence[Any]) -> Any:
    """The GradScaler an accelerate wrapper steps through (fp16 mixed precision), or None."""
    for wrapper in wrappers:
        scaler = getattr(wrapper, "scaler", None)
        if scaler is not None and hasattr(scaler, "get_scale"):
            return scaler
    return None


def held(optimizer: Any) -> Set[int]:
    """Ids of the parameters in ``optimizer``'s param groups."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def coverage(sites: List[Site], optimizers: Sequence[Any]) -> Tuple[List[List[int]], List[int]]:
    """``(updated, missed)``: ``updated[k]`` lists the sites optimizer ``k`` updates (it holds every trainable
    parameter of the block, and at least one parameter); ``missed`` the sites with trainable parameters that no
    single optimizer updates that way. A frozen block that no optimizer holds is in neither (nothing updates it)."""
    holds = [held(opt) for opt in optimizers]
    updated: List[List[int]] = [[] for _ in optimizers]
    missed: List[int] = []
    for s, site in enumerate(sites):
        params = list(site.module.parameters())
        trainable = [id(p) for p in params if p.requires_grad]
        owner = None
        for k, ids in enumerate(holds):
            if all(i in ids for i in trainable) and any(id(p) in ids for p in params):
                owner = k
                break
        if owner is not None:
            updated[owner].append(s)
        elif trainable:
            missed.append(s)
    return updated, missed


def missed_message(sites: List[Site], missed: List[int]) -> str:
    """The one-time warning naming the blocks no given optimizer updates."""
    names = [repr(sites[s].name) for s in missed]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"gradscope: block(s) {shown} have trainable parameters that no optimizer given to attach(optimizer=...) "
            f"updates: they get no update_ratio rows (0.0 measured across another optimizer's step would be false). "
            f"Pass every optimizer that trains the model: attach(model, optimizer=[opt_a, opt_b])")


def group_names(optimizers: Sequence[Any]) -> Optional[str]:
    """The optimizers' class names for the provenance record (None without one)."""
    return ", ".join(type(o).__name__ for o in optimizers) or None



def mean_loss(losses: List[Any]) -> Any:
    """The mean of a step's micro-batch losses under gradient accumulation (:func:`accumulation_sync`); tensors stay
    on their device: no sync."""
    tensors = [loss.detach().reshape(-1).float() for loss in losses if isinstance(loss, torch.Tensor)]
    floats = [float(loss) for loss in losses if not isinstance(loss, torch.Tensor)]
    if not tensors:
        return sum(floats) / len(floats)
    return (torch.cat(tensors).sum() + sum(floats)) / len(losses)
