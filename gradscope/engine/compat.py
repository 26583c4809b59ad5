"""Checks for setups where PyTorch would silently ignore or break hooks."""
from __future__ import annotations

from torch import nn

from gradscope.errors import GradscopeError


def is_compiled(model: nn.Module) -> bool:
    """True for the wrapper that ``torch.compile(model)`` returns (an ``OptimizedModule``)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)


def check_not_compiled(model: nn.Module) -> None:
    """Refuse a ``torch.compile``-d module: hooks added after compilation are silently ignored (pytorch#117758).

    Attaching to the eager model first and compiling afterwards works: the compiler then traces the hooks.
    """
    if not isinstance(model, nn.Module):
        return  # not a module at all: attach() says so with the value it got
    compiled = [name or type(model).__name__ for name, m in model.named_modules() if is_compiled(m)]
    if compiled:
        raise GradscopeError(
            f"attach() got a torch.compile-d module ({compiled[0]}): PyTorch silently ignores hooks added after "
            f"compilation. Attach first, then compile: scope = gradscope.attach(model); model = torch.compile(model)")
