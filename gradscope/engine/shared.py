"""Under ``torch.compile``: which block inputs are provably the previous block's tapped output, so that one gradient
reduction serves the previous block's ``grad_norm`` and the next block's ``grad_in_norm`` (engine/traced.py), and
what the step's drain does where the sharing did not hold (:func:`lend`): no row goes missing without a word."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple

import math
import os
import sys
import weakref

import torch
from torch.nn.modules import module as _module

from gradscope import schema as S
from gradscope.engine.metrics import is_signal

#: a call's input gradient: not measured, tapped; ``SHARED + i``: site i's output tap (the pre-hook notes which one)
UNTAPPED, TAPPED, SHARED = 0, 1, 2


def sequential_pairs(root: Optional[torch.nn.Module], modules: Sequence[torch.nn.Module]) -> List[Tuple[int, int]]:
    """``(i, j)`` for sites ``modules[i]``, ``modules[j]`` that are consecutive children of an ``nn.Sequential`` under
    ``root`` whose ``forward`` is ``nn.Sequential``'s own: it passes child i's output to child j with nothing in
    between, so the gradient of j's input is the gradient of i's output. Empty without a root.

    A child i that the model holds more than once (``Sequential(a, b, a)``) runs more than once per step: its tap
    then sums over its calls and cannot stand for j's input, so it forms no pair (j taps its own input)."""
    if root is None:
        return []
    index = {id(m): i for i, m in enumerate(modules)}
    held = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    pairs = []
    for parent in root.modules():
        if type(parent).forward is not torch.nn.Sequential.forward:
            continue
        children = list(parent._modules.values())
        for before, after in zip(children, children[1:]):
            i, j = index.get(id(before)), index.get(id(after))
            if i is not None and j is not None and held[id(before)] == 1:
                pairs.append((i, j))
    return pairs


def shared_inputs(pairs: Sequence[Tuple[int, int]], modules: Sequence[torch.nn.Module],
                  own_hooks: Set[int]) -> List[Optional[int]]:
    """Per site, the index of the site whose tapped output is provably the site's input (else None): the later
    site of a :func:`sequential_pairs` pair, while the earlier block carries no forward hook but gradscope's
    (``own_hooks``: handle ids) and no global module forward hook exists, since such a hook could replace the output
    or change it in place. The later block's other pre-hooks do not matter while gradscope's runs first (its own
    input tap sat before them anyway): its first pre-hook must be gradscope's (one that a user registers with
    ``prepend=True`` after the install runs before it and may hand it a new input), and no global forward pre-hook
    may exist (they run before every module's own).

    Under compile one reduction then serves both the earlier block's ``grad_norm`` and the later one's
    ``grad_in_norm``, and the later block's input is neither copied nor reduced again, as the eager hooks share one
    reduction (engine/gradwatch.py: GradWatch.watch). Dynamo can read neither a tensor's version (an unbacked symbol) nor a
    Python record of the last output (a guard, or a side effect that ``torch.utils.checkpoint`` refuses), which is
    why the rule is this structural one, decided when the hooks are installed."""
    shared: List[Optional[int]] = [None] * len(modules)
    if getattr(_module, "_global_forward_hooks", None) or getattr(_module, "_global_forward_pre_hooks", None):
        return shared
    for i, j in pairs:
        if set(modules[i]._forward_hooks) <= own_hooks and next(iter(modules[j]._forward_pre_hooks), None) in own_hooks:
            shared[j] = i
    return shared


def tapped_by_previous(x: Any) -> bool:
    """Whether a pre-hook's primary input is the kind of value a traced post-hook taps: a floating tensor that
    requires grad (not a tuple or list: ``nn.Sequential`` passes a block's whole output on)."""
    return isinstance(x, torch.Tensor) and is_signal(x) and x.requires_grad


def constant_when_traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` so that Dynamo, tracing a call of it with constant arguments, runs it in Python then and puts
    its result into the graph as a constant, without a guard (``torch.compiler.assume_constant_result``, whose
    marker is set here directly: that function imports ``torch._dynamo``, 1.5 s that ``attach()`` does not pay).
    Run outside Dynamo, ``fn`` is an ordinary function."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def source_now(root: Optional[torch.nn.Module], modules: Sequence[torch.nn.Module], site: int,
               candidate: Optional[int], own_hooks: Set[int]) -> int:
    """The site whose output tap ``site``'s traced pre-hook may use (-1: none), decided again when Dynamo traces it:
    the install-time ``candidate`` (:func:`shared_inputs`, or None where sharing is off) only while the structure
    still proves it and the call really comes from that ``nn.Sequential``'s forward (:func:`called_by_sequential`).
    A forward hook a user registered on the earlier block after ``attach()`` (it may return a new output), a global
    one, a block replaced since then (engine/replaced.py follows it at the step's end, after this step's graph was
    traced), or the model's own code calling the Sequential's children one by one each make it -1, and the block
    taps its own input."""
    if candidate is None:
        return -1
    fresh = shared_inputs(sequential_pairs(root, modules), modules, own_hooks)
    if site >= len(fresh) or fresh[site] != candidate:
        return -1
    return candidate if called_by_sequential(modules[candidate], modules[site]) else -1


_CALL_FILES = {os.path.normcase(os.path.abspath(f))  # the module-call machinery and gradscope's pre-hooks
               for f in (os.path.join(os.path.dirname(__file__), "probes.py"), _module.__file__)}


def called_by_sequential(before: torch.nn.Module, module: torch.nn.Module) -> bool:
    """While Dynamo traces ``module``'s pre-hook: whether the code that calls ``module`` is ``nn.Sequential.forward``
    of a container whose child just before it is ``before`` (that forward hands ``before``'s output to ``module``
    with nothing in between). False if the model's own code calls the children, and wherever this cannot be told.

    Dynamo keeps the frames it inlines as its own translators, one per frame (``parent``: the caller's): the
    innermost is the ``tx`` of the Dynamo function that calls a function marked :func:`constant_when_traced`. From
    there up, only the module-call machinery (torch/nn/modules/module.py) and gradscope's hook may lie between the
    pre-hook and the Sequential's forward. Relies on Dynamo internals: a torch that changes them turns the sharing
    off (one more tap per block; tests/engine/test_shared_taps.py counts ResNet-20's copies)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslatorBase
    except ImportError:
        return False
    frame, tx = sys._getframe(1), None
    while frame is not None and tx is None:
        found = frame.f_locals.get("tx")
        tx = found if isinstance(found, InstructionTranslatorBase) else None
        frame = frame.f_back
    forward = torch.nn.Sequential.forward.__code__
    while tx is not None:
        code = getattr(tx, "f_code", None)
        if code is forward:
            parent = getattr(tx.symbolic_locals.get("self"), "value", None)
            children = list(parent._modules.values()) if isinstance(parent, torch.nn.Sequential) else []
            return any(a is before and b is module for a, b in zip(children, children[1:]))
        if code is None or os.path.normcase(os.path.abspath(code.co_filename)) not in _CALL_FILES:
            return False
        tx = getattr(tx, "parent", None)
    return False


def source_check(probe: Any) -> Callable[[int], int]:
    """``share_source(site)`` for a probe (engine/probes.py): :func:`source_now` on the probe's current sites,
    hooks and install-time candidates, marked :func:`constant_when_traced`. Holds the probe weakly."""
    ref = weakref.ref(probe)

    def share_source(site: int) -> int:
        p = ref()
        if p is None or not (p.m.grad_in and p.m.grad_out) or site >= len(p.shared_in):
            return -1
        return source_now(p.root, [s.module for s in p.sites], site, p.shared_in[site], {h.id for h in p.handles})

    return constant_when_traced(share_source)


# ---- where the taps go (the traced pre- and post-hooks) -----------------------------------------------------------

def map_grad_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[Any, int]:
    """``value`` with every floating tensor that requires grad replaced by ``fn(tensor)`` (inside tuples and lists,
    depth-first), and how many were replaced. Other values are returned as they are."""
    if isinstance(value, torch.Tensor):
        if is_signal(value) and value.requires_grad:
            return fn(value), 1
        return value, 0
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        items, count = [], 0
        for item in value:
            new, k = map_grad_tensors(item, fn)
            items.append(new)
            count += k
        return (tuple(items) if isinstance(value, tuple) else items), count
    return value, 0


def replace_first(value: Any, old: torch.Tensor, new: torch.Tensor) -> Tuple[Any, bool]:
    """``value`` with the tensor ``old`` (its primary output) replaced by ``new``, where the container allows it: a
    plain tuple or list, or a dataclass (a copy made by ``dataclasses.replace``, when that field is an ``__init__``
    argument)."""
    if value is old:
        return new, True
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        items = list(value)
        for i, item in enumerate(items):
            replaced, done = replace_first(item, old, new)
            if done:
                items[i] = replaced
                return (tuple(items) if isinstance(value, tuple) else items), True
            if isinstance(item, torch.Tensor) and is_signal(item):
                break  # the primary tensor is the first floating one: nothing further to look at
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            item = getattr(value, f.name, None)
            replaced, done = replace_first(item, old, new)
            if done:
                return (dataclasses.replace(value, **{f.name: replaced}), True) if f.init else (value, False)
            if isinstance(item, torch.Tensor) and is_signal(item):
                break
    return value, False


# ---- at the step's drain ------------------------------------------------------------------------------------------

@dataclass
class OutTap:
    """What a site's traced output tap measured in one step: traced ``calls``, whether call 0's output was tapped,
    ``value`` = ``[sum of ||g||^2, taps that ran]`` (NaN: no backward reached the site's leaf) and the output's
    ``numel``."""

    calls: int
    tapped: bool
    value: Tuple[float, float]
    numel: int

    def why_not(self) -> Optional[str]:
        """Why this tap's value is not one call's output-gradient norm (None when it is)."""
        if self.calls != 1:
            return f"ran {self.calls} times in the traced graphs" if self.calls else "ran no traced hook"
        if not self.tapped:
            return "had no output tap"
        if not math.isnan(self.value[0]) and self.value[1] > 1:
            return f"saw {int(self.value[1])} backward passes"
        return None


def lend(borrowers: Sequence[Tuple[int, int, int]], taps: Sequence[OutTap],
         add: Callable[[int, int, Tuple[float, ...], int], None],
         eager: Callable[[int], Optional[Tuple[Any, int]]], lost: Callable[[int, int, str], None]) -> None:
    """``grad_in_norm`` rows of the sites whose single traced call noted a shared input tap: ``borrowers`` holds
    ``(site, call, source)``; ``add(site, call, values, numel)`` buffers a row.

    The value is the source's output tap when that measured exactly one call and one backward; else, where the
    source's hooks ran eagerly (nothing traced), its eager ``grad_norm`` entry (``eager(source)`` -> ``(values,
    numel)`` or None), which measured the same tensor; else nothing can stand for the input gradient and
    ``lost(site, source, why)`` says so (a warning naming the block and the step)."""
    for site, call, source in borrowers:
        tap = taps[source]
        why = tap.why_not()
        if why is None:
            add(site, call, tap.value, tap.numel)
            continue
        found = eager(source) if tap.calls == 0 else None
        if found is not None:
            add(site, call, *found)
        else:
            lost(site, source, why)


def eager_grad(buffer: Sequence[Any], step: int, site: int) -> Optional[Tuple[Any, int]]:
    """``(values, count)`` of ``site``'s eager ``grad_norm`` entry of ``step`` in the recorder's ``buffer`` (None if
    there is none): what :func:`lend` uses where the source's hooks ran eagerly."""
    for e in buffer:
        if e.step == step and e.site == site and e.group == (S.GRAD_NORM,) and e.sites is None:
            return e.values, e.count
    return None


def lost_message(names: Sequence[str], site: int, source: int, why: str, step: int) -> str:
    """The warning for gradient rows that no measurement can stand for: a second backward through one site's taps
    (``source`` -1), or a shared tap that did not measure ``site``'s input (see :func:`lend`)."""
    name = names[site]
    if source < 0:
        text = (f"block {name!r} {why} in step {step}: its taps add them up, so its grad_norm and grad_in_norm rows "
                f"of that step are left out (eager gradscope keeps the first backward's). Call scope.step() between "
                f"backward passes to record each")
    else:
        text = (f"block {name!r} shares the output gradient tap of block {names[source]!r}, which {why} in step "
                f"{step}: that tap cannot stand for block {name!r}'s input gradient, so its grad_in_norm row of "
                f"that step is left out")
    return f"gradscope: under torch.compile, {text}"
