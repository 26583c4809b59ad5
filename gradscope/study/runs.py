"""The claim check: a grid of models x seeds, measured at initialisation and over a short training run.

For every run, :func:`run_study` does two things with the public API only:

1. **At initialisation**: ``init_batches`` forward/backward passes with no parameter update (``phase="init"``), so
   the frame says how signals travel through the freshly initialised net, averaged over batches by the verdicts.
2. **Training**: ``steps`` SGD steps recorded every ``every`` steps (``phase="train"``) and the training loss of
   every step, so the degradation question (does the deeper plain net train worse?) has numbers behind it.

Records stream to ``out/records/<run>/`` while the study runs: an interrupted study keeps what it wrote.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from gradscope import schema as S
from gradscope.errors import GradscopeError, ModelError
from gradscope.engine.probes import first_tensor
from gradscope.engine.scope import attach

PHASE = "phase"
INIT, TRAIN = "init", "train"

#: The default study: the paper's shallow and deep plain/residual pairs, with and without BN, Kaiming init.
DEFAULT_MODELS = ("plain20", "resnet20", "plain56", "resnet56")


@dataclass(frozen=True)
class RunSpec:
    """One network to measure: a zoo name with options, or a user's factory (``factory`` set)."""

    model: str
    bn: Optional[bool] = True
    shortcut: Optional[str] = None
    init: Optional[str] = "kaiming"
    seed: int = 0
    factory: Optional[Callable[[], nn.Module]] = field(default=None, compare=False)
    input_shape: Optional[Tuple[int, ...]] = None
    blocks: Any = "auto"

    @property
    def residual(self) -> Optional[bool]:
        return None if self.factory is not None else not self.model.startswith("plain")

    @property
    def name(self) -> str:
        """Run label: ``resnet56-bn``, ``plain20-nobn-xavier``, ``resnet20-bn-B-s1`` (defaults left out)."""
        parts = [self.model]
        if self.factory is None:
            parts.append("bn" if self.bn else "nobn")
            if self.shortcut and self.residual:
                parts.append(self.shortcut)
            if self.init and self.init != "kaiming":
                parts.append(self.init)
        if self.seed:
            parts.append(f"s{self.seed}")
        return "-".join(parts)

    def build(self) -> nn.Module:
        if self.factory is not None:
            torch.manual_seed(self.seed)
            return self.factory()
        from gradscope.models import build

        options: Dict[str, Any] = {"bn": self.bn, "init": self.init}
        if self.shortcut and self.residual:
            options["shortcut"] = self.shortcut
        return build(self.model, seed=self.seed, **options)


@dataclass
class Settings:
    """How each run is measured and trained."""

    steps: int = 40
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    every: int = 1
    init_batches: int = 2
    device: str = "cpu"
    data_seed: int = 0


@dataclass
class StudyResult:
    """What a study measured: one frame for both phases (``phase`` column), losses, and the configs it knew."""

    frame: Any  # pandas DataFrame: frame columns + run, config columns, phase
    losses: Any  # pandas DataFrame: run, step, loss, accuracy
    configs: Dict[str, Dict[str, Any]]
    interrupted: bool = False
    failed: Dict[str, str] = field(default_factory=dict)

    def phase(self, phase: str):
        """The frame of one phase (``"init"`` or ``"train"``), without the ``phase`` column."""
        frame = self.frame
        return frame[frame[PHASE] == phase].drop(columns=PHASE).reset_index(drop=True)


def grid(models: Sequence[str] = DEFAULT_MODELS, bn: Sequence[bool] = (True, False), seeds: Sequence[int] = (0,),
         shortcut: Optional[str] = None, init: str = "kaiming") -> List[RunSpec]:
    """Every combination of ``models`` x ``bn`` x ``seeds`` as run specs (models vary slowest)."""
    return [RunSpec(model=m, bn=b, shortcut=shortcut, init=init, seed=s)
            for m, b, s in itertools.product(models, bn, seeds)]


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


def _config_of(spec: RunSpec, model: nn.Module) -> Dict[str, Any]:
    config = dict(getattr(model, "gradscope_config", {}) or {})
    config.setdefault("name", spec.model)
    return config


def _label(frame: Any, spec: RunSpec, config: Dict[str, Any], phase: str):
    labels = {S.RUN: spec.name, S.MODEL: spec.model,
              S.BN: config.get("bn", spec.bn), S.RESIDUAL: config.get("residual", spec.residual),
              S.SHORTCUT: config.get("shortcut", spec.shortcut), S.INIT: config.get("init", spec.init),
              S.SEED: spec.seed, PHASE: phase}
    for column, value in labels.items():
        frame[column] = value
    return frame


def check_input(model: nn.Module, shape: Tuple[int, ...], device: torch.device) -> None:
    """Run one tiny forward pass so that a wrong input shape fails early, with the model's own words."""
    try:
        with torch.no_grad():
            model(torch.zeros((2,) + tuple(shape[1:]) if len(shape) > 1 else (2,), device=device))
    except Exception as exc:  # the user's model: report what it said
        raise ModelError(f"the model rejects inputs of shape {tuple(shape)}: {type(exc).__name__}: {exc}") from exc


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
    config = _config_of(spec, net)
    model, shard = _distribute(net, device)
    frames, losses = [], []
    loss_fn = nn.CrossEntropyLoss()
    init_scope = scope = None
    try:  # interrupted in either phase (Ctrl-C, SIGTERM, an error): the sink still gets every row recorded
        with attach(model, blocks=spec.blocks, on_nonfinite="ignore",
                    out=None if out is None else out / "init") as init_scope:
            for _ in range(settings.init_batches):
                x, y = shard(next(batches))
                loss_fn(first_tensor(model(x)), y).backward()
                init_scope.step()
                model.zero_grad(set_to_none=True)
                if on_step:
                    on_step(INIT, 1)
        frames.append(_label(init_scope.frame(), spec, config, INIT))
        init_scope = None
        opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                              weight_decay=settings.weight_decay)
        with attach(model, blocks=spec.blocks, every=settings.every, optimizer=opt, on_nonfinite="ignore",
                    out=None if out is None else out / "train") as scope:
            for step in range(settings.steps):
                x, y = shard(next(batches))
                logits = first_tensor(model(x))
                loss = loss_fn(logits, y)
                loss.backward()
                scope.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                accuracy = (logits.argmax(1) == y).float().mean()
                loss_value, accuracy_value = _global_mean(torch.stack([loss.detach(), accuracy]))
                losses.append((spec.name, step, loss_value, accuracy_value))
                if on_step:
                    on_step(TRAIN, 1)
    finally:
        for phase, open_scope in ((INIT, init_scope), (TRAIN, scope)):
            if open_scope is not None:
                frames.append(_label(open_scope.frame(), spec, config, phase))
        result = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
                  pd.DataFrame(losses, columns=[S.RUN, S.STEP, "loss", "accuracy"]), config)
        if sink is not None:
            sink.append(result)
    return result


def _distribute(model: nn.Module, device: torch.device):
    """Under ``torchrun``: wrap in DDP and give each rank its slice ``rank::world`` of every global batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model, lambda batch: tuple(t.to(device) for t in batch)
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = [device.index] if device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return wrapped, lambda batch: tuple(t[rank::world].to(device) for t in batch)


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
              out: Optional[Path] = None, on_step: Optional[Callable[[str, int], None]] = None,
              on_run: Optional[Callable[[RunSpec], None]] = None) -> StudyResult:
    """Measure every spec on ``train_set`` (same batches, in the same order, for every run).

    A KeyboardInterrupt stops the study and returns what was recorded so far with ``interrupted=True``.
    """
    import pandas as pd

    device = resolve_device(settings.device)
    done: List[Tuple[Any, Any, Dict[str, Any]]] = []
    names: List[str] = []
    failed: Dict[str, str] = {}
    interrupted = False
    for spec in specs:
        if on_run:
            on_run(spec)
        before = len(done)
        try:
            measure_run(spec, _batches(train_set, settings), settings, device,
                        None if out is None else out / "records" / spec.name, on_step, sink=done)
        except KeyboardInterrupt:
            interrupted = True
        except GradscopeError:
            raise
        except Exception as exc:  # a model that crashes mid-run: keep its records, say why, go on with the others
            failed[spec.name] = f"{type(exc).__name__}: {exc}"
        names.extend([spec.name] * (len(done) - before))
        if interrupted:
            break
    frames = [f for f, _, _ in done if not f.empty]
    losses = [l for _, l, _ in done]
    configs = {name: c for name, (_, _, c) in zip(names, done)}
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    loss_frame = pd.concat(losses, ignore_index=True) if losses else pd.DataFrame(
        columns=[S.RUN, S.STEP, "loss", "accuracy"])
    return StudyResult(frame, loss_frame, configs, interrupted, failed)


def _batches(train_set: Any, settings: Settings) -> Iterator[Any]:
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(settings.data_seed)
    return _cycle(DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, generator=generator,
                             drop_last=len(train_set) > settings.batch_size))


def total_steps(specs: Sequence[RunSpec], settings: Settings) -> int:
    """Forward/backward passes the study will make (for progress bars)."""
    return len(specs) * (settings.init_batches + settings.steps)


def final_loss(losses: Any, run: str, last: int = 5) -> float:
    """Mean training loss over the last ``last`` recorded steps of ``run`` (NaN when the run diverged or is absent)."""
    rows = losses[losses[S.RUN] == run].sort_values(S.STEP)
    if rows.empty:
        return math.nan
    return float(rows["loss"].tail(last).mean())
