"""WHEN and BUFFER: the step schedule, the on-device buffer, one transfer per recorded step, rows on disk.

Hooks append small float32 tensors to :class:`Recorder`'s buffer together with a few Python ints that say which
step, block, call and metric group they belong to. Nothing is read back to the host until :meth:`Recorder.flush`,
which concatenates the buffer per device and transfers it once. Rows are kept as plain Python lists (a few numbers
per block per recorded step) and, with ``out=DIR``, streamed to numbered Parquet parts so that a run that crashes
keeps everything up to its last flush. Rows already in a part are dropped from memory (:meth:`Recorder.release`),
so memory stays bounded by ``flush_every`` steps while streaming; :meth:`Recorder.frame` reads the parts back.
A part that cannot be written (a full disk) leaves its rows in memory, warns once, and is retried at the next flush.
"""
from __future__ import annotations

import sys
import warnings
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

    def trimmed(self) -> "Rows":
        """These rows cut to the shortest list (a signal handler may have interrupted an append)."""
        n = min(len(self.step), len(self.site), len(self.call), len(self.metric), len(self.value))
        return Rows(self.step[:n], self.site[:n], self.call[:n], self.metric[:n], self.value[:n])

    def extend(self, entry: Entry, values: Sequence[float]) -> None:
        if entry.sites is not None:
            if any(v is None for v in values):  # an undefined value (an update ratio from a zero norm): no row
                pairs = [(s, v) for s, v in zip(entry.sites, values) if v is not None]
                sites, values = [s for s, _ in pairs], [v for _, v in pairs]
            else:
                sites = entry.sites
            k = len(sites)
            self.step.extend([entry.step] * k)
            self.site.extend(sites)
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
                 reducer: Optional[Callable[[List[Entry], torch.Tensor],
                                            Tuple[List[Entry], List[List[float]]]]] = None,
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
        self._written = 0  # rows of ``rows`` already in parts on disk (dropped from memory at release())
        self._losses_written = 0  # losses already in losses parts on disk (they stay in memory: one float a step)
        self._losses_failed = False  # the last losses write failed (warned once until one succeeds)
        self._dropped = 0  # rows recorded before ``rows[0]``: in ``_part_paths`` on disk
        self._part_paths: List[Path] = []
        self._part_starts: List[int] = []  # the first row (counted from the run's first) of each part
        self._released_parts = 0  # parts whose rows left memory (frame() reads those back)
        self._recorded_since_write = 0
        self._write_failed = False
        self._grad_keys: set = set()  # (step, site, call, metric) of gradient rows: a second backward is a duplicate
        self._duplicate_warned = False
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
        :data:`~gradscope.engine.spec.SHARD_RATIO` for ``[numerators..., denominators...]`` of such norms,
        :data:`~gradscope.engine.spec.RATIO` for the same of global norms (a site whose denominator is 0 gets no row).
        """
        self.buffer.append(Entry(step, -1, 0, (metric,), values, 0, layout, list(sites)))

    # ---- step boundaries -----------------------------------------------------------------------------------------
    def advance(self) -> None:
        """Close the current step and decide whether the next one is recorded."""
        self.state.advance()

    def flush(self, check: Optional[Callable[[Rows, int], None]] = None) -> None:
        """Move the buffer to host rows with one transfer per device (one collective when distributed).

        ``check(rows, start)`` sees the new rows (``rows[start:]``) before a due part is written; the part is
        written even when it raises (the non-finite policy), so the rows are on disk whatever happens next.
        """
        if not self.buffer:
            return
        # one statement, and the first: a SIGTERM handler that writes every row (engine/exits.py) and returns may
        # run on any line here; it must find the entries either still in the buffer or already taken, never both
        # (it flushed them itself while this flush went on, and they were recorded twice)
        entries, self.buffer = self.buffer, []
        entries = self._unique(entries)
        start = len(self.rows)
        for device, device_entries in _by_device(entries).items():
            if self.reducer is not None:  # it may add the entries of blocks that ran on other ranks only
                device_entries, finished = self.reducer(device_entries, _pack(device_entries, device))
            else:
                finished = finish_entries(device_entries, _read(device_entries))
            for entry, values in zip(device_entries, finished):
                if entry.group[0] == S.LOSS:  # a step's loss: beside the rows, not a frame row
                    self.losses.append((entry.step, float(values[0])))
                else:
                    self.rows.extend(entry, values)
        self._recorded_since_write += 1
        try:
            if check is not None and len(self.rows) > start:
                check(self.rows, start)
        finally:
            if self.out is not None and self.write_files and self._recorded_since_write >= self.flush_every:
                self.write_part()

    def _unique(self, entries: List[Entry]) -> List[Entry]:
        """Entries without a second gradient measurement of one (step, site, call, metric).

        A second ``backward()`` through outputs already recorded in this step (``retain_graph=True``) fires their
        gradient hooks again. The rows keep the first backward's gradient norms (one row per key, as every reader
        of the frame assumes); ``param_grad_norm`` reads ``.grad``, which holds the sum of both. A warning says so
        once, naming the block and the step.
        """
        keys, kept, duplicate = self._grad_keys, [], None
        for e in entries:
            if e.reduce == spec.SQNORM and e.sites is None:
                key = (e.step, e.site, e.call, e.group)
                if key in keys:
                    duplicate = duplicate or e
                    continue
                keys.add(key)
            kept.append(e)
        if len(keys) > 4 * len(self.sites) + 64:  # keep the keys of the current step only
            current = self.state.step
            self._grad_keys = {k for k in keys if k[0] >= current}
        if duplicate is not None and not self._duplicate_warned:
            self._duplicate_warned = True
            warnings.warn(f"gradscope: a second backward through block {self.sites[duplicate.site].name!r} in step "
                          f"{duplicate.step} (retain_graph=True?): its gradient rows keep the first backward only; "
                          f"param_grad_norm holds the accumulated .grad. Call scope.step() between the two to "
                          f"record both", RuntimeWarning, stacklevel=4)
        return kept

    # ---- disk ----------------------------------------------------------------------------------------------------
    def write_part(self) -> Optional[Path]:
        """Write the rows recorded since the last part to ``out/part-NNNNNN.parquet`` (atomically).

        An ``OSError`` (a full disk, a folder removed) does not propagate: the rows stay in memory, a warning says
        what failed and where (once until a write succeeds again), and the next flush retries.

        Idempotent under interruption: a signal handler that raises (Ctrl-C) or writes itself (SIGTERM) may land
        on any line here. A part is named by its position among the parts *that start at a new row*: writing
        rows that start where the last part started (its bookkeeping was cut short) overwrites that part with a
        superset instead of adding a second copy, and the bookkeeping changes in one statement, which no Python
        signal handler can split. So no row is ever in two parts, and none is skipped.
        """
        if self.out is None or not self.write_files:
            return None
        if self._losses_written < len(self.losses):
            self._write_losses()
        if self._written >= len(self.rows):
            self._recorded_since_write = 0
            return None
        from gradscope import store  # pandas/pyarrow load only when rows go to disk

        rows = self.rows.trimmed() if len(self.rows.step) != len(self.rows) else self.rows
        written, count = self._written, len(rows)
        start = self._dropped + written
        starts, paths = self._part_starts, self._part_paths
        index = len(starts) - 1 if starts and starts[-1] == start else len(starts)
        try:
            path = self._write_frame(store, self._frame_of(rows, written, count), index)
        except OSError as exc:
            if not self._write_failed:
                warnings.warn(f"gradscope: could not write records part {index} to {str(self.out)!r}: "
                              f"{exc.strerror or exc}; its {count - written} rows stay in memory and the next "
                              f"flush retries", RuntimeWarning, stacklevel=3)
            self._write_failed = True
            return None
        if self._write_failed:
            warnings.warn(f"gradscope: records written to {str(self.out)!r} again", RuntimeWarning, stacklevel=3)
        # one statement: the new lists are built first, then bound without a call in between
        self._part_starts, self._part_paths, self._written, self._write_failed, self._recorded_since_write = \
            starts[:index] + [start], paths[:index] + [path], count, False, 0
        return path

    def _write_losses(self) -> None:
        """Write the losses not on disk yet as one ``losses-*.parquet`` beside the parts (see
        :func:`gradscope.store.write_losses_part`: named by its first loss, so an interrupted write is redone, never
        doubled). An ``OSError`` keeps them for the next flush (a warning, once until a write succeeds)."""
        from gradscope import store

        first, count = self._losses_written, len(self.losses)
        try:
            if self._recreated_out(store):  # moved or deleted: every loss goes to the new folder (memory holds them)
                first = 0
            store.write_losses_part(self.losses[first:count], self.out, first)
        except OSError as exc:
            if not self._losses_failed:
                warnings.warn(f"gradscope: could not write the losses of steps {self.losses[first][0]}.. to "
                              f"{str(self.out)!r}: {exc.strerror or exc}; scope.losses() keeps them and the next "
                              f"flush retries", RuntimeWarning, stacklevel=4)
            self._losses_failed = True
            return
        self._losses_written, self._losses_failed = count, False

    def _write_frame(self, store, frame, index: int) -> Path:
        """``store.write_part``, recreating ``out`` when it was moved or deleted during the run (see
        :func:`gradscope.store.recreate_out`)."""
        self._recreated_out(store)
        return store.write_part(frame, self.out, index)

    def _recreated_out(self, store) -> bool:
        """Make ``out`` again when it was moved or deleted during the run (True then; see
        :func:`gradscope.store.recreate_out`)."""
        if self.out.is_dir():
            return False
        store.recreate_out(self.out, [{"name": s.name, "kind": s.kind} for s in self.sites],
                           lost=self._part_paths[:self._released_parts], rows=self._dropped)
        return True

    def release(self) -> None:
        """Drop from memory the rows already written to parts (call once every reader of new rows had them)."""
        if self._written:
            n, rows = self._written, self.rows
            kept = Rows(rows.step[n:], rows.site[n:], rows.call[n:], rows.metric[n:], rows.value[n:])
            # one statement (see write_part): an interruption leaves the rows either released or not
            self.rows, self._dropped, self._written, self._released_parts = \
                kept, self._dropped + n, 0, len(self._part_paths)

    @property
    def row_count(self) -> int:
        """Rows recorded so far, on disk and in memory."""
        return self._dropped + len(self.rows)

    def write_remaining(self) -> None:
        """Last resort (a SIGTERM, the end of the interpreter, a scope collected while attached): everything in the
        buffer and in memory to disk. No collective and no non-finite check; never raises."""
        try:
            if self.buffer and self.reducer is None:
                self.flush()
            self.write_part()
        except Exception:  # noqa: BLE001 - a shutdown path: never a second traceback
            pass

    # ---- output --------------------------------------------------------------------------------------------------
    def frame(self, start: int = 0):
        """The recorded rows as a tidy DataFrame (see :mod:`gradscope.schema` for the columns).

        ``start`` counts rows from the first recorded; rows already dropped from memory are read back from their
        parts (only ``start=0`` may reach them).
        """
        from gradscope import store  # pandas loads when a frame is first asked for, not at attach()

        if start >= self._dropped:
            return self._frame_of(self.rows, start - self._dropped)
        if start:
            raise ValueError(f"rows before {self._dropped} are on disk only; frame(start={start}) cannot slice them")
        return store.read_parts(self._part_paths[:self._released_parts], tail=self._frame_of(self.rows, 0))

    def _frame_of(self, rows: Rows, start: int, stop: Optional[int] = None):
        from gradscope import store

        cut = slice(start, stop)
        sites = [self.sites[i] for i in rows.site[cut]]
        depth_of = self.depth
        return store.frame_from_columns(
            rows.step[cut], [s.name for s in sites], [depth_of.get(i, -1) for i in rows.site[cut]],
            [s.kind for s in sites], rows.metric[cut], rows.value[cut], rows.call[cut])


def finish_entries(entries: List[Entry], values: List[float],
                   counts: Optional[Sequence[float]] = None) -> List[List[float]]:
    """Turn each entry's raw values (consecutive in ``values``) into its metrics' values, on the host.

    ``counts``: the element counts the raw values were reduced over, one per entry (default: each entry's own).
    Another rank's raw values need that rank's counts: its batch may be larger, smaller or empty."""
    out, offset = [], 0
    for i, entry in enumerate(entries):
        k = _width(entry.values)
        count = entry.count if counts is None else int(round(counts[i]))
        out.append(spec.finish(entry.group, values[offset:offset + k], count, entry.reduce))
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
