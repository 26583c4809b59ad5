"""WHEN and BUFFER: the step schedule, the on-device buffer, one transfer per recorded step, rows on disk.

Hooks append small float32 tensors to :class:`Recorder`'s buffer together with a few Python ints that say which
step, block, call and metric group they belong to. Nothing is read back to the host until :meth:`Recorder.flush`,
which concatenates the buffer per device and transfers it once. Rows are kept as plain Python lists (a few numbers
per block per recorded step) and, with ``out=DIR``, streamed to numbered Parquet parts so that a run that crashes
keeps everything up to its last flush.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from gradscope import schema as S
from gradscope.errors import GradscopeError
from gradscope.engine import spec
from gradscope.engine.sites import Site
from gradscope.engine.state import Schedule, StepState


def make_schedule(every: Union[int, Schedule]) -> Schedule:
    """``every=N`` records steps 0, N, 2N, ...; a callable ``step -> bool`` is used as it is."""
    if callable(every):
        return every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise GradscopeError(f"every={every!r} is not a positive integer; use every=1 to record each step, "
                             f"every=10 for one step in ten, or a function step -> bool")
    return lambda step: step % every == 0


@dataclass(**({"slots": True} if sys.version_info >= (3, 10) else {}))
class Entry:
    """One buffered measurement: ``values`` holds the raw metrics of ``group``.

    ``values`` is a 1-D tensor on the device the hook ran on (read back once per recorded step, at the flush), or a
    tuple of Python floats when the hook ran on the CPU, where reading a value costs nothing and a tensor would only
    add work (see :mod:`gradscope.engine.metrics`).
    """

    step: int
    site: int
    call: int
    group: Tuple[str, ...]
    values: Union[torch.Tensor, Tuple[float, ...]]
    count: int = 0  # elements reduced, so distributed runs can combine moments and norms
    reduce: str = spec.VALUE  # the layout (gradscope.engine.spec): "moments", "sqnorm" or "value" (as is)
    sites: Optional[List[int]] = None  # one metric for many sites: values[i] belongs to sites[i]


@dataclass
class Rows:
    """Recorded rows as parallel Python lists (cheap to append, turned into a DataFrame on demand)."""

    step: List[int] = field(default_factory=list)
    site: List[int] = field(default_factory=list)
    call: List[int] = field(default_factory=list)
    metric: List[str] = field(default_factory=list)
    value: List[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.value)

    def extend(self, entry: Entry, values: Sequence[float]) -> None:
        if entry.sites is not None:
            k = len(entry.sites)
            self.step.extend([entry.step] * k)
            self.site.extend(entry.sites)
            self.call.extend([entry.call] * k)
            self.metric.extend([entry.group[0]] * k)
            self.value.extend(values)
            return
        for metric, value in zip(entry.group, values):
            if metric.startswith("_"):  # internal slots (e.g. the mean kept so ranks can combine a variance)
                continue
            self.step.append(entry.step)
            self.site.append(entry.site)
            self.call.append(entry.call)
            self.metric.append(metric)
            self.value.append(value)


class Recorder:
    """Holds the step state (:class:`~gradscope.engine.state.StepState`), the buffer and the recorded rows of one
    :class:`~gradscope.Scope`."""

    def __init__(self, sites: List[Site], schedule: Schedule, out: Optional[Path] = None, flush_every: int = 10,
                 reducer: Optional[Callable[[List[Entry], torch.Tensor], torch.Tensor]] = None,
                 write_files: bool = True) -> None:
        self.sites = sites
        self.state = StepState(len(sites), schedule)
        self.buffer: List[Entry] = []
        self.rows = Rows()
        self.losses: List[Tuple[int, float]] = []  # (step, loss) of recorded steps given scope.step(loss=...)
        self.out = out
        self.flush_every = flush_every
        self.reducer = reducer
        self.write_files = write_files
        self._written = 0  # rows already in parts on disk
        self._parts = 0
        self._recorded_since_write = 0
        if out is not None and write_files:
            from gradscope import store

            store.prepare_out(out, [{"name": s.name, "kind": s.kind} for s in sites])

    # ---- read-only views of the step state ----------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The current step (see :class:`~gradscope.engine.state.StepState`)."""
        return self.state.step

    @property
    def active(self) -> bool:
        """Whether the current step is recorded."""
        return self.state.active

    @property
    def depth(self) -> Dict[int, int]:
        """Site -> order of its first call."""
        return self.state.depth

    # ---- hot path (called from hooks) ----------------------------------------------------------------------------
    def add(self, step: int, site: int, call: int, group: Tuple[str, ...],
            values: Union[torch.Tensor, Tuple[float, ...]], count: int = 0,
            reduce: str = spec.VALUE) -> None:
        self.buffer.append(Entry(step, site, call, group, values, count, reduce))

    def add_loss(self, step: int, loss: Union[torch.Tensor, float]) -> None:
        """Buffer the training loss of ``step`` (a 0-dim tensor stays on its device until the flush: no sync)."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise GradscopeError(f"scope.step(loss=...) got a tensor of shape {tuple(loss.shape)}; pass the "
                                     f"scalar loss that backward() ran on")
            values: Union[torch.Tensor, Tuple[float, ...]] = loss.detach().reshape(1).to(torch.float32)
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            values = (float(loss),)
        else:
            raise GradscopeError(f"scope.step(loss={loss!r}): pass the loss tensor (or a float), or leave it out")
        self.buffer.append(Entry(step, -1, 0, (S.LOSS,), values, 0, spec.VALUE))

    def add_per_site(self, step: int, sites: List[int], metric: str, values: torch.Tensor,
                     layout: str = spec.VALUE) -> None:
        """One metric for several sites at once: ``values[i]`` (a 1-D tensor) belongs to ``sites[i]``.

        ``layout``: :data:`gradscope.engine.spec.SHARD` for norms over this rank's parameter shards (FSDP2),
        :data:`~gradscope.engine.spec.SHARD_RATIO` for ``[numerators..., denominators...]`` of such norms.
        """
        self.buffer.append(Entry(step, -1, 0, (metric,), values, 0, layout, list(sites)))

    # ---- step boundaries -----------------------------------------------------------------------------------------
    def advance(self) -> None:
        """Close the current step and decide whether the next one is recorded."""
        self.state.advance()

    def flush(self) -> None:
        """Move the buffer to host rows with one transfer per device (one collective when distributed)."""
        if not self.buffer:
            return
        entries, self.buffer = self.buffer, []
        for device, device_entries in _by_device(entries).items():
            if self.reducer is not None:
                finished = self.reducer(device_entries, _pack(device_entries, device))
            else:
                finished = finish_entries(device_entries, _read(device_entries))
            for entry, values in zip(device_entries, finished):
                if entry.group[0] == S.LOSS:  # a step's loss: beside the rows, not a frame row
                    self.losses.append((entry.step, float(values[0])))
                else:
                    self.rows.extend(entry, values)
        self._recorded_since_write += 1
        if self.out is not None and self.write_files and self._recorded_since_write >= self.flush_every:
            self.write_part()

    # ---- disk ----------------------------------------------------------------------------------------------------
    def write_part(self) -> Optional[Path]:
        """Write the rows recorded since the last part to ``out/part-NNNNNN.parquet`` (atomically)."""
        self._recorded_since_write = 0
        if self.out is None or not self.write_files or self._written >= len(self.rows):
            return None
        from gradscope import store  # pandas/pyarrow load only when rows go to disk

        path = store.write_part(self.frame(start=self._written), self.out, self._parts)
        self._written = len(self.rows)
        self._parts += 1
        return path

    # ---- output --------------------------------------------------------------------------------------------------
    def frame(self, start: int = 0):
        """The recorded rows as a tidy DataFrame (see :mod:`gradscope.schema` for the columns)."""
        from gradscope import store  # pandas loads when a frame is first asked for, not at attach()

        rows = self.rows
        sites = [self.sites[i] for i in rows.site[start:]]
        depth_of = self.depth
        return store.frame_from_columns(
            rows.step[start:], [s.name for s in sites], [depth_of.get(i, -1) for i in rows.site[start:]],
            [s.kind for s in sites], rows.metric[start:], rows.value[start:], rows.call[start:])


def finish_entries(entries: List[Entry], values: List[float]) -> List[List[float]]:
    """Turn each entry's raw values (consecutive in ``values``) into its metrics' values, on the host."""
    out, offset = [], 0
    for entry in entries:
        k = _width(entry.values)
        out.append(spec.finish(entry.group, values[offset:offset + k], entry.count, entry.reduce))
        offset += k
    return out


_HOST = torch.device("cpu")


def _width(values: Union[torch.Tensor, Tuple[float, ...]]) -> int:
    return values.numel() if isinstance(values, torch.Tensor) else len(values)


def _by_device(entries: List[Entry]) -> Dict[torch.device, List[Entry]]:
    """Entries grouped by the device their values live on (host floats count as the CPU)."""
    groups: Dict[torch.device, List[Entry]] = {}
    for e in entries:
        device = e.values.device if isinstance(e.values, torch.Tensor) else _HOST
        groups.setdefault(device, []).append(e)
    return groups


def _read(entries: List[Entry]) -> List[float]:
    """All raw values of ``entries`` in order, as host floats: one transfer for the tensors among them."""
    tensors = [e.values.reshape(-1) for e in entries if isinstance(e.values, torch.Tensor)]
    read = iter(torch.cat(tensors).tolist() if tensors else ())
    out: List[float] = []
    for e in entries:
        out.extend(islice(read, e.values.numel()) if isinstance(e.values, torch.Tensor) else e.values)
    return out


def _pack(entries: List[Entry], device: torch.device) -> torch.Tensor:
    """All raw values of ``entries`` in order as one float64 tensor on ``device`` (for a collective)."""
    parts = [e.values.reshape(-1).to(torch.float64) if isinstance(e.values, torch.Tensor)
             else torch.tensor(e.values, dtype=torch.float64, device=device) for e in entries]
    return torch.cat(parts)
