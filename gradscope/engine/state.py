"""The per-step hook state, with one owner: :class:`StepState`.

Hooks (:mod:`gradscope.engine.probes`) and the scope (:mod:`gradscope.engine.scope`) read and change it only through
its methods; the recorder holds it. What it knows: the step counter and whether the step is recorded, each site's
call count (and recomputation count under activation checkpointing) within the step, which gradient slots are
watched already, whether a forward ran, the GradScaler scale this step's backward saw, and each site's depth (the
order of its first call, fixed for the whole run).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

Schedule = Callable[[int], bool]
GradSlot = Tuple[int, int, str]  # (site, call, metric)

#: ``attach(forwards=...)``: which forwards make a step's record. A *training* forward is one run with gradient
#: recording on (``torch.is_grad_enabled()``): it builds the graph a backward follows. One under ``torch.no_grad()``
#: or ``torch.inference_mode()`` (validation, a trainer's sanity check, generation) is an *evaluation* forward; eval
#: mode alone decides nothing (frozen-BatchNorm fine-tuning trains in eval mode).
TRAIN, EVAL, ALL = "train", "eval", "all"
FORWARDS = (TRAIN, EVAL, ALL)


def grad_modes(forwards: str) -> Tuple[bool, ...]:
    """The values of ``torch.is_grad_enabled()`` under which a scope with ``forwards=`` records a forward."""
    return {TRAIN: (True,), EVAL: (False,), ALL: (True, False)}[forwards]


class StepState:
    """Step counter and per-step bookkeeping of one scope."""

    def __init__(self, n_sites: int, schedule: Schedule) -> None:
        self.schedule = schedule
        self.n_sites = n_sites
        self.step = 0
        self.active = bool(schedule(0))
        self.depth: Dict[int, int] = {}
        self._reset()

    def _reset(self) -> None:
        self.calls: List[int] = [0] * self.n_sites
        self.recompute_calls: List[int] = [0] * self.n_sites
        self.grad_slots: Set[GradSlot] = set()
        self.skipped = 0  # block calls of forwards this scope does not record (see FORWARDS), in this step
        self.root_checked = False  # the model's blocks were checked for replacements in this step
        self.forward_seen = False  # a forward ran in this step (recorded or not; see Scope._watch_optimizer)
        self.grad_scale: Optional[torch.Tensor] = None  # GradScaler scale seen by this step's backward
        self.grads_seen = False  # a gradient hook of this step's blocks ran (engine/misuse.py: step before backward)

    # ---- written by hooks ----------------------------------------------------------------------------------------
    def next_call(self, site: int) -> int:
        """Index of this call of ``site`` within the step; the first call of a site fixes its depth."""
        if site not in self.depth:
            self.depth[site] = len(self.depth)
        call = self.calls[site]
        self.calls[site] = call + 1
        return call

    def skip_call(self, site: int) -> None:
        """A call of ``site`` in a forward this scope does not record: counted apart, it still fixes the site's depth
        (the order of its first call; reentrant checkpointing runs the training forward itself without grad)."""
        if site not in self.depth:
            self.depth[site] = len(self.depth)
        self.skipped += 1

    def next_recompute_call(self, site: int) -> int:
        """Call index during an activation-checkpointing recomputation (inside backward)."""
        call = self.recompute_calls[site]
        self.recompute_calls[site] = call + 1
        return call

    def claim_grad_slot(self, slot: GradSlot) -> bool:
        """True the first time ``slot`` is asked for in this step (its gradient is then watched), False after."""
        if slot in self.grad_slots:
            return False
        self.grad_slots.add(slot)
        return True

    def note_grad_scale(self, scale: torch.Tensor) -> None:
        """Keep the first GradScaler scale this step's backward divided by (a device copy: no sync)."""
        if self.grad_scale is None:
            self.grad_scale = scale.detach().clone().reshape(1)

    def mark_forward(self) -> None:
        """A forward of the model ran in this step."""
        self.forward_seen = True

    # ---- read by the scope ---------------------------------------------------------------------------------------
    def any_block_ran(self) -> bool:
        """Whether any hooked block was called in this step."""
        return any(c for c in self.calls)

    def recorded(self, step: int) -> bool:
        """Whether ``step`` is (or was) recorded by the schedule."""
        return bool(self.schedule(step))

    def stop(self) -> None:
        """No step is recorded any more (detach): a compiled graph that traced the hooks guards on this flag, so it
        is replaced by one without gradscope's operations instead of feeding a detached scope."""
        self.active = False
        self.schedule = lambda step: False

    def advance(self) -> None:
        """Close the current step and decide whether the next one is recorded."""
        self.step += 1
        self.active = bool(self.schedule(self.step))
        self._reset()
