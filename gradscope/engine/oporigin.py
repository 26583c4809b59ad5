"""A NaN traced to its operator: which aten operator, in which module inside the first bad block, made the first
non-finite value of a run.

The block hooks already find the *block* (``act_nonfinite > 0``, read at ``scope.step()`` with the step's other
statistics). To name the operator, :class:`OpTracer` keeps a reference to each block's inputs during a recorded
training forward (no copy, no computation: the inputs of a training step are alive for its backward anyway) and
drops them at ``scope.step()``. Only when a step's rows show a block's output non-finite for the first time does it
*replay* that block's forward on the kept inputs, under ``torch.no_grad()`` and a ``TorchDispatchMode`` that checks
every operator's outputs, and reports the first operator whose output holds a NaN/Inf though its inputs were
finite, with the module that called it (temporary hooks on the block's submodules keep the module path). Healthy
steps pay a list append and a read of the inputs' version counters per block call; the replay runs once per
scope.

The replay recomputes, so it cannot reproduce everything: randomness (dropout draws again), inputs modified in
place after the block ran, and parameters changed by an ``optimizer.step()`` between the forward and
``scope.step()`` are detected from version counters and said in the finding's ``note``; a NaN that does not come
back on replay is reported as such, never guessed. Buffers (BatchNorm running statistics) are restored after the
replay.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gradscope.engine.sites import Site

__all__ = ["OpOrigin", "OpTracer", "find_origin"]


@dataclass(frozen=True)
class OpOrigin:
    """Where the first non-finite value was made.

    Attributes:
        step: the recorded step.
        block: the block whose output was first non-finite (as ``first_nonfinite()["forward"]`` names it).
        op: the aten operator, e.g. ``"aten.log"`` (``None`` when the replay did not find one).
        module: the qualified name of the module that called it (the block, or a submodule inside it).
        note: how it was found, or why the replay could not say.
    """

    step: int
    block: str
    op: Optional[str]
    module: Optional[str]
    note: str = ""

    def __str__(self) -> str:
        if self.op is None:
            return f"operator not found in block {self.block!r} at step {self.step}: {self.note}"
        extra = f" ({self.note})" if self.note else ""
        return f"{self.op} in module {self.module!r} (block {self.block!r}, step {self.step}){extra}"


def _floats(tree: Any) -> List[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)
            and (t.is_floating_point() or t.is_complex()) and t.numel() > 0]


def _finite(tensors: List[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


#: where a non-finite value came from: (operator, module path, note); the note is empty for an operator that made it
Source = Tuple[str, str, str]


class _Provenance(TorchDispatchMode):
    """Runs every operator and follows each non-finite value to where it was made.

    A NaN is made by the operator whose output holds one while none of its inputs did; an infinity likewise. An
    output that inherits them takes the source of the first such input that reaches it (of ``where``'s two
    branches, the one whose NaNs it selected). A NaN made from infinities (``inf - inf``, ``gelu(inf)``) goes back
    to where those were made (an ``exp`` that overflowed), unless they were meant: written as a constant
    (``masked_fill(mask, -inf)``, ``full(..., -inf)``) or read from a tensor the block was given (an additive mask);
    then the operator that turned them into NaN is the answer (a softmax over a fully masked row). So the block's
    output names the operator whose non-finite values reached it, not a NaN that a ``where`` or a mask removed on
    the way (the "safe sqrt" ``where(h > 0, sqrt(h), 0)``). Sources are kept per tensor and per storage: a NaN
    written into a slice or a view (``out[:, :8] = log(h)``, ``h[:, :4].log_()``) is found again where the whole
    tensor is read. A NaN or infinity read from a tensor no operator of the replay made is named by ``named`` (a
    buffer: ``"buffer 'pos'"``) in the note.
    """

    def __init__(self, where: Callable[[], str], named: Dict[Any, str]) -> None:
        super().__init__()
        self.where, self.named = where, named
        #: id(tensor) or its memory -> (a weak reference to it, or None for memory; where its NaNs were made)
        self.nan_from: Dict[Any, Tuple[Any, Source]] = {}
        self.inf_from: Dict[Any, Tuple[Any, Tuple[Source, bool]]] = {}  # ... where its infinities were made, meant?
        self.alive: List[torch.Tensor] = []  # views written in place: their memory keeps its key while the replay runs
        self.first: Optional[Source] = None  # the first operator that made any non-finite value

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = str(getattr(func, "overloadpacket", func))
        inputs = _read_inputs(name, args, kwargs)
        nan_in = [t for t in inputs if bool(torch.isnan(t).any())]  # before the call: an in-place op overwrites it
        inf_in = [t for t in inputs if bool(torch.isinf(t).any())]
        out = func(*args, **kwargs)
        for t in _floats(out):
            nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
            if not (nan or inf):
                continue
            made: Source = (name, self.where(), "")
            if self.first is None and not (nan_in or inf_in):
                self.first = made
            written = _written(func, args, kwargs)
            if inf:
                self._keep(self.inf_from, t, self._inf_source(inf_in, made, args, kwargs), written)
            if nan:
                reaching = _where_branches(name, args, t) if name == "aten.where" and nan_in else nan_in
                self._keep(self.nan_from, t, self._nan_source(reaching, inf_in, made), written)
        return out

    def _keep(self, table: Dict[Any, Any], t: torch.Tensor, source: Any, written: List[torch.Tensor]) -> None:
        """Remember where ``t``'s non-finite values came from: by identity (a weak reference: the replay keeps no
        result alive, so its memory stays that of the block's own forward), and, when the operator wrote ``t`` in
        place (``copy_`` into a slice, ``log_`` on a view), by its memory too, keeping that view."""
        table[id(t)] = (weakref.ref(t), source)
        key = _storage(t)
        if key is not None and any(_storage(a) == key for a in written):
            table[key] = (None, source)
            self.alive.append(t)  # its memory is an input's, alive anyway: the key stays this memory's

    @staticmethod
    def _known(table: Dict[Any, Any], t: torch.Tensor) -> Any:
        entry = table.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        key = _storage(t)
        entry = table.get(key) if key is not None else None
        return None if entry is None else entry[1]

    def _outside(self, t: torch.Tensor) -> str:
        """What a non-finite tensor no operator of the replay made is: a named buffer, or something the block read."""
        named = self.named.get(id(t)) or self.named.get(_storage(t))
        return named or "a tensor the block reads that was already non-finite"

    def _nan_source(self, nan_in: List[torch.Tensor], inf_in: List[torch.Tensor], made: Source) -> Source:
        for t in nan_in:
            known = self._known(self.nan_from, t)
            if known is not None:
                return known
        if nan_in:  # read from a tensor made before the replay: a buffer (or another tensor the block reads)
            return made[0], made[1], f"the non-finite values came in through {self._outside(nan_in[0])}"
        for t in inf_in:  # a NaN made here from infinities: where were they made, and were they meant?
            source, meant = self._known(self.inf_from, t) or (made, True)
            if not meant:
                became = f"its infinities became NaN in {made[0]} in {made[1]!r}"
                return source[0], source[1], "; ".join(x for x in (source[2], became) if x)
        return made

    def _inf_source(self, inf_in: List[torch.Tensor], made: Source, args: Tuple[Any, ...],
                    kwargs: Dict[str, Any]) -> Tuple[Source, bool]:
        for t in inf_in:
            known = self._known(self.inf_from, t)
            if known is not None:
                return known
        for t in inf_in:  # a buffer's infinity is a corrupted state, not a mask
            what = self.named.get(id(t)) or self.named.get(_storage(t))
            if what is not None:
                return (made[0], made[1], f"the non-finite values came in through {what}"), False
        if inf_in:  # an infinity the block was given (an additive mask): meant
            return made, True
        constant = any(isinstance(a, float) and math.isinf(a) for a in tree_leaves((args, kwargs)))
        return made, constant

    def source_of(self, result: Any) -> Optional[Source]:
        """Where the first non-finite output of the replay got its NaNs (or, without NaNs, its infinities)."""
        for t in _floats(result):
            if bool(torch.isnan(t).any()):
                known = self._known(self.nan_from, t)
                if known is not None:
                    return known
        for t in _floats(result):
            if bool(torch.isinf(t).any()):
                known = self._known(self.inf_from, t)
                if known is not None:
                    return known[0]
        return None


def _storage(t: torch.Tensor) -> Optional[Tuple[str, int]]:
    """A key for the memory ``t`` lives in (shared by its views), or None where it has none to name."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return ("storage", ptr) if ptr else None


def _written(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
    """The tensors an operator writes into (``self`` of ``mul_``/``copy_``, ``out=``), from its schema; views
    are not writes."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is not None and info.is_write:
            value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
            out.extend(t for t in tree_leaves(value) if isinstance(t, torch.Tensor))
    return out


def _where_branches(name: str, args: Tuple[Any, ...], out: torch.Tensor) -> List[torch.Tensor]:
    """Of ``where(condition, a, b)``'s branches, those whose NaNs the output selected (``a`` where the condition
    holds, ``b`` where it does not), in that order."""
    if len(args) < 3 or not isinstance(args[0], torch.Tensor):
        return [t for t in args[1:3] if isinstance(t, torch.Tensor)]
    cond, bad = args[0].bool(), torch.isnan(out)
    picked = []
    for branch, chosen in ((args[1], cond), (args[2], ~cond)):
        if isinstance(branch, torch.Tensor) and branch.is_floating_point() and \
                bool((torch.isnan(branch) & chosen & bad).any()):
            picked.append(branch)
    return picked


#: batch-norm operators write their running statistics (arguments 3 and 4) in training mode and never read them
_WRITES_RUNNING_STATS = ("aten.native_batch_norm", "aten._native_batch_norm_legit",
                         "aten._native_batch_norm_legit_functional", "aten.cudnn_batch_norm",
                         "aten.miopen_batch_norm", "aten._batch_norm_with_update")


def _read_inputs(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
    """The floating-point tensors an operator reads: a batch norm in training mode reads its batch, not the
    running statistics it updates (which the forward being replayed may already have spoiled)."""
    if name in _WRITES_RUNNING_STATS and len(args) > 5 and args[5] is True:
        args = args[:3] + args[5:]
    return _floats((args, kwargs))


def _versions(tensors: List[torch.Tensor]) -> Tuple[int, ...]:
    return tuple(t._version for t in tensors)


@contextmanager
def _reparametrized(module: nn.Module, weights: Optional[Dict[str, torch.Tensor]]) -> Iterator[None]:
    """Within the block, its parameters are ``weights`` (torch.func's reparametrisation; nothing when None)."""
    if weights is None:
        yield
        return
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(module, weights):
        yield


def _enter(stack: List[str], name: str) -> Callable[..., None]:
    def pre(module: nn.Module, args: Any) -> None:
        stack.append(name)
    return pre


def _leave(stack: List[str]) -> Callable[..., None]:
    def post(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()
    return post


def _weights(module: nn.Module, before: Optional[Dict[int, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The parameters to replay with, by name: the pre-update copies where ``before`` holds one."""
    return {n: (before.get(id(p), p) if before else p).detach() for n, p in module.named_parameters()}


def find_origin(module: nn.Module, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                before: Optional[Dict[int, torch.Tensor]] = None) -> Tuple[Optional[str], Optional[str], str]:
    """Replay ``module.forward(*args, **kwargs)`` (the module's own hooks skipped) and return ``(op, module path,
    note)`` of the first operator that turned finite inputs into a non-finite output. ``before``: copies of
    parameters from before an optimizer step (``id(param) -> tensor``) to replay with. Buffers are restored."""
    weights = _weights(module, before)
    bad_params = [n for n, p in weights.items() if not _finite(_floats(p))]
    if bad_params:
        return None, None, (f"parameter {name + '.' + bad_params[0] if name else bad_params[0]!r} is already "
                            f"non-finite: the NaN came in through the weights")
    inputs = _floats((args, kwargs))  # the first is the block's input; the others may be masks, where -inf is meant
    if not _finite(inputs[:1]) or any(bool(torch.isnan(t).any()) for t in inputs[1:]):
        return None, None, "the block's input was already non-finite"
    stack = [name]
    handles = []
    for sub_name, sub in module.named_modules():
        if sub is module:
            continue
        full = f"{name}.{sub_name}" if name else sub_name
        handles.append(sub.register_forward_pre_hook(_enter(stack, full)))
        handles.append(sub.register_forward_hook(_leave(stack)))
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    named: Dict[Any, str] = {}
    for n, b in module.named_buffers():
        named[id(b)] = f"buffer {(name + '.' + n) if name else n!r}"
        key = _storage(b)
        if key is not None:
            named[key] = named[id(b)]
    mode = _Provenance(lambda: stack[-1], named)
    try:
        with torch.no_grad(), _reparametrized(module, weights if before else None), mode:
            result = module.forward(*args, **kwargs)
    except Exception as exc:  # the replay must never break the user's run
        return None, None, f"the replay raised {type(exc).__name__}: {exc}"
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if _finite(_floats(result)):
        return None, None, "the replay gave finite values (randomness such as dropout, or inputs changed since)"
    found = mode.source_of(result)
    if found is not None:
        return found
    if mode.first is not None:  # the output's values were not made by a traced operator (rare): the first one
        op, where, _ = mode.first
        return op, where, "the first operator that made a non-finite value; its path to the output was not traced"
    return None, None, "no operator of the replay made a non-finite value"


def _stepped(ref: "weakref.ref[OpTracer]") -> None:
    tracer = ref()
    if tracer is not None:
        tracer.optimizer_stepped()


class OpTracer:
    """Keeps each block's inputs for the current recorded step and finds the operator of the first non-finite one.

    ``keep`` is called by the block pre-hook (training forwards of recorded steps); ``clear`` at ``scope.step()``;
    ``trace(step, block)`` when the non-finite policy first sees a block's output non-finite.
    """

    def __init__(self, sites: List[Site], state: Any = None) -> None:
        self.sites = sites
        self.state = state  # the recorder's state: inactive during the replay, so no hook records it
        self.before: Optional[Dict[int, torch.Tensor]] = None
        self.stepped = False  # an optimizer.step() since the kept forward (when attach() was given the optimizer)
        self.any_kept = False
        self._index = {site.name: i for i, site in enumerate(sites)}
        self.kept: List[List[Tuple[Any, ...]]] = [[] for _ in sites]
        self.done = False
        # any optimizer's step, also one attach() was not given: the weights a replay would use are then not the
        # forward's (held weakly, so a scope never detached does not keep its tracer alive through torch's registry)
        ref = weakref.ref(self)
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._any_step = register_optimizer_step_post_hook(lambda *args: _stepped(ref))

    def close(self) -> None:
        """Remove the global optimizer hook (the scope's ``detach()``)."""
        self._any_step.remove()

    def keep(self, site: int, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """Remember a block call's inputs (references, and the version counters of its positional tensors: an
        in-place change after the call is seen at replay). A list append: healthy steps pay nothing more."""
        if self.done or not torch.is_grad_enabled():
            return
        self.any_kept = True
        self.kept[site].append((args, kwargs, _versions([a for a in args if isinstance(a, torch.Tensor)])))

    def optimizer_stepped(self, *args: Any) -> None:
        """An ``optimizer.step()`` post-hook: the weights changed since this step's forward (if one was kept: an
        update between ``scope.step()`` and the next forward precedes what is kept)."""
        self.stepped = self.any_kept

    def clear(self) -> None:
        """Drop every kept input and weight copy (the end of a step)."""
        for calls in self.kept:
            calls.clear()
        self.before = None
        self.stepped = self.any_kept = False

    def weights_before(self, params: List[torch.Tensor], order: List[int], copies: List[torch.Tensor]) -> None:
        """Keep (until ``clear``) the parameter copies taken before this step's ``optimizer.step()`` (the update
        ratio's snapshot, already made): a replay after the update then runs on the weights the forward saw."""
        if not self.done and self.any_kept:  # (several optimizers: each adds the copies of its parameters)
            self.before = {**(self.before or {}), **{id(params[i]): t for i, t in zip(order, copies)}}

    def trace(self, step: int, block: str) -> OpOrigin:
        """Replay the kept calls of ``block`` (in call order) until one reproduces the non-finite output."""
        self.done = True
        site = self._index.get(block)
        calls = list(self.kept[site]) if site is not None else []
        saved, stepped = self.before, self.stepped
        self.clear()
        if not calls:
            return OpOrigin(step, block, None, None, "no inputs of this block were kept (a forward without grad, "
                                                     "a step that was closed before it was checked, or a model "
                                                     "under torch.compile, whose traced hooks keep none)")
        module = self.sites[site].module
        result: Tuple[Optional[str], Optional[str], str] = (None, None, "")
        for args, kwargs, versions in calls:
            changed = []
            if _versions([a for a in args if isinstance(a, torch.Tensor)]) != versions:
                changed.append("the block's input was modified in place after the block ran")
            before = saved
            if stepped and before is None:
                changed.append("its parameters changed since the forward (optimizer.step() before scope.step() "
                               "without the update_ratio metric's copy); the replay used the new ones")
            active = getattr(self.state, "active", False)
            if self.state is not None:
                self.state.active = False
            try:
                op, where, note = find_origin(module, block, args, kwargs, before)
            finally:
                if self.state is not None:
                    self.state.active = active
            if stepped and before is None and op is None and note.startswith("parameter "):
                note, changed = ("cannot say: the weights changed after the forward (an optimizer.step() before "
                                 "scope.step()), so the replay saw the updated, non-finite ones, not the forward's; "
                                 "pass optimizer= to attach() and keep the update_ratio metric, whose copy of the "
                                 "weights from before the step the replay uses"), []
            result = (op, where, "; ".join([note] * bool(note) + changed))
            if op is not None:
                break
        return OpOrigin(step, block, *result)
