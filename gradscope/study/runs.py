"""The claim check: a grid of models x seeds, measured at initialisation and over a short training run.

For every run, :func:`run_study` does two things with the public API only:

1. **At initialisation**: ``init_batches`` forward/backward passes with no parameter update (``phase="init"``), so
   the frame says how signals travel through the freshly initialised net, averaged over batches by the verdicts.
2. **Training**: ``steps`` SGD steps recorded every ``every`` steps (``phase="train"``) and the training loss of
   every step, so the degradation question (does the deeper plain net train worse?) has numbers behind it.

Records stream to ``out/records/<run>/`` while the study runs: an interrupted study keeps what it wrote.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from gradscope import schema as S
from gradscope.engine.hookargs import first_tensor
from gradscope.engine.attach import attach
from gradscope.errors import GradscopeError, ModelError
from gradscope.study.specs import RunSpec, planned_passes
from gradscope.study.task import loss_of, move, run_forward, user_batches
from gradscope.words import FINISHED, INIT, PHASE, TRAIN

#: Synthetic training examples of the default study.
DEFAULT_TRAIN_SIZE = 2048
#: Columns of a study's losses table.
LOSS_COLUMNS = (S.RUN, S.CONFIG, S.SEED, S.STEP, "loss", "accuracy")


@dataclass
class Settings:
    """How each run is measured and trained: the ONE place the defaults live (the CLI reads them from here).

    The defaults were chosen by measurement (README, "The default study"): lr 0.01 is stable for every net (0.05
    spiked resnet56-bn to a loss of 19 in its first steps), 300 steps let plain56-bn leave chance, 16x16 images
    keep a 56-layer step near 0.13 s on one thread, and every 10th step is recorded (30 per run).
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    every: int = 10
    init_batches: int = 2
    device: str = "cpu"
    #: with each run's seed, the order of its batches (:func:`data_order_seed`); the data set itself is fixed
    data_seed: int = 0
    image_size: int = 16
    #: worker processes (one torch thread each); 0: one per available core, capped by the number of runs.
    workers: int = 0
    #: losses averaged at the end of a run for the training claims (the last ``final_window`` steps).
    final_window: int = 20
    #: built-in nets (no user task) on image batches run channels-last: the same arithmetic in another memory
    #: order: 11-18% less CPU time per training step of the default study's nets (benchmarks/study_layout.py), about
    #: 10% of the whole study's CPU-seconds (docs/performance.md)
    channels_last: bool = True

    def describe(self) -> str:
        """One line for every training answer: the short-run caveat with the numbers that make it short."""
        return (f"{self.steps} SGD steps (lr {self.lr:g}, momentum {self.momentum:g}, batch {self.batch_size}, "
                f"{self.image_size}x{self.image_size} images; mean loss of the last {min(self.final_window, self.steps)} "
                f"steps; "
                f"the paper trains 64k iterations): how far each net got is in the evidence")


@dataclass
class StudyResult:
    """What a study measured: one frame for both phases (``phase`` column), losses, and the configs it knew."""

    frame: Any  # pandas DataFrame: frame columns + run, config columns, phase
    losses: Any  # pandas DataFrame: run, step, loss, accuracy
    configs: Dict[str, Dict[str, Any]]
    interrupted: bool = False
    failed: Dict[str, str] = field(default_factory=dict)
    planned: List[str] = field(default_factory=list)  # every run the study meant to measure, in order

    def phase(self, phase: str):
        """The frame of one phase (``"init"`` or ``"train"``), without the ``phase`` column."""
        frame = self.frame
        return frame[frame[PHASE] == phase].drop(columns=PHASE).reset_index(drop=True)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error with the fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GradscopeError(f"device={device!r} but no CUDA GPU is available here; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise GradscopeError(f"device={device!r} is not a device torch knows: {exc}") from exc


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise GradscopeError("the training data set is empty")


def _config_of(spec: RunSpec, model: nn.Module, settings: "Settings", batch: Any) -> Dict[str, Any]:
    """The run's facts and the model's own config, plus what the theory needs: batch size and image size."""
    config = {**spec.facts(), **dict(getattr(model, "gradscope_config", {}) or {})}
    config.setdefault("name", spec.model)
    config.update(config=spec.config, seed=spec.seed, batch_size=settings.batch_size)
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        config["image_size"] = int(inputs.shape[-1])
    return config


def _label(frame: Any, spec: RunSpec, config: Dict[str, Any], phase: str):
    """The run's facts as columns (from its spec and config, never from its name)."""
    labels = {S.RUN: spec.name, S.CONFIG: spec.config, S.MODEL: spec.model, S.BN: config.get("bn", spec.bn),
              S.RESIDUAL: config.get("residual", spec.residual), S.SHORTCUT: config.get("shortcut", spec.shortcut),
              S.INIT: config.get("init", spec.init), S.SEED: spec.seed, PHASE: phase}
    for column, value in labels.items():
        frame[column] = value
    return frame


def check_batch(spec: RunSpec, model: nn.Module, batch: Any) -> None:
    """One forward pass and loss on a small batch, so that a model that rejects its data fails before any run."""
    try:
        loss_of(spec.task, run_forward(spec.task, model, batch), batch)
    except ModelError:
        raise
    except Exception as exc:  # the user's model or loss: report what it said
        shape = tuple(spec.input_shape) if spec.input_shape else None
        what = f"inputs of shape {shape}" if shape and (spec.task is None or spec.task.batches is None) else \
            "its batches"
        raise ModelError(f"the model rejects {what}: {type(exc).__name__}: {exc}") from exc


def measure_run(spec: RunSpec, batches: Iterator[Any], settings: Settings, device: torch.device,
                out: Optional[Path] = None, on_step: Optional[Callable[[str, int], None]] = None,
                sink: Optional[List[Tuple[Any, Any, Dict[str, Any]]]] = None):
    """Measure one run: ``(frame, losses, config)``. Records stream to ``out`` (if given) as they are taken.

    ``sink`` receives the same triple even when training is interrupted (KeyboardInterrupt, an error), so a caller
    keeps what was recorded up to that point.
    """
    import pandas as pd

    net = spec.build().to(device)
    net.train()
    layout = torch.channels_last if settings.channels_last and spec.task is None else None
    if layout is not None:
        net = net.to(memory_format=layout)
    model, shard = _distribute(net, device, layout)
    frames, losses = [], []
    init_scope = scope = None
    config: Dict[str, Any] = {}
    try:  # interrupted in either phase (Ctrl-C, SIGTERM, an error): the sink still gets every row recorded
        with attach(model, blocks=spec.blocks, on_nonfinite="ignore",
                    out=None if out is None else out / INIT) as init_scope:
            for _ in range(settings.init_batches):
                batch = shard(next(batches))
                config = config or _config_of(spec, net, settings, batch)
                output = run_forward(spec.task, model, batch)
                if spec.task is None or spec.task.loss is None:  # a classifier: chance = ln(classes), the learning check
                    logits = first_tensor(output)
                    if logits is not None:
                        config.setdefault("num_classes", int(logits.shape[-1]))
                loss_of(spec.task, output, batch)[0].backward()
                init_scope.step()
                model.zero_grad(set_to_none=True)
                if on_step:
                    on_step(INIT, 1)
        frames.append(_label(init_scope.frame(), spec, config, INIT))
        init_scope = None
        opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                              weight_decay=settings.weight_decay)
        if spec.train and settings.steps:  # runs measured at initialisation only stop here
            with attach(model, blocks=spec.blocks, every=settings.every, optimizer=opt, on_nonfinite="ignore",
                        out=None if out is None else out / TRAIN) as scope:
                for step in range(settings.steps):
                    batch = shard(next(batches))
                    loss, accuracy = loss_of(spec.task, run_forward(spec.task, model, batch), batch)
                    loss.backward()
                    scope.step()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    acc = accuracy if accuracy is not None else torch.full((), math.nan, device=loss.device)
                    loss_value, accuracy_value = _global_mean(torch.stack([loss.detach().float(), acc.float()]))
                    losses.append((spec.name, spec.config, spec.seed, step, loss_value, accuracy_value))
                    if on_step:
                        on_step(TRAIN, 1)
        config[FINISHED] = True  # every planned step ran: a run cut off part-way lacks this fact
    finally:
        for phase, open_scope in ((INIT, init_scope), (TRAIN, scope)):
            if open_scope is not None:
                frames.append(_label(open_scope.frame(), spec, config, phase))
        result = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
                  pd.DataFrame(losses, columns=list(LOSS_COLUMNS)), config)
        if sink is not None:
            sink.append(result)
    return result


def _distribute(model: nn.Module, device: torch.device, layout: Optional[torch.memory_format] = None):
    """Under ``torchrun``: wrap in DDP and give each rank its slice ``rank::world`` of every global batch. Image
    batches (4-D floating tensors) take ``layout`` when one is given (the net's own memory format)."""
    import torch.distributed as dist

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if layout is not None and t.dim() == 4 and t.is_floating_point():
            return t.to(device, memory_format=layout)
        return t.to(device)

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model, lambda batch: move(batch, to_device)
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = [device.index] if device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return wrapped, lambda batch: move(batch, lambda t: to_device(t[rank::world]))


def _global_mean(values: torch.Tensor) -> Tuple[float, float]:
    """Mean over ranks of per-rank means (equal shards): the global batch's loss and accuracy."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    first, second = values.tolist()
    return first, second


def run_study(specs: Sequence[RunSpec], train_set: Any, settings: Settings = Settings(),
              out: Optional[Path] = None, on_step: Optional[Callable[[str, int, str], None]] = None,
              on_run: Optional[Callable[[RunSpec], None]] = None, *, executor: str = "local",
              address: Optional[str] = None, resume: bool = False,
              job: Optional[Callable[..., None]] = None, poll: Optional[Callable[[], None]] = None,
              on_plan: Optional[Callable[[Sequence[RunSpec]], None]] = None) -> StudyResult:
    """Measure every spec on ``train_set``: runs of one seed see the same batches in the same order, runs of
    different seeds different orders (:func:`data_order_seed`).

    ``executor="local"``: with ``settings.workers`` != 1 and built-in nets, runs are spread over worker processes
    (one torch thread each, longest runs first: :mod:`gradscope.study.parallel`); under torchrun, or for a user's
    factory, they run here one after another. ``executor="ray"``: each run is a Ray task on the cluster at
    ``address`` (a local one when None): :func:`gradscope.study.executors.run_ray`. ``resume=True`` (needs
    ``out``) loads the runs that already finished in ``out`` instead of running them again. A KeyboardInterrupt
    stops the study and returns what was recorded with ``interrupted=True``. ``job``: how one run is measured
    (default :func:`measure_job`; a recipe study passes :func:`gradscope.study.recipe_train.recipe_job`). ``poll``:
    a stop check called while runs go on in other processes; ``on_step(phase, n, run)`` gets every run's passes,
    ``on_plan`` the specs that will run (:func:`gradscope.study.executors.execute`).
    """
    from gradscope.study import executors

    done, failed, interrupted = executors.execute(
        job or measure_job, specs, train_set, settings, out, on_step, on_run, executor=executor, address=address, resume=resume,
        steps_of=lambda s: {INIT: settings.init_batches, TRAIN: settings.steps if s.train else 0}, poll=poll,
        on_plan=on_plan)
    return collect(done, failed, interrupted, [s.name for s in specs])


def measure_job(spec: RunSpec, train_set: Any, settings: Settings, out: Optional[Path],
        on_step: Optional[Callable[[str, int], None]], sink: List[Tuple[Any, Any, Dict[str, Any]]]) -> None:
    """One run as a worker process (or a Ray task) runs it (module-level, so it pickles by name); a run that
    finishes leaves a snapshot in ``out`` for :func:`run_study`'s ``resume``."""
    from gradscope.study import executors

    measure_run(spec, batches_of(spec, train_set, settings), settings, resolve_device(settings.device),
                None if out is None else out / "records" / spec.name, on_step, sink=sink)
    if out is not None and sink:
        executors.save_finished(out, spec.name, sink[0], executors.fingerprint(spec, settings))


def collect(done: Dict[str, Tuple[Any, Any, Dict[str, Any]]], failed: Dict[str, str], interrupted: bool,
            order: Sequence[str]) -> StudyResult:
    """One :class:`StudyResult` from per-run ``(frame, losses, config)`` triples, in the specs' order."""
    import pandas as pd

    names = [n for n in order if n in done]
    frames = [done[n][0] for n in names if not done[n][0].empty]
    losses = [done[n][1] for n in names]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    loss_frame = pd.concat(losses, ignore_index=True) if losses else pd.DataFrame(columns=list(LOSS_COLUMNS))
    return StudyResult(frame, loss_frame, {n: done[n][2] for n in names}, interrupted, failed, list(order))


def data_order_seed(settings: Settings, seed: int) -> int:
    """The generator seed of a run's batch order: the same for every run of one ``seed`` (so runs paired by seed
    see the same batches) and different across seeds (so the spread over seeds covers the data order as well as
    the initialisation)."""
    return settings.data_seed * 10007 + seed


def batches_of(spec: RunSpec, train_set: Any, settings: Settings) -> Iterator[Any]:
    """The run's batches without end: the user's ``batches(batch_size, seed)`` when its task gives them, else
    ``train_set`` shuffled; either way ordered by :func:`data_order_seed` (shared by the runs of one seed)."""
    from torch.utils.data import DataLoader

    order = data_order_seed(settings, spec.seed)
    if spec.task is not None and spec.task.batches is not None:
        return user_batches(spec.task, settings.batch_size, order)
    generator = torch.Generator().manual_seed(order)
    return _cycle(DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, generator=generator,
                             drop_last=len(train_set) > settings.batch_size))


def total_steps(specs: Sequence[RunSpec], settings: Settings) -> int:
    """Forward/backward passes the study will make (for progress bars)."""
    return sum(planned_passes(s, settings) for s in specs)


def trains(specs: Sequence[RunSpec], settings: Settings) -> bool:
    """True when some run of ``specs`` trains (``steps`` > 0 and a spec with ``train``)."""
    return settings.steps > 0 and any(s.train for s in specs)


def final_loss(losses: Any, run: str, last: int = 20) -> float:
    """Mean training loss over the last ``last`` recorded steps of ``run`` (NaN when the run diverged or is absent)."""
    rows = losses[losses[S.RUN] == run].sort_values(S.STEP)
    if rows.empty:
        return math.nan
    return float(rows["loss"].tail(last).mean())
