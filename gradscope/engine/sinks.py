"""Sinks: where recorded rows go besides the frame (TensorBoard, Weights & Biases, MLflow, a trainer's logger).

A sink is any callable ``sink(rows)`` taking a DataFrame of new rows (the frame's columns); it may also have a
``close()`` method. :class:`SinkFeed` calls every sink at ``scope.step()`` of a recorded step, on the host, after
the step's one transfer (never inside a hook, never an extra device sync), with the rows recorded since its last
call; and once more at ``detach()`` with what is left, then closes them. Rows usually belong to the step just
closed; an ``update_ratio`` measured by an ``optimizer.step()`` that comes after ``scope.step()`` belongs to that
step too but arrives with the next call. The records (``scope.frame()``, the Parquet parts) stay the source of
truth: a sink only copies rows. Under DDP only the writing rank (rank 0) feeds its sinks.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List

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
        for sink in self.sinks:
            sink(rows)

    def close(self) -> None:
        """Close every sink that has a ``close()`` (each even if another fails; the first error is raised)."""
        error = None
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - the others still close
                error = error or exc
        if error is not None:
            raise error
