"""Progress of a profile on stderr: a bar on a terminal, plain lines when piped (CI, nohup, ``tee``).

A reporter has four methods: ``start(total, runs)``, ``run(name)`` when a run starts, ``step(phase, n)`` after
``n`` forward/backward passes, and ``close(interrupted)``; ``note(text)``, where it has one, says what follows the
runs (the report folder being written). :func:`reporter` picks one from ``progress=``.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, TextIO

#: Seconds between two progress lines when stderr is not a terminal.
LINE_INTERVAL = 30.0
#: Share of the passes done before a time left is estimated (process start-up and the longest runs, which start
#: first, make early rates wrong by hours).
MIN_SHARE = 0.05


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Lines:
    """One line per run started and one every ``interval`` seconds: done/total passes, elapsed, time left."""

    def __init__(self, stream: Optional[TextIO] = None, interval: float = LINE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, interval, clock
        self.total = self.done = self.runs = self.started = 0
        self.t0 = self.last = 0.0

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(f"gradscope: {text}", file=stream, flush=True)

    def _where(self) -> str:
        elapsed = self.clock() - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        settled = self.done >= MIN_SHARE * self.total  # before, start-up and the first runs skew the rate
        left = f", ~{_clock(elapsed * (self.total - self.done) / self.done)} left" \
            if settled and 0 < self.done < self.total else ""
        return f"{self.done}/{self.total} passes ({pct:.0f}%), {_clock(elapsed)} elapsed{left}"

    def start(self, total: int, runs: int) -> None:
        self.total, self.runs, self.t0 = total, runs, self.clock()
        self.last = self.t0
        self._say(f"profiling {runs} run(s), {total} forward/backward passes")

    def run(self, name: str) -> None:
        self.started += 1
        self.last = self.clock()
        self._say(f"run {self.started}/{self.runs} {name} started; {self._where()}")

    def step(self, phase: str, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._say(self._where())

    def close(self, interrupted: bool = False) -> None:
        self._say(("interrupted after " if interrupted else "done: ") + self._where())

    def note(self, text: str) -> None:
        """A line about what follows the runs (writing the report folder)."""
        self._say(text)


class Bar:
    """A rich progress bar on stderr (or ``console``); it names the run last started and ends as ``done: N runs``,
    never with the name of the last run."""

    def __init__(self, console: Any = None) -> None:
        self.console = console
        self.bar: Any = None
        self.task: Any = None
        self.runs = 0

    def start(self, total: int, runs: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.runs = runs
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console or Console(stderr=True), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("starting", total=total)

    def run(self, name: str) -> None:
        self.bar.update(self.task, description=name)

    def step(self, phase: str, n: int) -> None:
        self.bar.advance(self.task, n)

    def close(self, interrupted: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=("interrupted" if interrupted else "done") + f": {self.runs} runs")
            self.bar.stop()

    def note(self, text: str) -> None:
        """A line about what follows the runs (writing the report folder)."""
        if self.bar is not None:
            self.bar.console.print(f"gradscope: {text}")


def reporter(progress: Any) -> Any:
    """``None``/``False``: no reporter; ``True``/``"auto"``: a bar when stderr is a terminal, else lines;
    ``"bar"``/``"lines"``; or any object with ``start``, ``run``, ``step`` and ``close`` (used as it is)."""
    if progress is None or progress is False:
        return None
    if progress is True or progress == "auto":
        return Bar() if sys.stderr.isatty() else Lines()
    if progress == "bar":
        return Bar()
    if progress == "lines":
        return Lines()
    if all(callable(getattr(progress, m, None)) for m in ("start", "run", "step", "close")):
        return progress
    from gradscope.errors import GradscopeError

    raise GradscopeError(f"progress={progress!r}: use None, True, 'auto', 'bar', 'lines' or an object with start, "
                         f"run, step and close methods")
