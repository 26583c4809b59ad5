"""``attach()``: the options of a recording session checked, its parts built (sites, schedule, recorder, alerts,
sinks, the distributed combiner), and the :class:`~gradscope.engine.scope.Scope` that holds them returned."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

from torch import nn

from gradscope import schema as S
from gradscope.engine import optimizers as OPT
from gradscope.engine.alertlog import AlertLog, Handler
from gradscope.engine.alerts import AlertRules
from gradscope.engine.nonfinite import NONFINITE_POLICIES
from gradscope.engine.probes import MetricSet
from gradscope.engine.provenance import Provenance, device_of
from gradscope.engine.recorder import Recorder, Schedule, make_schedule
from gradscope.engine.scope import LIVE, Scope
from gradscope.engine.sinks import SinkFeed
from gradscope.engine.sites import BlockSelector, find_blocks, mixed_layers_message, unwrap_model
from gradscope.engine.state import EVAL, FORWARDS, TRAIN
from gradscope.errors import GradscopeError

__all__ = ["attach"]


def attach(model: nn.Module, blocks: BlockSelector = "auto", every: Union[int, Schedule] = 1,
           out: Union[str, os.PathLike, None] = None, *, metrics: Optional[Sequence[str]] = None,
           optimizer: Any = None, scaler: Any = None, flush_every: int = 10,
           on_nonfinite: str = "warn", distributed: Union[bool, str] = "auto",
           sinks: Iterable[Any] = (), on_anomaly: Handler = None, alert_rules: Optional[AlertRules] = None,
           forwards: str = TRAIN) -> Scope:
    """Hook every block of ``model`` and record activation and gradient statistics per recorded step.

    Args:
        model: any ``nn.Module`` (a ``DistributedDataParallel`` wrapper is looked through).
        blocks: which modules to hook; see :func:`gradscope.find_blocks` for every selector form.
        every: record one step in ``every`` (steps 0, N, 2N, ...), or a function ``step -> bool``.
        out: a folder to stream records to as Parquet parts; :func:`gradscope.load` reads it back.
        metrics: a subset of :data:`gradscope.schema.ALL_METRICS`, or ``"all"``; default
            :data:`gradscope.schema.DEFAULT_METRICS` (all but the opt-in ``act_max_abs``, ``branch_var``,
            ``shortcut_var``, each one more pass over activations).
        optimizer: enables ``update_ratio`` (||delta w|| / ||w|| per block across ``optimizer.step()``) and reads
            ``param_grad_norm`` right before an ``optimizer.step()`` that comes before ``scope.step()`` (so a
            ``zero_grad()`` in between loses nothing). Several optimizers as a list: each block's update is measured
            across the step of the optimizer that holds its parameters; a block that no given optimizer updates
            gets no ``update_ratio`` (and a warning). Wrappers are looked through (accelerate's
            ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``); with accelerate's gradient accumulation
            ``scope.step()`` closes a step only when the optimizer really steps (``docs/accelerate.md``).
        scaler: a ``torch.amp.GradScaler``; gradient metrics are divided by its scale so they are the true ones.
        flush_every: with ``out``, write a part every this many recorded steps (and at detach).
        on_nonfinite: ``"warn"`` (once, naming the first block), ``"raise"`` (``NonFiniteError`` from ``step()``,
            records kept) or ``"ignore"``.
        distributed: ``"auto"`` combines statistics over all ranks when ``torch.distributed`` is initialised.
        sinks: callables ``rows -> None`` fed each recorded step's rows at ``step()`` (TensorBoard, W&B, MLflow:
            see :mod:`gradscope.integrations`); closed at ``detach()``. ``scope.log_to(sink)`` adds one later.
        on_anomaly: what to do with each alert (a loss or gradient-norm spike, an update ratio out of its band, a
            divergence; see :mod:`gradscope.engine.alerts`): ``None`` keeps them (``scope.alerts()``, and
            ``out/alerts.csv``), ``"warn"``, ``"raise"`` (``AnomalyError`` from ``step()``, records kept), or a
            callable receiving each :class:`~gradscope.engine.alerts.Alert`. Pass the loss as ``step(loss=...)``.
        alert_rules: thresholds (:class:`~gradscope.engine.alerts.AlertRules`: window, z, update band...).
        forwards: which forwards make a step's record. ``"train"`` (default): only training forwards, those run
            with grad enabled; a forward under ``torch.no_grad()``/``torch.inference_mode()`` (validation, a
            trainer's sanity check) takes no call index and leaves the record as it would be without it (eval
            mode alone does not matter: frozen-BatchNorm fine-tuning trains in eval mode). ``"eval"``: only those
            no-grad forwards, for a second scope that records validation apart (its ``step()`` closes an
            evaluation pass; no gradient or update metrics). ``"all"``: every forward, in call order.

    With ``out``, the folder also gets ``provenance.json`` (command line, these options, seeds, versions, device,
    wall time), written at attach and completed at detach.
    """
    from gradscope.engine.compat import check_not_compiled
    from gradscope.engine.distributed import DistributedCombiner
    from gradscope.engine.sharding import check_sharding

    check_not_compiled(model)
    inner = unwrap_model(model)
    sharding = check_sharding(inner)
    sites = find_blocks(inner, blocks)
    mixed = mixed_layers_message(sites) if isinstance(blocks, str) and blocks == "auto" else None
    if mixed:
        warnings.warn(mixed, RuntimeWarning, stacklevel=2)
    schedule = make_schedule(every)
    if forwards not in FORWARDS:
        raise GradscopeError(f"forwards={forwards!r} is not one of {FORWARDS}: 'train' records the forwards that "
                             f"build a graph, 'eval' those under no_grad/inference_mode, 'all' both")
    if on_nonfinite not in NONFINITE_POLICIES:  # checked before any hook exists
        raise GradscopeError(f"on_nonfinite={on_nonfinite!r} is not one of {NONFINITE_POLICIES}")
    if not isinstance(flush_every, int) or flush_every < 1:
        raise GradscopeError(f"flush_every={flush_every!r} is not a positive integer")
    chosen = _check_metrics(metrics)
    if forwards == EVAL:  # evaluation forwards run no backward and no optimizer step of their own
        gradients = S.BACKWARD_METRICS + (S.PARAM_GRAD_NORM,) + S.OPTIMIZER_METRICS
        chosen = tuple(m for m in (chosen or S.DEFAULT_METRICS) if m not in gradients)
    combiner = DistributedCombiner.create(distributed, sharding)
    if combiner is not None:
        combiner.names = [site.name for site in sites]
    out_path = None if out is None else Path(out)
    writer = combiner is None or combiner.is_writer
    overflow = scaler is not None and getattr(scaler, "is_enabled", lambda: True)()  # fp16 grads may overflow
    alerts = AlertLog(alert_rules, on_anomaly, out_path, writer, overflow)  # checked before any file or hook exists
    recorder = Recorder(sites, schedule, out_path, flush_every,
                        reducer=None if combiner is None else combiner.reduce, write_files=writer)
    if combiner is not None:
        combiner.depth = recorder.state.depth  # the one dict the frame reads its depths from
    feed = SinkFeed(sinks)  # checked before any hook exists
    scope = Scope(inner, sites, recorder, MetricSet(chosen), optimizer=optimizer, scaler=scaler,
                  on_nonfinite=on_nonfinite, distributed=combiner, sinks=feed.sinks,
                  sharded=sharding is not None, alerts=alerts, forwards=forwards)
    try:  # provenance.json may fail to write (a full disk): then no hook of this scope may stay behind
        if out_path is not None and recorder.write_files:
            handler = on_anomaly if isinstance(on_anomaly, str) or on_anomaly is None else \
                getattr(on_anomaly, "__name__", type(on_anomaly).__name__)
            optimizers = OPT.group_names([OPT.unwrap_optimizer(o) for o in OPT.optimizer_list(optimizer)])
            config = {"blocks": blocks, "every": every, "metrics": metrics, "flush_every": flush_every,
                      "on_nonfinite": on_nonfinite, "forwards": forwards, "on_anomaly": handler,
                      "alert_rules": repr(alert_rules or AlertRules()), "optimizer": optimizers,
                      "scaler": type(scaler).__name__ if scaler is not None else None,
                      "world_size": 1 if combiner is None else getattr(combiner, "world_size", None),
                      "sharded": None if sharding is None else f"FSDP2, {sharding.replicas} replica(s) per shard",
                      "model": type(inner).__name__, "sites": [site.name for site in sites]}
            scope.provenance = Provenance(out_path, "attach", config, device=device_of(inner))
            scope.provenance.start()
        if out_path is not None and recorder.write_files:  # the end of the program or a SIGTERM writes every row
            LIVE.add(scope)
    except BaseException:
        scope.detach()
        raise
    return scope


def _check_metrics(metrics: Optional[Iterable[str]]) -> Optional[Tuple[str, ...]]:
    """``attach(metrics=...)`` as a tuple of known metric names (``"all"``: every one; None: the defaults), or a
    GradscopeError naming the unknown ones and the choices."""
    if metrics is None:
        return None
    if metrics == "all":
        return S.ALL_METRICS
    if isinstance(metrics, str):
        metrics = (metrics,)
    chosen = tuple(metrics)
    unknown = [m for m in chosen if m not in S.ALL_METRICS]
    if unknown:
        raise GradscopeError(f"unknown metric(s) {unknown}; choose from {list(S.ALL_METRICS)}")
    return chosen
