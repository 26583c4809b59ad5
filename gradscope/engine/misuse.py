"""The three ways a training loop most often calls a scope wrong, in words: each function says what happened, what
it costs and the fix, for a one-time ``RuntimeWarning`` of :class:`~gradscope.engine.scope.Scope`.

Each of these used to pass silently: the frame looked complete while a metric was missing for every step, every
step had collapsed into one, or nothing was recorded at all.
"""
from __future__ import annotations


def step_before_backward(step: int) -> str:
    """``scope.step()`` closed a recorded step whose training forward had not been through ``backward()`` yet."""
    return (f"gradscope: scope.step() closed recorded step {step} before any backward reached its blocks: "
            f"parameter gradients are read at scope.step(), so param_grad_norm (and update_ratio, which needs the "
            f"gradient's step) is missing or a step late for every step of this loop; the blocks' gradient rows "
            f"still land in the step of their forward. Call scope.step() after loss.backward() (and before "
            f"zero_grad()), or pass the optimizer (attach(model, optimizer=opt)).")


def never_stepped(forwards: int) -> str:
    """``detach()`` of a scope whose ``step()`` never ran, after several training forwards."""
    return (f"gradscope: scope.step() was never called, so the {forwards} training forwards recorded became calls "
            f"0 to {forwards - 1} of step 0 (one step, not {forwards}); call scope.step() once per training step, "
            f"after backward.")


def step_after_detach() -> str:
    """``step()`` on a scope that is no longer attached."""
    return ("gradscope: scope.step() on a detached scope records nothing (the `with` block or detach() ended it); "
            "call it inside the `with gradscope.attach(...)` block, or attach again.")
