"""The hooks' path under ``torch.compile``: pure tensor code that Dynamo traces into the graph, no Python state.

When Dynamo traces a block's hooks (``torch.compiler.is_compiling()``), they must not read or change Python state
that varies per step: every such read becomes a guard (a recompile when it changes, the limit of 8 soon hit), every
``.item()`` a graph break, and any Python side effect inside ``torch.utils.checkpoint`` makes Dynamo give up on the
whole frame. So under compile the hooks only write into device tensors made before tracing (:class:`SiteBuffers`):

* the forward raw sums (one fused float64 pass, :func:`traced_sums`), the element count and the call's order in
  the step go into rows indexed by a call counter that lives on the device; :func:`drain` numbers the calls and
  fixes depths at ``scope.step()``, in the order the calls ran, exactly as the eager hooks do;
* gradients are measured by :class:`Tap`, an identity autograd function whose backward adds ``||g||^2`` (and a
  count) into a row of the gradient of a per-site leaf tensor: autograd itself accumulates the measurement, so the
  backward needs no Python hook and AOTAutograd compiles it with the rest of the backward;
* the one Python value they read is whether the step is recorded, so a compiled model has two variants, recorded
  and unrecorded, and an unrecorded step runs a graph without any gradscope operation.

A hook whose frame Dynamo would compile on its own (the model broke its graph around a block: data-dependent routing
in a hand-written MoE) is not compiled at all (:func:`eager_at_top_level`): it runs the eager hooks, which cost less
than compiling one variant per block.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import math
import sys
import weakref

import torch

from gradscope import schema as S
from gradscope.engine import spec
from gradscope.engine.metrics import SLOT_REDUCTIONS, _work, complex_sums, squared_norm
from gradscope.engine.shared import SHARED, TAPPED, OutTap, lend

GRAD_METRICS = (S.GRAD_NORM, S.GRAD_IN_NORM)  # rows of a site's gradient leaf


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


MAX_CALLS = 16  # calls of one site per step kept apart under compile (a later call overwrites the last row)
_PRE, _POST_META, _SUB = 2, 4, 5  # widths: [order, input tapped]; [ran, numel, output tapped, batch]; [ran, numel, 3 sums]


class CompileWatch:
    """Whether Dynamo may have compiled anything since this watch was made (a host flag, set by Dynamo's
    compile-start callback). Until then no traced hook can have run, so there is nothing to :func:`drain` and nothing
    is read back: an eager run keeps its one transfer per recorded step.

    ``torch._dynamo`` is not imported here (``import gradscope`` and ``attach()`` stay light): when it was not loaded
    at attach time, nothing can have been compiled before it is loaded, and once it is, the watch says yes.
    """

    def __init__(self) -> None:
        self._seen = False
        self._callback: Optional[Callable[[Any], None]] = None
        handler = _callbacks()
        if handler is None:
            return
        ref = weakref.ref(self)

        def started(_: Any) -> None:
            watch = ref()
            if watch is not None:
                watch._seen = True

        self._callback = handler.register_start_callback(started)

    @property
    def seen(self) -> bool:
        """True once a compilation started (or Dynamo was loaded after the watch was made)."""
        if not self._seen and self._callback is None and "torch._dynamo" in sys.modules:
            self._seen = True
        return self._seen

    def close(self) -> None:
        """Stop listening (outside a compilation: the handler's list is not being iterated then)."""
        handler, callback, self._callback = _callbacks(), self._callback, None
        if handler is not None and callback is not None and callback in handler.start_callbacks:
            handler.remove_start_callback(callback)


def _callbacks() -> Any:
    """Dynamo's compile callback handler if Dynamo is loaded (never imports it)."""
    module = sys.modules.get("torch._dynamo.callback")
    handler = getattr(module, "callback_handler", None)
    return handler if hasattr(handler, "register_start_callback") else None


_SKIPPED_CODES: set = set()  # code objects already given the skip strategy (one call per code, not per hook)


def eager_at_top_level(fn: Callable) -> Callable:
    """Let Dynamo inline ``fn`` into a graph it traces, but never compile a frame of it on its own (nor anything
    it calls then): there the eager hooks run, as in a model that is not compiled. Returns ``fn``.

    Without this, a hook that runs after a graph break (a hand-written MoE breaks its graph on data-dependent
    routing) is compiled as a frame of its own, once per block and per variant, until Dynamo's recompile limit.
    Uses Dynamo's per-code frame strategy (torch >= 2.6) from its C extension, so that attaching never imports
    ``torch._dynamo`` (1.5 s of start-up); the strategy belongs to the code object that every hook made by one
    factory shares, so it is set once. On torch versions without it, ``fn`` is left as it is.
    """
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is None or code in _SKIPPED_CODES:
        return fn
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
    except ImportError:
        return fn
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy
    except ImportError:  # a torch that names them only in Python
        from torch._dynamo.types import FrameAction as _FrameAction, FrameExecStrategy as _FrameExecStrategy
    set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
    _SKIPPED_CODES.add(code)
    return fn


class SiteBuffers:
    """The device tensors the traced hooks of one site write into (made at install time, before any tracing).

    Dynamo lifts them into the graph as inputs that the graph mutates in place (like BatchNorm's running statistics),
    so the traced hooks change no Python object: no guard on a list's length (the recompiles of a routed MoE), and
    nothing that ``torch.utils.checkpoint``'s higher-order op refuses (a Python side effect makes Dynamo give up on
    the whole frame). Rows are indexed by ``count`` read on the device: a call index costs no guard either.

    * ``pre[k]``  = ``[order of the call in the step (1, 2, ...), 1 if the input gradient is tapped]``
    * ``post[k]`` = ``[1, numel, 1 if the output gradient is tapped, leading dimension, raw sums...]``; the leading
      dimension is -1 for a 0-dim output and for a validation forward under ``forwards="all"``
    * ``sub[g, k]`` = ``[1, numel, shift, sum, sum of squares]`` of the residual branch (g=0) / shortcut (g=1)
    * ``leaf``: its ``.grad`` row 0 (output) / 1 (input) is ``[sum of ||g||^2 over the taps, taps that ran]``
    """

    def __init__(self, device: torch.device, width: int) -> None:
        kw = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.pre = torch.zeros(MAX_CALLS, _PRE, **kw)
        self.post = torch.zeros(MAX_CALLS, _POST_META + width, **kw)
        self.sub = torch.zeros(2, MAX_CALLS, _SUB, **kw)
        self.leaf = torch.zeros(2, 2, dtype=torch.float32, device=device, requires_grad=True)

    def reset(self) -> None:
        """Clear for the next step (host side, outside any graph)."""
        for t in (self.count, self.pre, self.post, self.sub):
            t.zero_()
        self.leaf.grad = None


def _const(ref: torch.Tensor, *values: Any) -> torch.Tensor:
    """``values`` as a 1-D float64 tensor on ``ref``'s device. On the CPU, when they are all Python numbers (static
    shapes), it is traced as one constant; elsewhere (no host-to-device copy in a graph) and for a size that Dynamo
    traces as a symbol (dynamic shapes) it is made on the device value by value."""
    if ref.device.type == "cpu" and all(isinstance(v, (int, float)) for v in values):
        return torch.tensor(values, dtype=torch.float64, device=ref.device)
    return torch.stack([torch.ones((), dtype=torch.float64, device=ref.device) * v for v in values])


def note_pre(buf: SiteBuffers, order: torch.Tensor, tapped: int) -> None:
    """Traced pre-hook: the call's order in the step and how its input gradient is measured (``tapped``: UNTAPPED,
    TAPPED or SHARED of engine/shared.py)."""
    order.add_(1)
    k = buf.count.clamp(max=MAX_CALLS - 1).reshape(1)
    buf.pre.index_copy_(0, k, torch.stack([order, torch.full_like(order, float(tapped))]).reshape(1, _PRE))
    buf.count.add_(1)


def _open_call(buf: SiteBuffers) -> torch.Tensor:
    return (buf.count - 1).clamp(0, MAX_CALLS - 1).reshape(1)


def note_post(buf: SiteBuffers, y: torch.Tensor, extras: Sequence[Tuple[str, ...]], forward: bool,
              tapped: bool, batch: bool = True) -> None:
    """Traced forward hook: the output's element count, whether its gradient is tapped, and its raw sums.

    ``batch``: whether this call may give the step's ``batch_size`` (False for a validation forward recorded under
    ``forwards="all"``: the eager hooks take the batch of a training forward, and so does :func:`drain`, which
    picks the first call whose batch is not -1). Grad mode is a guard of the traced graph, so the flag is a
    constant of each graph."""
    y = y.detach()
    meta = (1.0, y.numel(), float(tapped), y.shape[0] if y.dim() and batch else -1)
    row = _sums_row(buf.post, meta, y, extras) if forward else _const(buf.post, *meta)
    buf.post.index_copy_(0, _open_call(buf), row.reshape(1, -1))


def note_sub(buf: SiteBuffers, which: int, y: torch.Tensor) -> None:
    """Traced hook on a residual block's branch (``which`` 0) or shortcut (1): raw sums of the open call."""
    y = y.detach()
    row = _sums_row(buf.sub, (1.0, y.numel()), y, ())
    buf.sub[which].index_copy_(0, _open_call(buf), row.reshape(1, _SUB))


class Tap(torch.autograd.Function):
    """Identity in forward (a copy, so later in-place changes of the output are legal); in backward the incoming
    gradient passes through unchanged and ``[||g||^2 / scale^2, 1]`` goes to row ``slot`` (0 output, 1 input) of the
    site leaf's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, leaf: torch.Tensor, slot: int,
                scale: Optional[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.slot = slot
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
        row = torch.nn.functional.pad(sq.reshape(1), (0, 1), value=1.0).to(ctx.leaf_device)  # [sq, 1]
        d_leaf = torch.nn.functional.pad(row, (2 * ctx.slot, 2 - 2 * ctx.slot)).reshape(2, 2)  # in row ``slot``
        return g, d_leaf, None, None


def traced_sums(x: torch.Tensor, extras: Sequence[Tuple[str, ...]]) -> torch.Tensor:
    """The raw ``moments`` vector of :func:`gradscope.engine.metrics.activation_sums` for traced hooks: one pass in
    float64 (shift 0, ``sum(x)``, ``sum(x^2)`` accumulated in float64, whose 53 bits keep the one-pass variance exact
    to ~1e-8 even for ``mean^2 / var = 1e8``), exact counts, nothing read back; inductor fuses it into one kernel.
    The counts use the reductions that are fast without fusion too (``aot_eager``, or a backend that does not fuse):
    ``x == 0`` and ``isfinite`` reduced as booleans cost about 4-5x a cast-to-bool sum on the CPU."""
    if x.numel() == 0:  # finishes to no value (spec.finish)
        return torch.zeros(3 + sum(len(k) for k in extras), dtype=torch.float64, device=x.device)
    if x.is_complex():
        return complex_sums(x, extras).to(torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=x.device), raw_sums(x, extras)])


def _sums_row(ref: torch.Tensor, values: Tuple[Any, ...], y: torch.Tensor,
              extras: Sequence[Tuple[str, ...]]) -> torch.Tensor:
    """``values`` (constants) followed by :func:`traced_sums` of ``y``; the shift 0 of a real tensor's sums joins the
    constants, which saves an operation per call."""
    if y.numel() and not y.is_complex():
        return torch.cat([_const(ref, *values, 0.0), raw_sums(y, extras)])
    return torch.cat([_const(ref, *values), traced_sums(y, extras)])


def raw_sums(x: torch.Tensor, extras: Sequence[Tuple[str, ...]]) -> torch.Tensor:
    """:func:`traced_sums` of a real tensor with elements, without its leading shift (0): ``[sum(x), sum(x^2),
    extras...]`` in float64."""
    flat = _work(x)
    d = flat.to(torch.float64)
    parts = [d.sum(), torch.dot(d, d)]  # dot: no float64 square materialised (inductor decomposes it into the sum)
    count = torch.int32 if flat.numel() < 2**31 else torch.int64
    for key in extras:
        if key == ("zeros",):  # bool(NaN) is True: a NaN is not a zero; -0.0 is
            parts.append(flat.numel() - flat.bool().sum(dtype=count))
        elif key == ("nonfinite",):  # x * 0 is 0 for every finite x and NaN for NaN and +-Inf
            parts.append((flat * 0).bool().sum(dtype=count))
        elif key == ("min", "max"):
            parts.extend(torch.aminmax(flat))
        else:  # a slot this function does not know: the metric's own reduction
            parts.extend(SLOT_REDUCTIONS[key].centred(flat, flat.clone()))
    return torch.stack([p.to(torch.float64) for p in parts])


def _site_tensors(buf: SiteBuffers) -> List[torch.Tensor]:
    grad = buf.leaf.grad if buf.leaf.grad is not None else torch.full_like(buf.leaf, math.nan)
    return [buf.count.reshape(1).to(torch.float64), buf.pre.reshape(-1), buf.post.reshape(-1),
            buf.sub.reshape(-1), grad.detach().reshape(-1).to(torch.float64)]


def read_back(buffers: Sequence[SiteBuffers], extra: Sequence[torch.Tensor]) -> Tuple[List[List[float]],
                                                                                        List[List[float]]]:
    """Everything the traced hooks wrote, per site, and the values of ``extra`` tensors (the step's other buffered
    measurements), as host floats: one transfer per device, the step's only one."""
    parts: Dict[torch.device, List[Tuple[int, int, torch.Tensor]]] = {}
    for i, buf in enumerate(buffers):
        for t in _site_tensors(buf):
            parts.setdefault(t.device, []).append((0, i, t))
    for j, t in enumerate(extra):
        parts.setdefault(t.device, []).append((1, j, t.detach().reshape(-1).to(torch.float64)))
    sites: List[List[float]] = [[] for _ in buffers]
    others: List[List[float]] = [[] for _ in extra]
    for items in parts.values():
        flat = torch.cat([t for _, _, t in items]).tolist()
        offset = 0
        for kind, i, t in items:
            n = t.numel()
            (sites if kind == 0 else others)[i].extend(flat[offset:offset + n])
            offset += n
    return sites, others


def drain(buffers: Sequence[SiteBuffers], next_call: Callable[[int], int], step: int, forward: Tuple[str, ...],
          sub_groups: Sequence[Tuple[str, ...]], put: Callable[..., None],
          multi_call: Callable[[int, int], None], pending: Sequence[Any] = (), on_device: bool = False,
          batch: bool = False, eager_grad: Callable[[int], Any] = lambda site: None,
          lost: Callable[[int, int, str], None] = lambda site, source, why: None) -> bool:
    """Buffer entries (``put`` is the recorder's ``add``) for what the traced hooks wrote in one step, then reset the
    buffers.

    Calls are numbered per site in the order they ran (``next_call`` assigns call indices and fixes depths, as the
    eager hooks do); gradient norms are recorded for sites called once (``multi_call(site, calls)`` for the others: a
    tap's row sums over calls) and seen by one backward (``lost(site, -1, why)`` for the others). The buffers and the
    device values of the ``pending`` entries (the step's other measurements, whose ``values`` become host floats
    here) come back in one transfer, so the flush that follows reads nothing more (``batch``: one ``batch_size`` row
    per step, at the first call that ran with a batch dimension, as the eager hooks write it; ``on_device``: the
    values go back to their device instead, without a sync, for a reducer that combines them across ranks there). A
    site whose pre-hook noted another site's output tap gets its ``grad_in_norm`` from
    :func:`gradscope.engine.shared.lend` (``eager_grad``, ``lost``: see there). Returns whether any traced hook ran.
    """
    extra = [e.values for e in pending]
    sites, others = read_back(buffers, extra)
    for entry, values in zip(pending, others):
        entry.values = tuple(values)
    pre_at = 1
    post_at = pre_at + _PRE * MAX_CALLS
    width = (len(sites[0]) - post_at - 2 * MAX_CALLS * _SUB - 4) // MAX_CALLS if sites else 0
    sub_at = post_at + width * MAX_CALLS
    grad_at = sub_at + 2 * MAX_CALLS * _SUB
    order: List[Tuple[float, int, int]] = []
    for site, flat in enumerate(sites):
        count = int(flat[0])
        if count > MAX_CALLS:
            multi_call(site, count)
        order.extend((flat[pre_at + _PRE * k], site, k) for k in range(min(count, MAX_CALLS)))
    if not order:
        for buf in buffers:
            buf.leaf.grad = None
        return False
    order.sort()
    calls: Dict[Tuple[int, int], int] = {}
    for _, site, k in order:
        calls[(site, k)] = next_call(site)
    post_batch = post_at + width * 0 + 3
    for _, site, k in order if batch else ():
        row_batch = sites[site][post_batch + width * k]
        if sites[site][post_at + width * k] and row_batch >= 0:
            put(step, site, calls[(site, k)], (S.BATCH_SIZE,), (float(row_batch),), 0, spec.VALUE)
            break

    def add(site: int, call: int, group: Tuple[str, ...], values: Tuple[float, ...], n: int, layout: str) -> None:
        device = buffers[site].count.device
        put(step, site, call, group,
            torch.tensor(values, dtype=torch.float64, device=device) if on_device else values, n, layout)

    def add_in(site: int, call: int, values: Any, n: int) -> None:  # a traced tap's [sq, taps], or an eager entry's
        if isinstance(values, torch.Tensor):
            put(step, site, call, (S.GRAD_IN_NORM,), values, n, spec.SQNORM)
        else:
            add(site, call, (S.GRAD_IN_NORM,), tuple(values), n, spec.SQNORM)

    borrowers: List[Tuple[int, int, int]] = []
    for site, (buf, flat) in enumerate(zip(buffers, sites)):
        count = int(flat[0])
        for k in range(min(count, MAX_CALLS)):
            row = flat[post_at + width * k: post_at + width * (k + 1)]
            if row[0] and forward:
                add(site, calls[(site, k)], forward, tuple(row[_POST_META:]), int(row[1]), spec.MOMENTS)
            for g, group in enumerate(sub_groups):
                sub = flat[sub_at + _SUB * (g * MAX_CALLS + k): sub_at + _SUB * (g * MAX_CALLS + k + 1)]
                if group and sub[0]:
                    add(site, calls[(site, k)], group, tuple(sub[2:]), int(sub[1]), spec.MOMENTS)
        grad, code = flat[grad_at:grad_at + 4], int(flat[pre_at + 1])
        if count and not math.isnan(grad[0]):
            if count > 1:  # a tap's row sums over the calls: not a per-call norm
                multi_call(site, count)
            elif grad[1] > 1:  # one output tap per call: a second backward through the graph added to the rows
                lost(site, -1, f"saw {int(grad[1])} backward passes")
            else:
                numel, tapped_out = flat[post_at + 1], flat[post_at + 2]
                if tapped_out:
                    add(site, calls[(site, 0)], (S.GRAD_NORM,), tuple(grad[0:2]), int(numel), spec.SQNORM)
                if code == TAPPED:  # an output without a floating tensor (a dataclass) wrote no numel: count 1
                    add(site, calls[(site, 0)], (S.GRAD_IN_NORM,), tuple(grad[2:4]),
                        int(numel) if flat[post_at] else 1, spec.SQNORM)
        if count == 1 and code >= SHARED:
            borrowers.append((site, calls[(site, 0)], code - SHARED))
        buf.reset()
    taps = [OutTap(int(f[0]), bool(f[post_at + 2]), (f[grad_at], f[grad_at + 1]), int(f[post_at + 1])) for f in sites]
    lend(borrowers, taps, add_in, eager_grad, lost)
    return True
