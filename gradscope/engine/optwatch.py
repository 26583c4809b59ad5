"""The hooks gradscope puts on the optimizers given to ``attach(optimizer=...)`` and on the model's own forward.

- **Which step an optimizer step belongs to.** ``optimizer.step()`` before ``scope.step()``: this step's; after it:
  the step just closed; with a closure (LBFGS, Lightning) the forward and backward run inside ``optimizer.step()``,
  so it belongs to the step the closure's forward opens. A flag-setting forward pre-hook on the model says whether a
  training forward ran since ``scope.step()`` (one call per forward; the block hooks are absent in unrecorded steps).
- **update_ratio** ``||theta_after - theta_before|| / ||theta_before||`` per block across the step of the optimizer
  that updates the block (engine/optimizers.py: one index per optimizer), in recorded steps only.
- **Wrappers that move the weights themselves** (Lookahead after the inner step, SAM-style wrappers around it;
  ``engine/optimizers.acts_after_step``): the inner optimizer's hooks take the copy, and the difference is taken
  once the wrapper's step is over: at the next forward of the model, the next optimizer step, ``scope.step()`` or
  a read of the records (``frame()``, ``flush()``, ``detach()``), whichever comes first.
- **Parameter gradients read before they are zeroed.** A loop that calls ``optimizer.zero_grad()`` (or lets
  accelerate do it) before ``scope.step()`` leaves nothing in ``.grad`` by then. When an optimizer steps (without a
  closure) inside a recorded step that ``scope.step()`` has not closed yet, its pre-hook reads ``param_grad_norm``
  of the blocks it updates right there, just before the update; ``scope.step()`` then reads ``.grad`` only for the
  blocks not read yet. The numbers are the same either way when nothing touches ``.grad`` in between.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from gradscope import schema as S
from gradscope.engine import params as P
from gradscope.engine import portable, spec
from gradscope.engine.alertkinds import Told
from gradscope.engine.lrschedule import LrSchedule, site_names
from gradscope.engine.amp import ScalerState
from gradscope.engine.recorder import Recorder
from gradscope.engine.sites import Site


#: recorded steps whose update each optimizer measured, kept (the latest ones) so that a long run's memory stays flat
_STEPS_KEPT = 8


def record_param_grads(rec: Recorder, index: P.ParamIndex, n_sites: int, amp: ScalerState, step: int,
                       skip: Optional[Set[int]] = None, optimizer: Any = None) -> Optional[List[int]]:
    """Buffer ``param_grad_norm`` of ``index``'s sites (all but ``skip``) for ``step``; returns the sites recorded,
    or None when no parameter has a ``.grad``. Gradients still holding a GradScaler's scale are divided by it
    (``optimizer``: the one whose gradients these are, read at its own step; see ScalerState.grads_still_scaled)."""
    grad_scale = rec.state.grad_scale
    scale = amp.still_in_grads(grad_scale) if amp.grads_still_scaled(grad_scale, optimizer) else None
    found = P.param_grad_norms(index, n_sites, scale)
    if found is None:
        return None
    sites, norms = found
    if skip:
        keep = [i for i, s in enumerate(sites) if s not in skip]
        if not keep:
            return []
        sites = [sites[i] for i in keep]
        norms = norms[torch.tensor(keep, device=norms.device)]
    rec.add_per_site(step, sites, S.PARAM_GRAD_NORM, norms, spec.SHARD if index.sharded else spec.VALUE)
    return sites


class OptimizerWatch:
    """The optimizer hooks of one scope (see the module doc). ``indexes[k]``: the blocks optimizer ``k`` updates.

    The hooks stay registered while the scope is attached; when the blocks' parameters or an optimizer's groups
    change (``add_param_group``, a block replaced), :meth:`reindex` swaps what they measure instead of registering
    them again. Why: a change noticed inside an optimizer's ``step()`` (Lightning's closure runs the forward there,
    after the step's pre-hooks) would otherwise remove the post-hook that finishes the step's ``update_ratio``.
    ``follow``: a weak method (an optimizer must not keep its scope alive) of the scope's check for such changes,
    which may call :meth:`reindex`; a pre-hook in a recorded step calls it before it reads anything, so a group
    added just before ``step()`` is measured in that step.
    """

    def __init__(self, model: nn.Module, sites: List[Site], rec: Recorder, amp: ScalerState,
                 optimizers: Sequence[Any], indexes: Sequence[P.ParamIndex], update: bool, grads: bool,
                 tracer: Any = None, follow: Optional[Callable[[], Any]] = None,
                 late: Optional[Sequence[bool]] = None) -> None:
        self.model, self.sites, self.rec, self.amp = model, sites, rec, amp
        self.tracer = tracer  # engine/oporigin.py: a NaN's replay needs to know about weight updates
        self.optimizers = list(optimizers)
        self.update, self.grads = update, grads
        self.follow = follow
        self.handles: List[Any] = []
        self.grads_read: Dict[int, Set[int]] = {}  # step -> sites whose param_grad_norm an optimizer pre-hook read
        self.stepped: Set[int] = set()  # recorded steps in which a given optimizer stepped (the latest few)
        #: per optimizer: its index and the buffers kept for it (P.Snapshot, P.Differences)
        self.indexes: List[P.ParamIndex] = []
        self._kept: List[Tuple[P.Snapshot, P.Differences]] = []
        #: per optimizer: (step, index, work buffer, copies) taken by its pre-hook, awaiting its post-hook
        self._pending: List[Optional[Tuple[int, P.ParamIndex, P.Differences, List[torch.Tensor]]]] = \
            [None] * len(self.optimizers)
        self._updated: List[Set[int]] = [set() for _ in self.optimizers]  # steps whose update each one measured
        #: per optimizer: whether its wrapper may move the weights after the inner step returns (then the update is
        #: measured at :meth:`settle`), and the pending update its post-hook left for then
        self._late = list(late) if late is not None else [False] * len(self.optimizers)
        self._unsettled: List[Optional[Tuple[int, P.ParamIndex, P.Differences, List[torch.Tensor]]]] = \
            [None] * len(self.optimizers)
        self.schedule = LrSchedule()  # each group's lr at the previous recorded step and its largest so far
        self._owners: Dict[int, Any] = {}  # id(ParamIndex) -> (index, its parameters, the blocks owning each)
        #: recorded step -> block -> what its optimizer step was told (update_band reads the lr schedule from it)
        self.told: Dict[int, Told] = {}
        self.keep_told = True  # False where no alert reads it (kept otherwise until the next flush)
        self.reindex(indexes)

    def reindex(self, indexes: Sequence[P.ParamIndex]) -> None:
        """Measure these blocks' parameters from now on (a pending update keeps the index it was taken with)."""
        self._owners = {}
        kept = []
        for k, index in enumerate(indexes):
            same = k < len(self.indexes) and P.same_params(index, self.indexes[k])
            kept.append(self._kept[k] if same else (P.Snapshot(index), P.Differences()))
        self.indexes, self._kept = list(indexes), kept

    def install(self) -> None:
        """Register the hooks (once, at attach)."""
        for opt in self.optimizers:
            if self.amp.enabled:  # only a scaler's gradients need to be told apart
                self.handles.append(opt.register_step_post_hook(self.amp.note_optimizer_step))
            if self.tracer is not None:  # a NaN's replay: were the weights updated?
                self.handles.append(opt.register_step_post_hook(self.tracer.optimizer_stepped))
        if self.update or self.grads:
            for k, opt in enumerate(self.optimizers):
                self.handles.append(opt.register_step_pre_hook(self._pre(k)))
                self.handles.append(opt.register_step_post_hook(self._post(k)))
        state = self.rec.state

        def mark_forward(*args: Any) -> None:
            if any(self._late):
                self.settle()  # a forward after a wrapper's step: the weights it moved are final
            if torch.is_grad_enabled():  # a validation forward opens no step (engine/state.py)
                state.mark_forward()

        portable.guard(self.model)  # copies and pickles of the model leave this hook out
        self.handles.append(self.model.register_forward_pre_hook(portable.mark(mark_forward)))

    def remove(self) -> None:
        """Remove every hook this watch added."""
        while self.handles:
            self.handles.pop().remove()
        portable.release(self.model)

    def read_grads_of(self, optimizer: Any) -> None:
        """Record ``param_grad_norm`` of the blocks ``optimizer`` updates now, in an open recorded step (what its
        pre-hook does when no closure is passed). For a caller that knows the step's closure runs no backward
        (Lightning's manual optimization wraps every ``step()`` in one): the gradient is the one it steps with."""
        state = self.rec.state
        for k, opt in enumerate(self.optimizers):
            if opt is optimizer and self.grads and state.active and self.indexes[k].params:
                read = record_param_grads(self.rec, self.indexes[k], len(self.sites), self.amp, state.step,
                                          self.grads_read.get(state.step), opt)
                if read:
                    self.grads_read.setdefault(state.step, set()).update(read)

    def take_grads_read(self, step: int) -> Set[int]:
        """The sites whose ``param_grad_norm`` of ``step`` an optimizer pre-hook has read already (forgotten now)."""
        return self.grads_read.pop(step, set())

    def _pre(self, k: int) -> Callable[..., None]:
        rec, n = self.rec, len(self.sites)

        def pre(opt: Any, args: Any, kwargs: Any) -> None:
            if any(self._late):
                self.settle()
            state = rec.state
            closure = P.passes_closure(opt, args, kwargs)
            step = state.step if state.forward_seen or closure else state.step - 1
            if step < 0 or not state.recorded(step):
                return
            self.stepped.add(step)
            if len(self.stepped) > _STEPS_KEPT:
                self.stepped.discard(min(self.stepped))
            follow = self.follow() if self.follow is not None and step == state.step and state.active else None
            if follow is not None:
                follow()  # parameters or groups changed since the last check: reindex() before reading
            index = self.indexes[k]
            if not index.params:
                return
            if self.grads and not closure and step == state.step and state.active:
                # scope.step() has not closed this step: read the gradients now, before anything zeroes them
                read = record_param_grads(rec, index, n, self.amp, step, self.grads_read.get(step), opt)
                if read:
                    self.grads_read.setdefault(step, set()).update(read)
            if self.update and step not in self._updated[k]:
                self._note_told(step, opt, index)
                measured = self._updated[k]
                measured.add(step)
                if len(measured) > _STEPS_KEPT:  # a step is never measured again once later ones were: keep a few
                    for old in sorted(measured)[:-_STEPS_KEPT // 2]:
                        measured.discard(old)
                copies, work = self._kept[k]
                self._pending[k] = (step, index, work, copies.take())

        return pre

    def _note_told(self, step: int, opt: Any, index: P.ParamIndex) -> None:
        """Keep what this step's optimizer steps told each block (a block of several optimizers: the largest lr)."""
        if not self.keep_told:
            return
        owners = self._owners.get(id(index))
        if owners is None or owners[0] is not index:
            owners = self._owners[id(index)] = (index, *site_names(index, self.sites))
        said = self.schedule.told(opt, owners[1], owners[2])
        before = self.told.get(step)
        self.told[step] = said if before is None else before.merged(said)

    def take_told(self) -> Dict[int, Told]:
        """What the optimizer steps of recorded steps were told since the last call (forgotten now)."""
        told, self.told = self.told, {}
        return told

    def _post(self, k: int) -> Callable[..., None]:
        def post(opt: Any, args: Any, kwargs: Any) -> None:
            pending, self._pending[k] = self._pending[k], None
            if pending is None:
                return
            if self._late[k]:  # its wrapper may still move the weights: measured at settle()
                self._unsettled[k] = pending
                return
            self._measure(pending)

        return post

    def settle(self) -> None:
        """Measure the updates that wrappers' steps left pending (see the module doc); cheap when none is."""
        for k, pending in enumerate(self._unsettled):
            if pending is not None:
                self._unsettled[k] = None
                self._measure(pending)

    def _measure(self, pending: Tuple[int, P.ParamIndex, P.Differences, List[torch.Tensor]]) -> None:
        """Buffer ``update_ratio`` of one optimizer step from the copies its pre-hook took."""
        rec, n = self.rec, len(self.sites)
        step, index, work, before = pending
        if self.tracer is not None:  # a NaN's replay needs the weights its forward saw
            self.tracer.weights_before(index.params, index.order, before)
        # numerators and denominators travel apart: sharded ranks sum their squares first, and a block whose
        # parameters were exactly zero before the step gets no ratio (undefined), never a clamped 1e35
        layout = spec.SHARD_RATIO if index.sharded else spec.RATIO
        rec.add_per_site(step, index.sites_with_params, S.UPDATE_RATIO,
                         torch.cat(P.update_norms(index, before, n, work)), layout)


class GradTiming:
    """Warns once when a backward ran in a recorded step but every parameter gradient was gone (``None``) or zero
    at ``scope.step()``: ``optimizer.zero_grad()`` ran first. Checking stops after the first recorded step with a
    nonzero parameter gradient (the loop reads gradients in time) or after the warning."""

    def __init__(self, rec: Recorder, index: P.ParamIndex, enabled: bool) -> None:
        self.rec, self.index = rec, index
        self.done = not enabled
        self.enabled = enabled
        self.warned_unstepped = False

    def check_buffer(self, step: int, optimizers: bool = False) -> None:
        """No parameter had a ``.grad`` at ``scope.step()`` and no optimizer step read them: warn if a backward ran
        (gradient entries buffered). ``optimizers``: optimizers were given and none of them stepped in this step, so
        no step hook could read the gradients (a GradScaler skipped the step for an inf or NaN gradient) and they
        were cleared before ``scope.step()``: the step loses its ``param_grad_norm``, warned about once, whenever it
        happens. An optimizer that stepped with a closure (LBFGS) reads nothing in its hook: that loop gets the
        zero_grad warning."""
        unstepped = optimizers and self.enabled and not self.warned_unstepped
        if self.done and not unstepped:
            return
        backward = any(e.step == step and e.group[0] in S.BACKWARD_METRICS for e in self.rec.buffer)
        if not (backward and any(p.requires_grad for p in self.index.params)):
            return
        if unstepped:
            self.done = self.warned_unstepped = True
            warnings.warn(
                f"gradscope: in recorded step {step} no given optimizer stepped (a GradScaler skips the step when "
                f"the gradients hold an inf or NaN; a loop may skip it too) and the gradients were cleared before "
                f"scope.step(), so this step has no param_grad_norm (later such steps are not warned about). Call "
                f"scope.step() before zero_grad() to keep them", RuntimeWarning, stacklevel=5)
        else:
            self._warn(step, "None")

    def check_rows(self, step: int, rows: Any, start: int) -> None:
        """``rows[start:]`` (host rows, just transferred): all ``param_grad_norm`` of ``step`` 0.0 while some
        ``grad_norm`` is not: warn."""
        if self.done:
            return
        grads, backward = [], False
        for i in range(start, len(rows)):
            if rows.step[i] == step:
                metric = rows.metric[i]
                if metric == S.PARAM_GRAD_NORM:
                    grads.append(rows.value[i])
                elif metric == S.GRAD_NORM and rows.value[i] > 0:
                    backward = True
        if any(g != 0 for g in grads):
            self.done = True
        elif grads and backward:
            self._warn(step, "0.0")

    def _warn(self, step: int, what: str) -> None:
        self.done = True
        # None can only mean the gradients were dropped; 0.0 everywhere is what zero_grad(set_to_none=False) leaves,
        # but also what a loss flat in every parameter gives, so that case says "if"
        cause = ("zero_grad() (the optimizer's or the model's) ran before it, so param_grad_norm is absent"
                 if what == "None" else
                 "param_grad_norm is recorded as 0.0. If optimizer.zero_grad(set_to_none=False) ran before "
                 "scope.step(), these are not the step's gradients (if the loss is truly flat in every parameter, "
                 "they are, and this warning can be ignored)")
        warnings.warn(
            f"gradscope: a backward ran in recorded step {step}, but every parameter gradient was {what} at "
            f"scope.step(): {cause}. Call scope.step() after backward() and before zero_grad(), or pass the "
            f"optimizer (attach(model, optimizer=opt)): its step hook then reads the gradients just before they are "
            f"used (not for an optimizer stepped with a closure, as LBFGS: its closure runs the backward inside "
            f"the step)", RuntimeWarning, stacklevel=5)
