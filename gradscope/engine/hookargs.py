"""What a hook is handed: the tensors in a block's arguments and output that gradscope measures.

A block may take and return tensors, tuples, lists, dicts, dataclasses or Hugging Face ``ModelOutput`` objects;
these functions pick the tensor that carries the block's signal (the first floating-point or complex one, the
residual stream) without measuring anything. They are pure, so :mod:`gradscope.engine.probes` and the study code
share one definition.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from gradscope.engine.metrics import is_signal

_is_wrapped: Callable[[torch.Tensor], bool] = getattr(getattr(torch._C, "_functorch", None),
                                                     "is_functorch_wrapped_tensor", lambda t: False)


def transformed(t: Optional[torch.Tensor]) -> bool:
    """True for a tensor wrapped by a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``...): such forwards
    (per-sample gradients, for example) are not the training step's forward, and their wrapped tensors cannot be
    read or reduced like plain ones, so gradscope does not record them."""
    return t is not None and _is_wrapped(t)


def first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The block's primary tensor: the first *floating-point or complex* tensor in the value (depth-first).

    A Hugging Face block returns ``(hidden_states, attention_weights, ...)`` and a ``ModelOutput`` (a dict): the
    hidden states come first in both, so they are what gradscope measures. A dataclass is read field by field, in
    the order it declares them. Integer tensors (token ids, masks of indices) are skipped: they carry no signal and
    no gradient.
    """
    if isinstance(value, torch.Tensor):
        return value if is_signal(value) else None
    if isinstance(value, (tuple, list)):
        items = value
    elif isinstance(value, dict):
        items = list(value.values())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def block_input(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The tensor that enters a block: the first floating tensor among the positional arguments, else the keyword
    ``hidden_states`` (Hugging Face's name), else the first floating tensor among the keyword arguments."""
    found = first_tensor(args) if args else None
    if found is None and kwargs:
        found = first_tensor(kwargs.get("hidden_states")) if "hidden_states" in kwargs else None
        if found is None:
            found = first_tensor(kwargs)
    return found


def primary_input(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """What "the block's input" is for ``grad_in_norm``: the residual stream a block transforms.

    The first positional argument (a tensor, or a list/tuple of tensors: a dense block's earlier outputs), else the
    keyword ``hidden_states`` (Hugging Face's name), else the first keyword argument holding a floating tensor.
    Further arguments (a decoder layer's encoder output, a U-Net decoder stage's skip connection, masks) are not the
    block's input: their gradients flow elsewhere too, and counting them would mix two signals.
    """
    if args and first_tensor(args[0]) is not None:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    for value in kwargs.values():
        if first_tensor(value) is not None:
            return value
    return args


def grad_inputs(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
    """The tensors whose gradient makes a block's ``grad_in_norm``: those of :func:`primary_input` that require grad,
    each once (every tensor of a list or tuple; of a dict, its ``hidden_states`` entry, else its first floating
    tensor; of a dataclass, its first floating field)."""
    found: List[torch.Tensor] = []
    seen: set = set()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if is_signal(value) and value.requires_grad and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            visit(value["hidden_states"] if "hidden_states" in value else first_tensor(value))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            visit(first_tensor(value))  # the previous block's dataclass output, passed on whole

    visit(primary_input(args, kwargs))
    return found
