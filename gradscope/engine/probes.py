"""HOW to hook: forward pre-hooks and forward hooks on every site, tensor hooks for gradients.

Why tensor hooks and not ``register_full_backward_hook``: a full backward hook wraps the block's output in a view,
and a later in-place op on it (torchvision's ``out += identity`` after a hooked BatchNorm, ``ReLU(inplace=True)``)
raises "Output 0 of BackwardHookFunction is a view and is being modified inplace". A hook registered on the output
tensor inside the forward hook stays on the autograd node that produced that value, so it receives d loss / d output
even when the tensor is modified in place afterwards; forward statistics are computed inside the forward hook, before
anything downstream can mutate the tensor.

Hooks exist only during recorded steps (an unrecorded step runs PyTorch's hook-free path). Per call they run a
handful of reductions on detached tensors (see :mod:`gradscope.engine.metrics` for what stays on the device) and never
keep a reference to an activation.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from gradscope import schema as S
from gradscope.engine import portable, spec
from gradscope.engine.hookargs import block_input, first_tensor, grad_inputs, transformed
from gradscope.engine.metrics import Raw, Scratch, activation_sums
from gradscope.engine.gradwatch import GradWatch
from gradscope.engine.recorder import Recorder
from gradscope.engine.sites import Site
from gradscope.engine.state import TRAIN, grad_modes
from gradscope.engine import shared as SH
from gradscope.engine import traced as T

_current_graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. activation checkpointing recomputes a forward)."""
    return _current_graph_task_id() != -1


_SKIPPED = -1  # pushed by a pre-hook that records nothing, so its post-hook knows


def _recomputed(call: int) -> int:
    """The stack entry of a forward that activation checkpointing recomputes inside backward (its statistics are
    the original forward's; only its gradient hooks are new): negative, so post- and sub-hooks tell it apart."""
    return -2 - call


def is_residual(module: nn.Module) -> bool:
    """A residual block in gradscope's sense: it exposes ``branch`` (F) and ``shortcut`` submodules."""
    return isinstance(getattr(module, "branch", None), nn.Module) and \
        isinstance(getattr(module, "shortcut", None), nn.Module)


class MetricSet:
    """Which metric groups the hooks compute, from the user's ``metrics=`` choice."""

    def __init__(self, metrics: Optional[Tuple[str, ...]] = None) -> None:
        wanted = set(S.DEFAULT_METRICS if metrics is None else metrics)
        core = tuple(m for m in S.FORWARD_METRICS if spec.SPECS[m].raw == spec.CORE_SLOTS)
        extras = tuple(m for m in S.FORWARD_METRICS if m in wanted and m not in core)
        # mean, var and rms come from the same sums; the ones not asked for are kept internal ("_" names)
        moments = tuple(m if m in wanted else "_" + m for m in core)
        self.forward = moments + extras if wanted & set(S.FORWARD_METRICS) else ()
        #: the extra raw slots the forward hook computes, in the order of ``forward`` (see engine/spec.py)
        self.extras = tuple(spec.SPECS[m].raw for m in extras)
        self.grad_out = S.GRAD_NORM in wanted
        self.grad_in = S.GRAD_IN_NORM in wanted
        self.branch = S.BRANCH_VAR in wanted
        self.shortcut = S.SHORTCUT_VAR in wanted
        self.params = tuple(m for m in (S.PARAM_NORM, S.PARAM_GRAD_NORM) if m in wanted)
        self.update = S.UPDATE_RATIO in wanted
        self.optstate = tuple(m for m in (S.ADAM_M_NORM, S.ADAM_V_NORM) if m in wanted)
        self.batch = S.BATCH_SIZE in wanted


class Probe:
    """The hooks of one scope on its sites.

    Module hooks are present only while a step is recorded: :meth:`install` at the start of a recorded step,
    :meth:`uninstall` at the start of one that is not, so an unrecorded step runs the model's own hook-free fast path
    and costs nothing at all. gradscope's hooks are *prepended* each time they are installed: they see what each
    module receives and returns before other forward hooks change it (a hook registered later with ``prepend=True``
    runs before them until their next installation). :meth:`remove` takes away exactly these hooks and nothing
    else, and stops gradient hooks still pending in a graph from recording.
    """

    def __init__(self, sites: List[Site], recorder: Recorder, metrics: MetricSet, forwards: str = TRAIN) -> None:
        self.sites = sites
        #: ``torch.is_grad_enabled()`` values of the forwards recorded (``attach(forwards=...)``, engine/state.py)
        self.modes = grad_modes(forwards)
        self.rec = recorder
        self.state = recorder.state
        self.m = metrics
        self.handles: List[Any] = []
        self.guarded: List[nn.Module] = []  # modules given the copy-and-pickle guard (released at remove())
        #: with ``root``: called at the model's first training forward of each recorded step (engine/replaced.py)
        self.root: Optional[nn.Module] = None
        self.root_check: Optional[Callable[[], Optional[Callable[[], Any]]]] = None  # a weakref.WeakMethod
        self._guarded_ids: set = set()
        self.stacks: List[List[int]] = [[] for _ in sites]
        self.alive = True
        self.scratch = Scratch()  # one reused work buffer: no page-faulted allocation per hook call
        self._last: Optional[Tuple[Any, int, Raw]] = None
        self.grads = GradWatch(self.state, self.rec, self)  # the eager gradient hooks (engine/gradwatch.py)
        #: returns a GradScaler's current scale as a device tensor (or None): gradients are divided by it
        self.scale: Optional[Callable[[], Optional[torch.Tensor]]] = None
        #: under torch.compile (see gradscope.engine.traced): device buffers the traced hooks write, drained at
        #: scope.step(); made at the first install, before any tracing
        self.traced: List[T.SiteBuffers] = []
        self._order: Dict[torch.device, torch.Tensor] = {}
        self.compiled = False  # traced hooks ran: module hooks then stay installed (no recompile per install)
        self._drained: Optional[int] = None  # step drained just before the scope's flush (which then reads nothing)
        self._watch: Optional[T.CompileWatch] = None  # did Dynamo compile anything since attach (else: nothing to drain)
        #: ``keep(site, args, kwargs)``: called with each block call's inputs when set (the NaN operator tracer)
        self.keep: Optional[Callable[[int, Tuple[Any, ...], Dict[str, Any]], None]] = None
        self._warned_calls = False
        self._batch_step = -1  # the step whose batch size is recorded (one row per recorded step)
        self._plan: Optional[List[Tuple[nn.Module, Callable, str]]] = None  # the module hooks (_hook_plan)
        #: under compile, per site: the site whose tapped output is provably this site's input (SH.shared_inputs)
        self.shared_in: List[Optional[int]] = [None] * len(sites)
        self._pairs: Optional[List[Tuple[int, int]]] = None  # SH.sequential_pairs, found at the first install
        #: ``share_source(site)``: the site whose output tap the traced pre-hook uses (-1: none), decided when Dynamo
        #: traces it (a constant in the graph, no guard: SH.source_now)
        self.share_source = SH.source_check(self)
        self._warned_lost: set = set()  # kinds of gradient rows left out under compile, warned once each

    def install(self) -> None:
        """Register the module hooks (idempotent)."""
        if self.handles or not self.alive:
            return
        if self._watch is None and self.alive:
            self._watch = T.CompileWatch()
        if not self.traced:
            width = 3 + sum(len(key) for key in self.m.extras) if self.m.forward else 0
            for site in self.sites:
                device = T.device_of([site.module])
                self.traced.append(T.SiteBuffers(device, width))
                if device not in self._order:
                    self._order[device] = torch.zeros((), dtype=torch.float64, device=device)
        try:
            for module, hook, kind in self._hook_plan():
                self._guard(module)
                if kind == "pre":
                    self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
                elif kind == "post":
                    self.handles.append(module.register_forward_hook(hook, with_kwargs=True, prepend=True))
                else:
                    self.handles.append(module.register_forward_hook(hook, prepend=True))
            if self.root is not None and self.root_check is not None:
                self._guard(self.root)
                self.handles.append(self.root.register_forward_pre_hook(portable.mark(self._root_hook())))
            modules = [site.module for site in self.sites]
            if self._pairs is None and self.root is not None:
                self._pairs = SH.sequential_pairs(self.root, modules)
            self.shared_in = SH.shared_inputs(self._pairs or (), modules, {h.id for h in self.handles})
        except BaseException:
            self.uninstall()
            raise

    def _hook_plan(self) -> List[Tuple[nn.Module, Callable, str]]:
        """``(module, hook, kind)`` for every module hook, made once and reused by every :meth:`install` (a recorded
        step re-registers the same functions instead of building and wrapping new closures each time)."""
        if self._plan is None:
            mark = portable.mark  # copies and pickles of the model leave marked hooks out (engine/portable.py)
            plan: List[Tuple[nn.Module, Callable, str]] = []
            for index, site in enumerate(self.sites):
                plan.append((site.module, mark(T.eager_at_top_level(self._pre_hook(index))), "pre"))
                plan.append((site.module, mark(T.eager_at_top_level(self._post_hook(index))), "post"))
                if not is_residual(site.module):
                    continue
                for attr, metric, on in (("branch", S.BRANCH_VAR, self.m.branch),
                                         ("shortcut", S.SHORTCUT_VAR, self.m.shortcut)):
                    if on:
                        plan.append((getattr(site.module, attr),
                                     mark(T.eager_at_top_level(self._sub_hook(index, (metric,)))), "sub"))
            self._plan = plan
        return self._plan

    def replan(self) -> None:
        """The sites changed (a module replaced after attach): make the hooks again, re-registered if installed."""
        self._plan = None
        self._pairs = None
        if self.handles:
            self.uninstall()
            self.install()

    def _root_hook(self) -> Callable:
        state, check = self.state, self.root_check

        def root_hook(module: nn.Module, args: Any) -> None:
            if state.active and not state.root_checked and torch.is_grad_enabled() and not T.compiling():
                state.root_checked = True
                method = check()  # a weak method: the scope's, while it lives
                if method is not None:
                    method()
            return None

        return root_hook

    def uninstall(self) -> None:
        """Remove the module hooks; gradient hooks already registered in a live graph still record."""
        while self.handles:
            self.handles.pop().remove()
        self._last = None
        self.grads.forget()

    def remove(self) -> None:
        """Remove every hook for good: module hooks now, pending gradient hooks record nothing any more."""
        self.alive = False
        self.uninstall()
        self.grads.close()
        if self._watch is not None:
            self._watch.close()
        while self.guarded:
            portable.release(self.guarded.pop())
        self._guarded_ids.clear()

    def _guard(self, module: nn.Module) -> None:
        """Keep this module's gradscope hooks out of its copies and pickles (engine/portable.py)."""
        portable.guard(module)
        if id(module) not in self._guarded_ids:
            self._guarded_ids.add(id(module))
            self.guarded.append(module)

    # ---- hook factories ------------------------------------------------------------------------------------------
    def _pre_hook(self, site: int) -> Callable:
        state, m, stack, modes = self.state, self.m, self.stacks[site], self.modes

        def pre_hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            if not state.active:
                return None
            recorded = torch.is_grad_enabled() in modes  # a training forward builds a graph (engine/state.py)
            if T.compiling():
                return self._traced_pre(site, args, kwargs) if recorded else None
            if not recorded:  # a validation forward between training steps: not this step's record
                state.skip_call(site)
                stack.append(_SKIPPED)
                return None
            if torch.is_grad_enabled():  # a training forward, also where the model's own forward never runs
                state.forward_seen = True
            x = block_input(args, kwargs)
            if transformed(x):
                stack.append(_SKIPPED)
                return None
            call = -1
            if in_backward():  # activation checkpointing recomputes the forward
                call = state.next_recompute_call(site)
                if call < state.calls[site]:
                    stack.append(_recomputed(call))
                else:  # reentrant checkpointing ran the forward without grad: the recomputation is the training one
                    call = -1
            if call < 0:
                call = state.next_call(site)
                stack.append(call)
                if self.keep is not None:  # inputs kept for a NaN's operator (engine/oporigin.py)
                    self.keep(site, args, kwargs)
            if m.grad_in and x is not None:
                inputs = grad_inputs(args, kwargs)
                if len(inputs) == 1:
                    self.grads.watch(inputs[0], site, call, S.GRAD_IN_NORM)
                elif inputs:
                    self.grads.watch_all(inputs, site, call, S.GRAD_IN_NORM)
            return None

        return pre_hook

    def _post_hook(self, site: int) -> Callable:
        rec, state, m, stack, modes = self.rec, self.state, self.m, self.stacks[site], self.modes

        def post_hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
            if not state.active:
                return None
            if T.compiling():
                return self._traced_post(site, output) if torch.is_grad_enabled() in modes else None
            if not stack:
                return None
            call = stack.pop()
            y = first_tensor(output)
            if y is None or call == _SKIPPED or transformed(y):
                return None
            fresh = call >= 0
            if not fresh:
                call = _recomputed(call)  # its own inverse
            if m.forward and fresh:
                sums = activation_sums(y, extras=m.extras, scratch=self.scratch)
                rec.add(state.step, site, call, m.forward, sums, y.numel(), spec.MOMENTS)
                if m.shortcut:  # only a shortcut hook ever recalls it
                    self._remember(y, sums)
            if m.batch and self._batch_step != state.step and y.dim() and fresh and \
                    (state.depth.get(site) == 0 or not in_backward()) and \
                    (torch.is_grad_enabled() or True not in modes):
                # reentrant checkpointing: forward order; forwards="all": a training forward's batch, not a
                # validation forward's that came first
                self._batch_step = state.step  # host-side shape: no device work, no sync
                rec.add(state.step, site, call, (S.BATCH_SIZE,), (float(y.shape[0]),), 0, spec.VALUE)
            if m.grad_out and y.requires_grad:
                self.grads.watch(y, site, call, S.GRAD_NORM)
            return None

        return post_hook

    def _sub_hook(self, site: int, group: Tuple[str, ...]) -> Callable:
        rec, state, stack = self.rec, self.state, self.stacks[site]

        group = ("_" + S.ACT_MEAN,) + group + ("_" + S.ACT_RMS,)  # the mean lets ranks combine the variance

        def sub_hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
            if state.active and T.compiling():
                y = first_tensor(output)
                if y is not None and torch.is_grad_enabled() in self.modes:
                    T.note_sub(self.traced[site], int(group[1] == S.SHORTCUT_VAR), y)
                return None
            if not state.active or not stack or stack[-1] < 0:  # skipped, or recomputed by checkpointing
                return None
            y = first_tensor(output)
            if y is not None and not transformed(y):
                sums = self._recall(y)  # an identity shortcut returns the previous block's output: measured already
                if sums is None:
                    sums = activation_sums(y, extras=(), scratch=self.scratch)
                rec.add(state.step, site, stack[-1], group, sums[:3], y.numel(), spec.MOMENTS)
            return None

        return sub_hook

    # ---- under torch.compile (traced by Dynamo: tensors and constants only, see gradscope.engine.traced) ----------
    def _tap(self, site: int, metric: str) -> Callable[[torch.Tensor], torch.Tensor]:
        leaf, slot = self.traced[site].leaf, T.GRAD_METRICS.index(metric)
        scale = self.scale() if self.scale is not None else None
        return lambda t: T.Tap.apply(t, leaf, slot, scale)

    def _traced_pre(self, site: int, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        buf = self.traced[site]
        tapped, new_args, new_kwargs = 0, args, kwargs
        if self.m.grad_in and args and SH.tapped_by_previous(args[0]):
            source = self.share_source(site)  # run by Dynamo while it traces: a constant here
            if source >= 0:  # the previous block's tapped output: its reduction serves both
                T.note_pre(buf, self._order[buf.count.device], SH.SHARED + source)
                return None
        if self.m.grad_in:
            tap = self._tap(site, S.GRAD_IN_NORM)
            if args:  # the primary input only (see hookargs.primary_input); a dict input is measured in eager mode only
                first, tapped = SH.map_grad_tensors(args[0], tap)
                new_args = (first,) + tuple(args[1:])
            if not tapped and kwargs and "hidden_states" in kwargs:
                hidden, tapped = SH.map_grad_tensors(kwargs["hidden_states"], tap)
                new_kwargs = dict(kwargs, hidden_states=hidden)
        T.note_pre(buf, self._order[buf.count.device], SH.TAPPED if tapped else SH.UNTAPPED)
        return (new_args, new_kwargs) if tapped else None

    def _traced_post(self, site: int, output: Any) -> Any:
        m = self.m
        y = first_tensor(output)
        if y is None:
            return None
        new, tapped = output, False
        if m.grad_out and y.requires_grad:
            new, tapped = SH.replace_first(output, y, self._tap(site, S.GRAD_NORM)(y))
        # forwards="all": a validation forward's batch is not the step's (as in post_hook)
        T.note_post(self.traced[site], y, m.extras, bool(m.forward), tapped,
                    torch.is_grad_enabled() or True not in self.modes)
        return new if tapped else None

    def note_traced_scale(self) -> None:
        """Under compile with a GradScaler: keep the scale the traced taps divided by (before parameter norms)."""
        if self.scale is not None and any(buf.leaf.grad is not None for buf in self.traced):
            factor = self.scale()
            if factor is not None:
                self.state.note_grad_scale(factor)

    def drain_traced(self, flush_next: bool = False) -> None:
        """Move what the traced hooks wrote in this step into the recorder's buffer (called by the scope), reading it
        back together with the step's other buffered measurements: one transfer for the whole recorded step.
        ``flush_next``: the scope flushes right after, whose own call here then has nothing to read."""
        drained, self._drained = self._drained, None
        if drained == self.state.step:
            return
        if not self.traced or self._watch is None or not self._watch.seen:
            return
        self._drained = self.state.step if flush_next else None
        self._watch.close()  # seen: no need to listen any more
        state, rec = self.state, self.rec
        self.note_traced_scale()
        subs = tuple(("_" + S.ACT_MEAN, metric, "_" + S.ACT_RMS) if on else ()
                     for metric, on in ((S.BRANCH_VAR, self.m.branch), (S.SHORTCUT_VAR, self.m.shortcut)))
        on_device = rec.reducer is not None  # a collective combines device values at the flush
        pending = [] if on_device else [e for e in rec.buffer if isinstance(e.values, torch.Tensor)]
        many: Dict[int, int] = {}  # site -> calls in this step, for one warning naming every such block
        if T.drain(self.traced, state.next_call, state.step, self.m.forward, subs, rec.add,
                   lambda site, calls: many.__setitem__(site, max(calls, many.get(site, 0))),
                   pending, on_device, self.m.batch and self._batch_step != state.step,
                   lambda site: SH.eager_grad(rec.buffer, state.step, site) if state.calls[site] == 1 else None,
                   self._warn_lost):
            self.compiled = True
        if many:
            self._warn_calls(many)
        for order in self._order.values():
            order.zero_()

    def _warn_calls(self, calls: Dict[int, int]) -> None:
        """Once per scope: every block that ran more than once in a compiled step, and what that costs."""
        if not self._warned_calls:
            self._warned_calls = True
            names = ", ".join(f"{self.sites[site].name!r} ({n} calls)" for site, n in sorted(calls.items())[:8])
            more = f" and {len(calls) - 8} more" if len(calls) > 8 else ""
            over = f"; calls after the first {T.MAX_CALLS} of a step share the last call's forward row" if \
                max(calls.values()) > T.MAX_CALLS else ""
            warnings.warn(f"gradscope: under torch.compile, {len(calls)} block(s) ran more than once in step "
                          f"{self.state.step}: {names}{more}; their gradient norms are recorded only for blocks "
                          f"called once per step (gradient accumulation: record in eager mode, or compile the "
                          f"model without gradscope's hooks){over}", RuntimeWarning, stacklevel=4)

    def _warn_lost(self, site: int, source: int, why: str) -> None:
        if (source < 0) not in self._warned_lost:  # once per kind (SH.lend, T.drain)
            self._warned_lost.add(source < 0)
            names = [s.name for s in self.sites]
            warnings.warn(SH.lost_message(names, site, source, why, self.state.step), RuntimeWarning, stacklevel=4)

    def _remember(self, y: torch.Tensor, sums: Raw) -> None:
        """Keep the sums of the latest block output (weakly), so a shortcut that returns it needs no new pass."""
        self._last = (weakref.ref(y), y._version, sums)

    def _recall(self, y: torch.Tensor) -> Optional[Raw]:
        last = self._last
        if last is not None and last[0]() is y and last[1] == y._version:
            return last[2]
        return None
