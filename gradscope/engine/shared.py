"""Under ``torch.compile``: which block inputs are provably the previous block's tapped output, so that one gradient
reduction serves the previous block's ``grad_norm`` and the next block's ``grad_in_norm`` (engine/traced.py)."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Set, Tuple

import torch
from torch.nn.modules import module as _module

from gradscope.engine.metrics import is_signal

UNTAPPED, TAPPED, SHARED = 0, 1, 2  # a call's input gradient: not measured, tapped, the previous site's output tap


def sequential_pairs(root: Optional[torch.nn.Module], modules: Sequence[torch.nn.Module]) -> List[Tuple[int, int]]:
    """``(i, j)`` for sites ``modules[i]``, ``modules[j]`` that are consecutive children of an ``nn.Sequential`` under
    ``root`` whose ``forward`` is ``nn.Sequential``'s own: it passes child i's output to child j with nothing in
    between, so the gradient of j's input is the gradient of i's output. Empty without a root."""
    if root is None:
        return []
    index = {id(m): i for i, m in enumerate(modules)}
    pairs = []
    for parent in root.modules():
        if type(parent).forward is not torch.nn.Sequential.forward:
            continue
        children = list(parent._modules.values())
        for before, after in zip(children, children[1:]):
            i, j = index.get(id(before)), index.get(id(after))
            if i is not None and j is not None:
                pairs.append((i, j))
    return pairs


def shared_inputs(pairs: Sequence[Tuple[int, int]], modules: Sequence[torch.nn.Module],
                  own_hooks: Set[int]) -> List[Optional[int]]:
    """Per site, the index of the site whose tapped output is provably the site's input (else None): the later
    site of a :func:`sequential_pairs` pair, while the earlier block carries no forward hook but gradscope's
    (``own_hooks``: handle ids) and no global module forward hook exists, since such a hook could replace the output
    or change it in place. The later block's other pre-hooks do not matter: gradscope's runs first, so its own input
    tap sat before them anyway.

    Under compile one reduction then serves both the earlier block's ``grad_norm`` and the later one's
    ``grad_in_norm``, and the later block's input is neither copied nor reduced again, as the eager hooks share one
    reduction (probes.Probe._watch_grad). Dynamo can read neither a tensor's version (an unbacked symbol) nor a
    Python record of the last output (a guard, or a side effect that ``torch.utils.checkpoint`` refuses), which is
    why the rule is this structural one, decided when the hooks are installed."""
    shared: List[Optional[int]] = [None] * len(modules)
    if getattr(_module, "_global_forward_hooks", None):
        return shared
    for i, j in pairs:
        if set(modules[i]._forward_hooks) <= own_hooks:
            shared[j] = i
    return shared


def tapped_by_previous(x: Any) -> bool:
    """Whether a pre-hook's primary input is the kind of value a traced post-hook taps: a floating tensor that
    requires grad (not a tuple or list: ``nn.Sequential`` passes a block's whole output on)."""
    return isinstance(x, torch.Tensor) and is_signal(x) and x.requires_grad
