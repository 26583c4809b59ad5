"""What the callbacks and sinks share: tracker keys, a compact scalar summary, heatmap images, and the
attach/step/detach/report life of one training run (:class:`Session`)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope.engine.provenance import Provenance, device_of
from gradscope.engine.attach import attach
from gradscope.engine.scope import LIVE, Scope
from gradscope.engine.sinks import check_sinks
from gradscope.errors import GradscopeError

#: Metrics the compact summary reports (min and max over blocks), and the image metrics.
COMPACT_METRICS = (S.ACT_VAR, S.GRAD_NORM, S.PARAM_GRAD_NORM, S.UPDATE_RATIO)
IMAGE_METRICS = (S.GRAD_NORM, S.ACT_VAR)
#: Folder (inside a callback's ``out``) where the records stream while training.
RECORDS_DIR = "records"


def metric_key(prefix: str, metric: str, block: str, call: int = 0) -> str:
    """The tracker key of one row: ``prefix/metric/block``, with ``:callN`` for a module's later calls."""
    key = f"{prefix}/{metric}/{block}"
    return key if call == 0 else f"{key}:call{call}"


def scalar_items(rows: pd.DataFrame, prefix: str = "gradscope") -> List[Tuple[str, int, float]]:
    """``(key, step, value)`` for every row, in the rows' order."""
    return [(metric_key(prefix, m, b, int(c)), int(s), float(v))
            for s, b, m, c, v in zip(rows[S.STEP], rows[S.BLOCK], rows[S.METRIC], rows[S.CALL], rows[S.VALUE])]


def by_step(rows: pd.DataFrame, prefix: str = "gradscope") -> Dict[int, Dict[str, float]]:
    """``{step: {key: value}}`` of the rows (one tracker log call per step)."""
    out: Dict[int, Dict[str, float]] = {}
    for key, step, value in scalar_items(rows, prefix):
        out.setdefault(step, {})[key] = value
    return out


def compact_scalars(rows: pd.DataFrame, prefix: str = "gradscope") -> Dict[int, Dict[str, float]]:
    """A few numbers per step for a trainer's logger: min and max over blocks (call 0) of ``act_var``,
    ``grad_norm``, ``param_grad_norm`` and ``update_ratio``, and ``nonfinite``, the count of NaN/Inf outputs."""
    out: Dict[int, Dict[str, float]] = {}
    first = rows[rows[S.CALL] == 0]
    for (step, metric), values in first.groupby([S.STEP, S.METRIC], sort=True)[S.VALUE]:
        slot = out.setdefault(int(step), {})
        if metric in COMPACT_METRICS:
            slot[f"{prefix}/{metric}_min"] = float(values.min())
            slot[f"{prefix}/{metric}_max"] = float(values.max())
        elif metric == S.ACT_NONFINITE:
            slot[f"{prefix}/nonfinite"] = float(values.sum())
    return out


def heatmap_image(frame: pd.DataFrame, metric: str, dpi: int = 72) -> np.ndarray:
    """The block x step heatmap of ``log10(metric)`` as an ``H x W x 3`` uint8 image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from gradscope.render.plots import heatmap_figure

    fig = heatmap_figure(frame, metric)
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class History:
    """The rows a sink has seen, for its periodic heatmap image (a few numbers per block and step)."""

    def __init__(self, image_every: int, metrics: Sequence[str] = IMAGE_METRICS) -> None:
        if isinstance(image_every, bool) or not isinstance(image_every, int) or image_every < 0:
            raise GradscopeError(f"image_every={image_every!r} is not a whole number >= 0 (0: no images; N: a "
                                 f"heatmap every N recorded steps)")
        self.image_every = image_every
        self.metrics = tuple(metrics)
        self._parts: List[pd.DataFrame] = []
        self._steps: set = set()
        self._drawn = 0

    def add(self, rows: pd.DataFrame) -> List[Tuple[str, int, np.ndarray]]:
        """Keep ``rows``; return ``(metric, step, image)`` when an image is due (every N recorded steps)."""
        if self.image_every == 0:
            return []
        keep = rows[rows[S.METRIC].isin(self.metrics)]
        if keep.empty:
            return []
        self._parts.append(keep)
        self._steps.update(int(s) for s in keep[S.STEP].unique())
        if len(self._steps) - self._drawn < self.image_every:
            return []
        self._drawn = len(self._steps)
        frame = pd.concat(self._parts, ignore_index=True)
        step = max(self._steps)
        return [(m, step, heatmap_image(frame, m)) for m in self.metrics if (frame[S.METRIC] == m).any()]


class LossTape:
    """The losses of one optimizer step's micro-batches, as a callback sees them, made into the step's loss.

    A framework hands each micro-batch's loss over in one of two forms: already divided for the accumulation, so
    that the step's loss is their sum (Lightning divides by ``accumulate_grad_batches`` before backward; a Hugging
    Face model given ``num_items_in_batch`` normalises by the whole step's count), or per micro-batch, so that the
    step's loss is their mean. ``add(loss, summed)`` says which."""

    def __init__(self) -> None:
        self._total: Any = None  # the running sum of the step's micro-batch losses (a tensor stays on its device)
        self._count = 0
        self._summed = True

    def add(self, loss: Any, summed: bool) -> None:
        """Add one micro-batch's loss (detached); memory stays one number however many micro-batches come."""
        value = loss.detach() if hasattr(loss, "detach") else float(loss)
        self._total = value if self._total is None else self._total + value
        self._count += 1
        self._summed = self._summed and summed

    def take(self) -> Any:
        """The step's loss (None when no micro-batch handed one over), and start the next step empty."""
        total, count, summed = self._total, self._count, self._summed
        self._total, self._count, self._summed = None, 0, True
        if total is None:
            return None
        return total if summed else total / count


class Session:
    """One training run seen by a callback: attach at the start, a step per optimizer step, then detach, the
    report and the provenance record (also when the run fails: the rows recorded so far are kept).

    ``out`` holds ``records/`` (Parquet parts streamed while training), ``provenance.json`` and, at the end,
    the report files (``report.html``, ``records.parquet``, ...).
    """

    def __init__(self, made_by: str, *, blocks: Any, every: Any, out: Union[str, Path, None],
                 metrics: Optional[Sequence[str]], sinks: Iterable[Any], report: bool,
                 options: Mapping[str, Any]) -> None:
        self.made_by = made_by
        self.blocks, self.every, self.metrics = blocks, every, metrics
        self.out = None if out is None else Path(out)
        self.sinks = check_sinks(sinks)
        self.report = report
        self.options = dict(options)
        self.scope: Optional[Scope] = None
        self.provenance: Optional[Provenance] = None
        self.report_path: Optional[Path] = None
        self._frame: Optional[pd.DataFrame] = None
        self._losses: Dict[int, float] = {}
        self.losses = LossTape()  # the micro-batch losses of the open step, as the framework hands them over

    def start(self, model: Any, *, optimizer: Any = None, scaler: Any = None, writer: bool = True,
              config: Optional[Mapping[str, Any]] = None, seeds: Optional[Mapping[str, Any]] = None,
              extra_sinks: Iterable[Any] = ()) -> Scope:
        """Attach to ``model``; with ``out`` on the writing rank, write ``provenance.json``.

        A session records one run: a second start (``trainer.fit`` called again, a resumed checkpoint) refuses an
        ``out`` that holds the first run's records, and without ``out`` warns that ``frame()`` now starts again
        (its steps count from 0 again, whatever the trainer's global step)."""
        if self.scope is not None:
            self.finish()
        if self._frame is not None:
            again = f"this {self.made_by} callback already recorded a run"
            if self.out is not None:
                raise GradscopeError(f"{again} into out={str(self.out)!r}; a second fit or train (continued "
                                     f"training, a resumed checkpoint) needs a new callback with a new out=")
            warnings.warn(f"gradscope: {again}; frame() now holds the new run only, from step 0 again (keep the "
                          f"first run's frame() before training again, or use a new callback)", RuntimeWarning,
                          stacklevel=3)
        records = None if self.out is None else self.out / RECORDS_DIR
        self._frame = None
        self.losses = LossTape()  # a failed run's micro-batch losses do not reach the next run's first step
        self.scope = attach(model, self.blocks, self.every, records, metrics=self.metrics, optimizer=optimizer,
                            scaler=scaler, sinks=[*self.sinks, *extra_sinks], **self.options)
        if self.out is not None and writer:
            settings = {"blocks": self.blocks, "every": self.every, "metrics": self.metrics, "report": self.report,
                        **self.options, "optimizer": _names(optimizer),
                        "scaler": type(scaler).__name__ if scaler is not None else None,
                        "sites": [s.name for s in self.scope.sites], "trainer": dict(config or {})}
            self.provenance = Provenance(self.out, self.made_by, settings, seeds=seeds, device=device_of(model),
                                         libraries=(self.made_by,))
            self.provenance.start()
            LIVE.keep_record(self.provenance, self.scope)  # a SIGTERM before finish() marks it (engine/exits.py)
        return self.scope

    def step(self) -> None:
        """Close one optimizer step (see :meth:`gradscope.Scope.step`), with the loss of its micro-batches when
        the callback saw them (:attr:`losses`)."""
        loss = self.losses.take()
        if self.scope is not None:
            self.scope.step(loss=loss)

    def run_losses(self) -> Dict[int, float]:
        """The loss of each recorded step, as :meth:`gradscope.Scope.losses` (also after the run ended)."""
        if self.scope is not None:
            return self.scope.losses()
        return dict(self._losses)

    def frame(self) -> pd.DataFrame:
        """Everything recorded (also after the run ended)."""
        if self._frame is not None:
            return self._frame
        if self.scope is None:
            raise GradscopeError("nothing recorded yet: the callback attaches when training starts")
        return self.scope.frame()

    def finish(self, error: Optional[BaseException] = None, writer: bool = True) -> Optional[Path]:
        """Detach (rows kept), write the report to ``out`` on the writing rank, complete the provenance record.

        With ``error`` (the run failed), a report that cannot be written only warns, so the run's own exception
        is the one that surfaces. Returns the report folder, if one was written. Idempotent.
        """
        scope, self.scope = self.scope, None
        if scope is None:
            return self.report_path
        try:
            scope.detach()
        finally:
            self._frame, self._losses = scope.frame(), scope.losses()
            try:
                if self.out is not None and writer and self.report and not self._frame.empty:
                    from gradscope.render.report import run_findings, write_report

                    found = run_findings(scope.alerts(), scope.losses(), finished=error is None)
                    self.report_path = write_report(self._frame, self.out, title=f"gradscope report ({self.made_by})",
                                                    **found)
            except Exception as exc:
                if error is None:
                    raise
                warnings.warn(f"gradscope: the report could not be written after the run failed: {exc}; the "
                              f"records are in {self.out / RECORDS_DIR}", RuntimeWarning, stacklevel=2)
            finally:
                if self.provenance is not None:
                    self.provenance.finish(error, steps=scope.current_step, rows=len(self._frame))
                    LIVE.drop_record(self.provenance)
        return self.report_path


def _names(optimizer: Any) -> Optional[str]:
    """The optimizer's class name (several: comma-separated), for the provenance record."""
    if optimizer is None:
        return None
    many = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    return ", ".join(type(o).__name__ for o in many)
