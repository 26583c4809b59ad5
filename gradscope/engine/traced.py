"""The hooks' path under ``torch.compile``: pure tensor code that Dynamo traces into the graph, no Python state.

When Dynamo traces a block's hooks (``torch.compiler.is_compiling()``), they must not read or change Python state
that varies per step: every such read becomes a guard (a recompile when it changes, the limit of 8 soon hit) and
every ``.item()`` a graph break. So under compile the hooks:

* compute the forward raw sums on the read-free centred path (the device path of :mod:`gradscope.engine.metrics`)
  and append ``(site, sums)`` to a list that the scope drains at ``scope.step()``; call indices and depths are
  assigned there, in the order the calls ran, exactly as the eager hooks assign them;
* measure gradients with :class:`Tap`, an identity autograd function whose backward adds ``||g||^2`` (and a count)
  into row ``slot`` of the gradient of a leaf tensor (:class:`GradLeaf`): autograd itself accumulates the
  measurement, so the backward needs no Python hook and AOTAutograd compiles it with the rest of the backward;
* read one Python flag only, whether the step is recorded, so a compiled model has two variants, recorded and
  unrecorded, and an unrecorded step runs a graph without any gradscope operation.

No weak reference, no set of watched slots and no step counter is read while tracing (the crash of issue 15 came
from a guard on a weak reference whose tensor had been freed).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from gradscope import schema as S
from gradscope.engine import spec
from gradscope.engine.metrics import SLOT_REDUCTIONS, _work, complex_sums, is_signal, squared_norm

GRAD_METRICS = (S.GRAD_NORM, S.GRAD_IN_NORM)


def compiling() -> bool:
    """True while Dynamo traces (``torch.compiler.is_compiling``; False on torch versions without it)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def device_of(modules: Iterable[torch.nn.Module]) -> torch.device:
    """The device of the first parameter or buffer of ``modules`` (the CPU when they have none)."""
    for module in modules:
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device("cpu")


def slot_of(site: int, metric: str) -> int:
    """Row of (site, gradient metric) in the :class:`GradLeaf`."""
    return 2 * site + GRAD_METRICS.index(metric)


class GradLeaf:
    """A leaf tensor of shape ``(2 * n_sites, 2)`` that no optimizer sees; its ``.grad`` row ``slot`` holds
    ``[sum of ||g||^2 over the taps of that slot, number of taps whose backward ran]`` after a backward."""

    def __init__(self, n_sites: int) -> None:
        self.n_slots = 2 * n_sites
        self._leaf: Dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        """The leaf on ``device`` (made at install time, before tracing, so tracing never creates one)."""
        leaf = self._leaf.get(device)
        if leaf is None:
            leaf = torch.zeros(self.n_slots, 2, dtype=torch.float32, device=device, requires_grad=True)
            self._leaf[device] = leaf
        return leaf

    def take(self) -> List[Tuple[torch.Tensor]]:
        """The gradients accumulated since the last call (one per device), reset for the next step."""
        grads = []
        for leaf in self._leaf.values():
            if leaf.grad is not None:
                grads.append(leaf.grad)
                leaf.grad = None
        return grads


class Tap(torch.autograd.Function):
    """Identity in forward (a copy, so later in-place changes of the output are legal); in backward the incoming
    gradient passes through unchanged and ``[||g||^2 / scale^2, 1]`` goes to row ``slot`` of the leaf's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, leaf: torch.Tensor, slot: int,
                scale: Optional[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.slot = slot
        ctx.n_slots = leaf.shape[0]
        ctx.leaf_device = leaf.device
        ctx.scaled = scale is not None
        if scale is not None:
            ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        sq = squared_norm(g).to(torch.float32).reshape(())
        if ctx.scaled:
            (scale,) = ctx.saved_tensors
            factor = scale.detach().to(sq.device, sq.dtype).reshape(())
            sq = sq / (factor * factor)
        row = torch.stack([sq, torch.ones_like(sq)]).to(ctx.leaf_device)
        d_leaf = torch.zeros(ctx.n_slots, 2, dtype=torch.float32, device=ctx.leaf_device)
        d_leaf = d_leaf.index_copy(0, torch.tensor([ctx.slot], device=ctx.leaf_device), row.reshape(1, 2))
        return g, d_leaf, None, None


def traced_sums(x: torch.Tensor, extras: Sequence[Tuple[str, ...]]) -> torch.Tensor:
    """The raw ``moments`` vector of :func:`gradscope.engine.metrics.activation_sums` for traced hooks: one pass in
    float64 (shift 0, ``sum(x)``, ``sum(x^2)`` accumulated in float64, whose 53 bits keep the one-pass variance exact
    to ~1e-8 even for ``mean^2 / var = 1e8``), exact counts, nothing read back; inductor fuses it into one kernel."""
    if x.numel() == 0:  # finishes to no value (spec.finish)
        return torch.zeros(3 + sum(len(k) for k in extras), dtype=torch.float64, device=x.device)
    if x.is_complex():
        return complex_sums(x, extras).to(torch.float64)
    flat = _work(x)
    d = flat.to(torch.float64)
    parts = [torch.zeros((), dtype=torch.float64, device=x.device), d.sum(), (d * d).sum()]
    for key in extras:
        if key == ("zeros",):
            parts.append((flat == 0).sum().to(torch.float64))
        elif key == ("nonfinite",):
            parts.append((~torch.isfinite(flat)).sum().to(torch.float64))
        elif key == ("min", "max"):
            parts.extend(p.to(torch.float64) for p in torch.aminmax(flat))
        else:  # a slot this function does not know: the metric's own reduction
            parts.extend(p.to(torch.float64) for p in SLOT_REDUCTIONS[key].centred(flat, flat.clone()))
    return torch.stack(parts)


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
    """``value`` with the tensor ``old`` (its primary output) replaced by ``new``, where the container allows it."""
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
    return value, False


def drain(events: List[Tuple], next_call: Callable[[int], int]) -> List[Tuple[int, int, Tuple]]:
    """Turn the traced hooks' events into ``(site, call, event)`` in the order they ran (``next_call`` assigns call
    indices and depths as the eager hooks do). ``events`` is emptied in place (the traced code appends to it)."""
    out: List[Tuple[int, int, Tuple]] = []
    open_calls: Dict[int, List[int]] = {}
    for event in events:
        site, kind = event[0], event[1]
        if kind == "pre":
            call = next_call(site)
            open_calls.setdefault(site, []).append(call)
            out.append((site, call, event))
        elif kind == "sub":
            stack = open_calls.get(site)
            if stack:
                out.append((site, stack[-1], event))
        else:
            stack = open_calls.get(site)
            call = stack.pop() if stack else next_call(site)
            out.append((site, call, event))
    del events[:]
    return out


def calls_per_site(ran: Sequence[Tuple[int, int, Tuple]]) -> Dict[int, int]:
    """Site -> how many calls of it ran (a gradient slot sums over calls, so it is a norm for a single call)."""
    calls: Dict[int, int] = {}
    for site, _, event in ran:
        if event[1] == "post":
            calls[site] = calls.get(site, 0) + 1
    return calls


def record(ran: Sequence[Tuple[int, int, Tuple]], grad: Optional[torch.Tensor], step: int, forward: Tuple[str, ...],
           add: Callable[..., None], multi_call: Callable[[int], None]) -> None:
    """Buffer entries (``add`` is the recorder's) for the drained events of one step: forward sums, and the gradient
    slots of ``grad`` (the leaf's gradient, None without a backward) for sites called once (``multi_call(site)``
    for the others)."""
    calls = calls_per_site(ran)
    inputs_tapped: Dict[Tuple[int, int], bool] = {}
    for site, call, event in ran:
        kind = event[1]
        if kind == "pre":
            inputs_tapped[(site, call)] = event[2]
        elif kind == "sub":
            add(step, site, call, event[2], event[3], event[4], spec.MOMENTS)
        elif event[2] is not None:
            add(step, site, call, forward, event[2], event[3], spec.MOMENTS)
    if grad is None:
        return
    for site, call, event in ran:
        if event[1] != "post":
            continue
        if calls[site] > 1:  # a slot sums the taps of all calls: not a per-call norm
            multi_call(site)
            continue
        for metric, on in ((S.GRAD_NORM, event[4]), (S.GRAD_IN_NORM, inputs_tapped.get((site, call), False))):
            if on:
                add(step, site, call, (metric,), grad[slot_of(site, metric)], event[3], spec.SQNORM)
