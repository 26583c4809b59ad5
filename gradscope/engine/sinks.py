"""Sinks: where recorded rows go besides the frame (TensorBoard, Weights & Biases, MLflow, a trainer's logger).

A sink is any callable ``sink(rows)`` taking a DataFrame of new rows (the frame's columns); it may also have a
``close()`` method. :class:`SinkFeed` calls every sink at ``scope.step()`` of a recorded step, on the host, after
the step's one transfer (never inside a hook, never an extra device sync), with the rows recorded since its last
call; and once more at ``detach()`` with what is left, then closes them. Rows usually belong to the step just
closed; an ``update_ratio`` measured by an ``optimizer.step()`` that comes after ``scope.step()`` belongs to that
step too but arrives with the next call. The records (``scope.frame()``, the Parquet parts) stay the source of
truth: a sink only copies rows. Under DDP only the writing rank (rank 0) feeds its sinks.

A sink that raises (a tracker's server answering 503, a full disk under TensorBoard's log folder) does not stop
the training loop, nor the other sinks: its rows of that call are lost to it alone (a ``RuntimeWarning`` names
the sink, the steps and the error at its first failure; later failures are counted and reported at ``detach()``),
while the frame and ``out=`` keep every row.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, List

from gradscope.errors import GradscopeError

Sink = Callable[[Any], None]


def check_sinks(sinks: Iterable[Any]) -> List[Sink]:
    """The sinks as a list; a non-callable entry raises :class:`GradscopeError` naming it."""
    if sinks is None:
        return []
    if callable(sinks):
        sinks = [sinks]
    out = list(sinks)
    for sink in out:
        if not callable(sink):
            raise GradscopeError(f"sink {sink!r} is not callable; a sink is a function rows -> None (or an object "
                                 f"with __call__), e.g. gradscope.integrations.tensorboard.TensorBoardSink(...)")
    return out


class SinkFeed:
    """The sinks of one scope and how many recorded rows they have been given."""

    def __init__(self, sinks: Iterable[Any] = ()) -> None:
        self.sinks: List[Sink] = check_sinks(sinks)
        self.sent = 0  # rows of the recorder already handed to the sinks
        self.failures: Dict[int, int] = {}  # position in ``sinks`` -> calls that raised

    def add(self, sink: Any) -> None:
        """Feed one more sink from the next recorded step on (rows sent before are not replayed)."""
        self.sinks.extend(check_sinks([sink]))

    def send(self, recorder: Any) -> None:
        """Hand every row the recorder holds beyond those already sent to each sink (a frame built once)."""
        total = recorder.row_count  # rows recorded so far (those on disk included)
        if not self.sinks or total <= self.sent:
            self.sent = total
            return
        rows = recorder.frame(start=self.sent)
        self.sent = total
        for position, sink in enumerate(self.sinks):
            try:
                sink(rows)
            except Exception as exc:  # noqa: BLE001 - a tracker's error must not end the user's training
                self._failed(position, sink, rows, exc)

    def _failed(self, position: int, sink: Sink, rows: Any, exc: Exception) -> None:
        """Count a sink's failure; warn at its first one (the later ones are summed up at :meth:`close`)."""
        count = self.failures.get(position, 0) + 1
        self.failures[position] = count
        if count > 1:
            return
        steps = sorted({int(s) for s in rows["step"]}) if "step" in getattr(rows, "columns", ()) else []
        where = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}" if steps else "no step"
        warnings.warn(f"gradscope: sink {_name(sink)} raised {type(exc).__name__}: {exc}. Its {len(rows)} rows of "
                      f"{where} are lost to it (the frame and out= keep them); training and the other sinks go "
                      f"on, and the sink is called again at the next recorded step. Later failures of this sink are "
                      f"counted and reported at detach()", RuntimeWarning, stacklevel=5)

    def close(self) -> None:
        """Close every sink that has a ``close()``, after a warning for each sink that failed more than once (the
        first failure warned already). A ``close()`` that raises is a warning too: a tracker's failure at the end
        must neither replace the exception a failing run is ending with nor turn a healthy run into a failed one
        (the frame and ``out=`` hold every row)."""
        for position, count in self.failures.items():
            if count > 1:
                warnings.warn(f"gradscope: sink {_name(self.sinks[position])} raised at {count} of its calls; the "
                              f"rows of those calls are missing from it (the frame and out= hold them)",
                              RuntimeWarning, stacklevel=4)
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - the others still close, and the run goes on
                warnings.warn(f"gradscope: sink {_name(sink)} raised in close(): {type(exc).__name__}: {exc}; what "
                              f"it had not written yet may be missing from it (the frame and out= hold every row)",
                              RuntimeWarning, stacklevel=4)


def _name(sink: Sink) -> str:
    """A sink as a warning names it: its class (or function) name."""
    return getattr(sink, "__qualname__", None) or type(sink).__name__
