"""Scope: what :func:`gradscope.attach` (engine/attach.py) returns: the hooks of one recording session and its
records."""
from __future__ import annotations

import warnings
import weakref
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from torch import nn

from gradscope import schema as S
from gradscope.engine import optimizers as OPT
from gradscope.engine import params as P
from gradscope.engine import replaced as R
from gradscope.engine.optwatch import GradTiming, OptimizerWatch, record_param_grads
from gradscope.engine.replaced import Replacements
from gradscope.engine import spec
from gradscope.engine.alertlog import AlertLog, detector_rows
from gradscope.engine.amp import ScalerState
from gradscope.engine.oporigin import OpTracer
from gradscope.engine.optstate import record_optstate
from gradscope.engine.nonfinite import NONFINITE_POLICIES, NonFiniteError, NonFinitePolicy
from gradscope.engine.probes import MetricSet, Probe
from gradscope.engine.provenance import Provenance
from gradscope.engine.exits import LiveScopes
from gradscope.engine.recorder import Recorder
from gradscope.engine.sinks import SinkFeed
from gradscope.engine import misuse
from gradscope.engine.sites import Site, idle_message
from gradscope.engine.state import TRAIN

__all__ = ["NONFINITE_POLICIES", "NonFiniteError", "Scope"]


class Scope:
    """Hooks on the blocks of one model and the statistics they record.

    Use it in a training loop: call :meth:`step` once per optimizer step, after ``loss.backward()``. It closes the
    step: reads parameter-gradient norms, moves the step's buffered statistics to the host in one transfer and
    decides whether the next step is recorded. :meth:`frame` returns everything recorded so far; :meth:`detach`
    (or leaving a ``with`` block) removes the hooks and writes any rows not yet on disk.
    """

    def __init__(self, model: nn.Module, sites: List[Site], recorder: Recorder, metrics: MetricSet,
                 optimizer: Any = None, scaler: Any = None,
                 on_nonfinite: str = "warn", distributed: Any = None, sinks: Iterable[Any] = (),
                 sharded: bool = False, alerts: Optional[AlertLog] = None, forwards: str = TRAIN) -> None:
        self.model = model
        self.forwards = forwards
        self._alerts = alerts if alerts is not None else AlertLog(None, None)
        self._losses_seen = 0
        self._sinks = SinkFeed(sinks)
        self.provenance: Optional[Provenance] = None  # with out=: the folder's provenance.json
        self._error: Optional[BaseException] = None
        self.sites = sites
        self._rec = recorder
        self._metrics = metrics
        self._probe = Probe(sites, recorder, metrics, forwards)
        self._nonfinite = NonFinitePolicy(on_nonfinite, sites)
        self._tracer = OpTracer(sites, recorder.state) if on_nonfinite != "ignore" else None  # a NaN's operator
        if self._tracer is not None:
            self._probe.keep, self._nonfinite.trace = self._tracer.keep, self._tracer.trace
        self._warned_silent = False
        self._warned_misuse = False  # one warning about how the loop calls the scope (engine/misuse.py)
        self._warned_detached = False
        self._blocks_ran = False  # a hooked block ran in some closed recorded step (the silent-step warning's cause)
        self._warned_idle = False
        self._attached = False
        self._dist = distributed
        self._param_index = P.param_index(sites, sharded)
        wrappers = OPT.optimizer_list(optimizer)  # wrappers (accelerate, Lightning) are looked through
        self._optimizers = [OPT.unwrap_optimizer(o) for o in wrappers]
        for given, inner in zip(wrappers, self._optimizers):
            OPT.check_optimizer(given, inner)
        #: accelerate's gradient accumulation: scope.step() closes a step only when the optimizer really steps
        self._sync = OPT.accumulation_sync(wrappers)
        self._pending_losses: List[Any] = []
        self._amp = ScalerState(scaler if scaler is not None else OPT.wrapped_scaler(wrappers), self._optimizers)
        self._probe.scale = self._amp.scale_tensor if self._amp.enabled else None
        self._sharded = sharded
        self._missed: set = set()  # blocks no given optimizer updates (warned about once)
        self._followed_now: Set[int] = set()  # blocks found replaced in the open step (by _follow_changes)
        self._watch = OptimizerWatch(model, sites, recorder, self._amp, self._optimizers,
                                     self._index_optimizers(set(range(len(sites)))), update=metrics.update,
                                     grads=S.PARAM_GRAD_NORM in metrics.params, tracer=self._tracer,
                                     follow=weakref.WeakMethod(self._follow_changes),
                                     late=[OPT.acts_after_step(o) for o in wrappers])
        self._watch.keep_told = self._alerts.reads_lr
        self._grad_timing = GradTiming(recorder, self._param_index, S.PARAM_GRAD_NORM in metrics.params)
        self._replacements = Replacements(model, sites)  # blocks replaced after attach are followed
        # weakly: the model must not keep its scope alive (a scope dropped without detach() writes its rows at __del__)
        self._probe.root, self._probe.root_check = model, weakref.WeakMethod(self._follow_changes)
        if recorder.active:
            self._probe.install()
        P.listen()  # parameters registered later inside a block are followed (P.listen)
        self._listening = True
        self._layout = P.layout_key(self._optimizers)
        self._attached = True
        try:
            if self._optimizers:
                self._watch.install()
        except BaseException:
            self.detach()
            raise

    def _index_optimizers(self, alive: Set[int], stacklevel: int = 4) -> List[P.ParamIndex]:
        """Which blocks each optimizer updates (engine/optimizers.py), as one parameter index per optimizer
        (``stacklevel``: of the warning about blocks no optimizer updates, as seen from the caller's caller)."""
        updated, missed = OPT.coverage(self.sites, self._optimizers)
        self._opt_indexes = [P.param_index(self.sites, self._sharded, only=set(u) & alive) for u in updated]
        new = [s for s in missed if s in alive and s not in self._missed]
        if new and self._metrics.update and self._optimizers:
            self._missed.update(new)
            warnings.warn(OPT.missed_message(self.sites, new), RuntimeWarning, stacklevel=stacklevel)
        return self._opt_indexes

    def _follow_changes(self) -> Set[int]:
        """Once per recorded step: hook the module now at each block's name where it was replaced after attach
        (engine/replaced.py), and index the parameters again where they changed inside a block or in an optimizer's
        groups; returns the blocks that were replaced."""
        changed = self._replacements.changed(self.sites)
        layout = P.layout_key(self._optimizers)
        if not changed and layout == self._layout:
            return set()
        groups_changed = layout[1] != self._layout[1]
        self._layout = layout
        for s, module in changed:
            warnings.warn(R.message(self.sites[s], module, self._rec.step), RuntimeWarning, stacklevel=3)
            if module is None:
                self._replacements.gone.add(s)
            else:
                self.sites[s] = R.followed(self.sites[s], module)  # the list the recorder and the probe share
        alive = set(range(len(self.sites))) - self._replacements.gone
        index = P.param_index(self.sites, self._sharded, only=alive)
        if not changed and not groups_changed and P.same_params(index, self._param_index):
            return set()  # modules were registered elsewhere (another model built): nothing of ours moved
        self._param_index = index
        self._grad_timing.index = self._param_index
        self._watch.reindex(self._index_optimizers(alive, stacklevel=5))  # hooks stay: one may be running now
        if changed:
            self._probe.replan()
        replaced = {s for s, _ in changed}
        self._followed_now |= replaced  # found by a forward or optimizer hook: _close_step does not call it idle
        return replaced

    # ---- the training-loop API -----------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """Index of the step being recorded now (0-based; advanced by :meth:`step`)."""
        return self._rec.step

    def _read_grads_of(self, optimizer: Any) -> None:
        """For integrations whose every ``optimizer.step()`` gets a closure that runs no backward (Lightning's manual
        optimization): read the gradients ``optimizer`` is about to step with (OptimizerWatch.read_grads_of)."""
        self._watch.read_grads_of(OPT.unwrap_optimizer(optimizer))

    @property
    def recording(self) -> bool:
        """Whether the current step is recorded (by the ``every=`` schedule)."""
        return self._rec.active

    def step(self, loss: Any = None) -> None:
        """Close the current step: parameter statistics, one transfer of the buffer, then the next step begins.

        ``loss`` (the tensor ``backward()`` ran on, or a float) feeds the ``loss_spike`` and ``divergence`` alerts;
        it is read only in recorded steps, in the same transfer as the step's statistics (no extra sync). Under
        ``on_anomaly="raise"``, :class:`~gradscope.engine.alerts.AnomalyError` comes from here, after the step's
        records and alerts are kept.
        """
        rec = self._rec
        if not self._attached:
            if not self._warned_detached:
                self._warned_detached = True
                warnings.warn(misuse.step_after_detach(), RuntimeWarning, stacklevel=2)
            return
        self._watch.settle()  # a wrapper's step (Lookahead) is over: its update, measured now
        if self._sync is not None and not self._sync():
            # gradient accumulation (accelerate): the optimizer does not step after this micro-batch, so the step
            # stays open; its loss joins the mean of the step's micro-batch losses
            if loss is not None and rec.active:
                self._pending_losses.append(loss)
            return
        if self._pending_losses:
            loss = OPT.mean_loss(self._pending_losses + ([loss] if loss is not None else []))
            self._pending_losses = []
        if loss is not None and rec.active:
            rec.add_loss(rec.step, loss)
        try:
            self._close_step()
        finally:  # also when NonFiniteError is raised: the next step starts clean
            rec.advance()
            for stack in self._probe.stacks:
                stack.clear()
            if self._tracer is not None:
                self._tracer.clear()
            if self._attached:  # hooks only while a step is recorded: an unrecorded step runs hook-free
                if rec.active or self._probe.compiled:  # compiled: the traced hooks read rec.active instead
                    self._probe.install()
                else:
                    self._probe.uninstall()
        self._alerts.raise_pending()

    def _close_step(self) -> None:
        rec = self._rec
        if rec.active:
            if not rec.state.root_checked:  # (the model's own forward checks at its first call: engine/replaced.py)
                self._follow_changes()
            followed, self._followed_now = self._followed_now, set()  # blocks replaced in this step, found anywhere
            self._probe.note_traced_scale()  # under torch.compile: the scale the backward saw (for parameter norms)
            if self._metrics.params:
                self._record_params(rec.step)
            if self._metrics.optstate:  # Adam-family state (engine/optstate.py), of the blocks each optimizer updates
                for opt, index in zip(self._optimizers, self._opt_indexes):
                    record_optstate(rec, opt, index, len(self.sites), self._metrics.optstate)
            # under torch.compile: call indices and depths; the step's measurements come back in one read
            self._probe.drain_traced(flush_next=True)
            if not rec.state.any_block_ran() and rec.state.skipped and not self._warned_silent:
                self._warned_silent = True
                warnings.warn(
                    f"gradscope: recorded step {rec.step} holds no forward: only forwards under torch.no_grad() or "
                    f"torch.inference_mode() ran, and a scope with forwards={self.forwards!r} records "
                    f"{'those with grad enabled (training)' if self.forwards == TRAIN else 'other ones'}. Call "
                    f"scope.step() once per training step, after backward; to record validation forwards, attach "
                    f"a second scope with forwards='eval'.", RuntimeWarning, stacklevel=2)
            elif not rec.state.any_block_ran() and not self._warned_silent:
                self._warned_silent = True
                warnings.warn(
                    f"gradscope: no hooked block ran during recorded step {rec.step}, though they ran in an earlier "
                    f"step: scope.step() was called twice for one training step (once is enough, after backward), "
                    f"or a step ran no training forward." if self._blocks_ran else
                    f"gradscope: no hooked block ran during recorded step {rec.step}. If the model was "
                    f"torch.compile-d before attach(), its hooks are ignored: attach first, then compile; "
                    f"otherwise check that this scope is attached to the model you train.",
                    RuntimeWarning, stacklevel=2)
            self._blocks_ran = self._blocks_ran or rec.state.any_block_ran()
            self._warn_idle(rec, followed | self._replacements.gone)
            if rec.state.grad_slots and not rec.state.grads_seen and not self._probe.compiled \
                    and not self._warned_misuse:  # gradients were watched, and no backward has reached them yet
                self._warned_misuse = True
                warnings.warn(misuse.step_before_backward(rec.step), RuntimeWarning, stacklevel=3)
            try:
                self._flush()
            finally:
                if rec.write_files:  # host side, after the step's one transfer; under DDP rank 0 only
                    self._sinks.send(rec)
                rec.release()  # rows on disk and handed to the sinks leave memory

    def _warn_idle(self, rec: Recorder, replaced: Set[int] = frozenset()) -> None:
        """Once per scope: name the picked blocks that did not run in a recorded step where others did, and why
        (not those replaced or removed since the step's forward, which warned already: engine/replaced.py)."""
        if self._warned_idle or not rec.state.any_block_ran():
            return
        state = rec.state  # a reentrant-checkpointed block runs its recorded forward at recomputation
        idle = [i for i, calls in enumerate(state.calls)
                if calls == 0 and state.recompute_calls[i] == 0 and i not in replaced]
        if idle:
            self._warned_idle = True
            warnings.warn(idle_message(self.sites, idle, rec.step, self.model, ranks=self._dist is not None),
                          RuntimeWarning, stacklevel=3)

    def log_to(self, sink: Any) -> "Scope":
        """Also hand each recorded step's rows to ``sink`` (a callable ``rows -> None``, see
        :mod:`gradscope.engine.sinks`), from the next recorded step on; ``detach()`` closes it. Returns the scope."""
        self._sinks.add(sink)
        return self

    def frame(self):
        """Everything recorded so far as a tidy DataFrame: columns ``step, block, depth, kind, metric, value, call``.

        Statistics of a step that is still open (forward passes since the last :meth:`step`) are included.
        """
        self._flush()
        return self._rec.frame()

    def losses(self) -> Dict[int, float]:
        """The loss of each recorded step given as ``step(loss=...)`` (under DDP/FSDP2 the global batch's: the mean
        over ranks), as ``{step: loss}``."""
        self._flush()
        return dict(self._rec.losses)

    def alerts(self):
        """Every alert so far as a DataFrame (columns :data:`gradscope.schema.ALERT_COLUMNS`; empty if none).

        See :mod:`gradscope.engine.alerts` for the kinds, the thresholds and which block an alert names.
        """
        self._flush()
        from gradscope import store

        return store.alerts_frame(self._alerts.rows())

    def flush(self) -> Optional[Path]:
        """Write every recorded row not yet on disk (with ``out=``); returns the part written, if any."""
        self._flush()
        return self._rec.write_part()

    def detach(self) -> None:
        """Remove every hook this scope added (and none of anyone else's) and write outstanding rows. Idempotent.

        Under ``on_nonfinite="raise"`` a NaN/Inf found in the last open step raises :class:`NonFiniteError` after
        the rows are written and the hooks removed (never while another exception is on its way out of a ``with``).
        """
        self._detach(raise_nonfinite=True)

    def _detach(self, raise_nonfinite: bool) -> None:
        if not self._attached:
            return
        pending: List[BaseException] = []
        # every block that ran, ran more than once: several forwards (a block reused inside one forward is not)
        forwards = min((c for c in self._rec.state.calls if c), default=0)
        if self._rec.step == 0 and forwards > 1 and not self._warned_misuse:
            self._warned_misuse = True
            warnings.warn(misuse.never_stepped(forwards), RuntimeWarning, stacklevel=3)
        try:
            self._flush(pending.append)
            self._rec.write_part()
            if self._rec.write_files:
                self._sinks.send(self._rec)
        finally:
            LIVE.forget(self)
            self._stop_listening()
            if self._tracer is not None:
                self._tracer.close()
            self._probe.remove()
            self._rec.state.stop()
            self._watch.remove()
            self._attached = False
            try:
                self._sinks.close()
            finally:
                if self.provenance is not None:
                    try:
                        self.provenance.finish(self._error, steps=self._rec.step, rows=self._rec.row_count)
                    except OSError as exc:  # a full disk must not replace the user's exception or end the run
                        warnings.warn(f"gradscope: could not complete {str(self.provenance.path)!r}: "
                                      f"{exc.strerror or exc}", RuntimeWarning, stacklevel=3)
        if pending and raise_nonfinite:
            raise pending[0]

    close = detach

    def __enter__(self) -> "Scope":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._error = exc[1]  # the provenance record says how the run ended
        self._detach(raise_nonfinite=exc[1] is None)  # never replace the exception leaving the with block

    def __del__(self) -> None:
        """A scope collected while attached writes its rows and removes its hooks (they reference its recorder)."""
        try:
            if self._attached:
                self._rec.write_remaining()
            self._stop_listening()
            self._probe.remove()
            self._watch.remove()
        except Exception:
            pass

    def _stop_listening(self) -> None:
        """Give back this scope's share of the registration count (once, by detach or collection)."""
        if getattr(self, "_listening", False):
            self._listening = False
            P.unlisten()

    # ---- non-finite values ---------------------------------------------------------------------------------------
    def first_nonfinite(self) -> Dict[str, Tuple[Any, ...]]:
        """Where NaN/Inf first appeared: ``{"forward": (step, block), "backward": (step, block)}`` (keys present only
        where one was seen). Forward order is execution order; backward order runs from the last block to the first.
        ``"operator": (step, op, module)`` names the aten operator (``"aten.log"``) and the module inside the first
        forward block that made it (replayed once, see :mod:`gradscope.engine.oporigin`; not under
        ``on_nonfinite="ignore"``).
        """
        self._flush()
        return dict(self._nonfinite.first)

    # ---- internals -----------------------------------------------------------------------------------------------
    def _flush(self, on_error: Optional[Any] = None) -> None:
        """Buffer to rows (a due part written); new rows go to the alert detectors and through the non-finite
        policy, whose error is raised or, with ``on_error``, handed to it (detach writes everything first)."""
        self._probe.drain_traced()
        self._watch.settle()
        rec, checked = self._rec, []

        def check(rows: Any, start: int) -> None:
            checked.append(start)
            self._grad_timing.check_rows(rec.step, rows, start)
            error = None
            try:  # first: a divergence alert then names the operator the policy traced
                self._nonfinite.check(rows, start, rec.depth)
            except NonFiniteError as exc:
                error = exc
            self._alerts.origin = self._nonfinite.origin
            self._observe_alerts(rows, start)
            if error is not None:
                if on_error is None:
                    raise error
                on_error(error)

        rec.flush(check)
        if not checked and self._alerts.enabled and len(rec.losses) > self._losses_seen:
            self._observe_alerts(rec.rows, len(rec.rows))

    def _observe_alerts(self, rows: Any, start: int) -> None:
        """Host values the step's one transfer brought back (no device read here) to the alert detectors."""
        if not self._alerts.enabled:
            return
        rec = self._rec
        losses = rec.losses[self._losses_seen:]
        self._losses_seen = len(rec.losses)
        self._alerts.observe(detector_rows(rows, start, self.sites, rec.depth), losses, self._watch.take_told())

    def _record_params(self, step: int) -> None:
        """Parameter and parameter-gradient norms of every block: two foreach reductions, two buffer entries."""
        index = self._param_index
        if not index.params:
            return
        rec, n = self._rec, len(self.sites)
        names = self._metrics.params
        layout = spec.SHARD if index.sharded else spec.VALUE
        if S.PARAM_NORM in names:
            rec.add_per_site(step, index.sites_with_params, S.PARAM_NORM, P.param_norms(index, n), layout)
        if S.PARAM_GRAD_NORM in names:
            read = self._watch.take_grads_read(step)
            if record_param_grads(rec, index, n, self._amp, step, read) is None and not read:
                unstepped = bool(self._optimizers) and step not in self._watch.stepped
                self._grad_timing.check_buffer(step, optimizers=unstepped)


LIVE = LiveScopes()  # scopes that write to a folder: the end of the program or a SIGTERM flushes them

