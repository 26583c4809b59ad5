"""Hooks that never travel with a copy or a pickle of the model.

``copy.deepcopy(model)`` (EMA and evaluation copies), ``copy.copy``, ``pickle.dumps(model)`` and
``torch.save(model)`` all read a module's state from its ``__dict__``, hook dictionaries included. Left alone, a
deep copy would carry gradscope's hooks (its forwards recorded into the original scope, hooks that no ``detach()``
removes) and a pickle would fail on the hooks' closures ("Can't pickle local object").

The mechanism, one for all four: every module gradscope hooks gets an *instance* ``__getstate__`` (all four look it
up on the instance, before the class's), :class:`StateWithoutHooks`. It returns what the module's class would
return, minus gradscope's hooks (marked with :func:`mark`) and minus itself. The original keeps its hooks; the copy
or the unpickled model has the user's hooks only, and a pickle holds no reference to gradscope at all (it loads
where gradscope is not installed). :func:`release` takes the instance ``__getstate__`` away again once no
gradscope hook is left on the module.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Set, TypeVar

from torch import nn

_MARK = "_gradscope_hook"
#: hook dictionaries whose values are hooks (keyed by handle id), and the ones keyed by the same ids that only flag
#: a hook's options (``with_kwargs``, ``always_call``)
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")

F = TypeVar("F", bound=Callable[..., Any])


def mark(hook: F) -> F:
    """Mark ``hook`` (a function object) as gradscope's: copies and pickles of its module leave it out."""
    setattr(hook, _MARK, True)
    return hook


def is_ours(hook: Any) -> bool:
    """Whether ``hook`` was marked by :func:`mark`."""
    return bool(getattr(hook, _MARK, False))


def our_ids(state: Dict[str, Any]) -> Set[int]:
    """Handle ids of gradscope's hooks in a module's ``__dict__`` (or a copy of it)."""
    ids: Set[int] = set()
    for name in _HOOKS:
        hooks = state.get(name)
        if hooks:
            ids.update(key for key, hook in hooks.items() if is_ours(hook))
    return ids


def without_ours(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` (a module's ``__dict__`` copy) with gradscope's hooks and their option flags left out."""
    ids = our_ids(state)
    if not ids:
        return state
    for name in _HOOKS + _FLAGS:
        hooks = state.get(name)
        if hooks and not ids.isdisjoint(hooks):
            state[name] = OrderedDict((key, value) for key, value in hooks.items() if key not in ids)
    return state


class StateWithoutHooks:
    """A module's instance ``__getstate__``: its class's state without gradscope's hooks (see the module doc)."""

    __slots__ = ("module", "__weakref__")

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)  # no cycle: the module holds this object

    def __call__(self) -> Dict[str, Any]:
        module = self.module()
        if module is None:  # unreachable while the module lives; be safe anyway
            return {}
        state = dict(type(module).__getstate__(module))
        state.pop("__getstate__", None)
        return without_ours(state)

    def __reduce__(self) -> Any:  # never pickled itself (the state above leaves it out); if asked: nothing
        return (_nothing, ())


def _nothing() -> None:
    return None


def guard(module: nn.Module) -> None:
    """Give ``module`` the instance ``__getstate__`` that leaves gradscope's hooks out of copies (idempotent)."""
    if not isinstance(module.__dict__.get("__getstate__"), StateWithoutHooks):
        module.__dict__["__getstate__"] = StateWithoutHooks(module)


def release(module: nn.Module) -> None:
    """Take the instance ``__getstate__`` away again when no gradscope hook is left on ``module``."""
    if isinstance(module.__dict__.get("__getstate__"), StateWithoutHooks) and not our_ids(module.__dict__):
        del module.__dict__["__getstate__"]
