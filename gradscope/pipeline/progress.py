"""Progress of a profile on stderr: a bar on a terminal, plain lines when piped (CI, nohup, ``tee``).

A reporter has four methods: ``start(total, runs)``, ``run(name)`` when a run starts, ``step(phase, n)`` after
``n`` forward/backward passes, and ``close(interrupted)``; ``note(text)``, where it has one, says what follows the
runs (the report folder being written). :func:`reporter` picks one from ``progress=``.

The time left weighs each run's passes by their cost (:func:`gradscope.study.specs.pass_cost`): the built-in
reporters' ``start`` takes ``plan={run: (passes, cost of one)}`` and their ``step`` the ``run`` the passes belong
to. Counting passes alone made the first estimates of the default study about 1.8 times too long, because its
56-layer runs, whose passes cost about three times more, go first. A reporter of the user's own gets the four
plain calls (:class:`Plain`).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, Optional, TextIO, Tuple

#: ``{run: (passes, relative cost of one pass)}``: what a study will do, for the time left.
Plan = Mapping[str, Tuple[int, float]]

#: Seconds between two progress lines when stderr is not a terminal.
LINE_INTERVAL = 30.0
#: Share of the passes done before a time left is estimated (process start-up and the longest runs, which start
#: first, make early rates wrong by hours).
MIN_SHARE = 0.05


class Work:
    """Passes and their cost-weighted work, planned and done; the time left is the elapsed time times the work
    still to do over the work done."""

    def __init__(self, total: int, plan: Optional[Plan] = None) -> None:
        self.plan = dict(plan or {})
        self.total = total
        planned = sum(n for n, _ in self.plan.values())
        planned_work = sum(n * c for n, c in self.plan.values())
        #: the cost of a pass of no planned run (or reported without its run): the planned passes' mean
        self.mean_cost = planned_work / planned if planned else 1.0
        self.work_total = planned_work + max(total - planned, 0) * self.mean_cost
        self.done = 0
        self.work_done = 0.0

    def add(self, n: int, run: Optional[str] = None) -> float:
        """Count ``n`` passes of ``run`` (its planned cost; the mean cost when it is unknown); returns their work."""
        work = n * (self.plan[run][1] if run in self.plan else self.mean_cost)
        self.done += n
        self.work_done += work
        return work

    def left(self, elapsed: float) -> Optional[float]:
        """Seconds left, or None before :data:`MIN_SHARE` of the work is done (or when nothing is left to do)."""
        if not (0 < self.done < self.total) or self.work_done < MIN_SHARE * self.work_total:
            return None
        return elapsed * max(self.work_total - self.work_done, 0.0) / self.work_done


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Lines:
    """One line per run started and one every ``interval`` seconds: done/total passes, elapsed, time left."""

    def __init__(self, stream: Optional[TextIO] = None, interval: float = LINE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, interval, clock
        self.work = Work(0)
        self.runs = self.started = 0
        self.t0 = self.last = 0.0

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(f"gradscope: {text}", file=stream, flush=True)

    def _where(self) -> str:
        elapsed = self.clock() - self.t0
        done, total = self.work.done, self.work.total
        pct = 100.0 * done / total if total else 100.0
        left = self.work.left(elapsed)
        said = f", ~{_clock(left)} left" if left is not None else ""
        return f"{done}/{total} passes ({pct:.0f}%), {_clock(elapsed)} elapsed{said}"

    def start(self, total: int, runs: int, plan: Optional[Plan] = None) -> None:
        self.work, self.runs, self.t0 = Work(total, plan), runs, self.clock()
        self.last = self.t0
        self._say(f"profiling {runs} run(s), {total} forward/backward passes")

    def run(self, name: str) -> None:
        self.started += 1
        self.last = self.clock()
        self._say(f"run {self.started}/{self.runs} {name} started; {self._where()}")

    def step(self, phase: str, n: int, run: Optional[str] = None) -> None:
        self.work.add(n, run)
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
        self.work = Work(0)

    def start(self, total: int, runs: int, plan: Optional[Plan] = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.runs, self.work = runs, Work(total, plan)
        # the bar advances by work (so rich's time left weighs each pass by its cost); the text counts passes
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.fields[passes]}/{task.fields[of]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=self.console or Console(stderr=True), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("starting", total=self.work.work_total, passes=0, of=total)

    def run(self, name: str) -> None:
        self.bar.update(self.task, description=name)

    def step(self, phase: str, n: int, run: Optional[str] = None) -> None:
        work = self.work.add(n, run)
        self.bar.update(self.task, advance=work, passes=self.work.done)

    def close(self, interrupted: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=("interrupted" if interrupted else "done") + f": {self.runs} runs")
            self.bar.stop()

    def note(self, text: str) -> None:
        """A line about what follows the runs (writing the report folder)."""
        if self.bar is not None:
            self.bar.console.print(f"gradscope: {text}")


class Plain:
    """A reporter of the user's own, called with the four plain signatures (no plan, no run names)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def start(self, total: int, runs: int, plan: Optional[Plan] = None) -> None:
        self.inner.start(total, runs)

    def run(self, name: str) -> None:
        self.inner.run(name)

    def step(self, phase: str, n: int, run: Optional[str] = None) -> None:
        self.inner.step(phase, n)

    def close(self, interrupted: bool = False) -> None:
        self.inner.close(interrupted)

    def note(self, text: str) -> None:
        if callable(getattr(self.inner, "note", None)):
            self.inner.note(text)


def reporter(progress: Any) -> Any:
    """``None``/``False``: no reporter; ``True``/``"auto"``: a bar when stderr is a terminal, else lines;
    ``"bar"``/``"lines"``; a :class:`Lines` or :class:`Bar` (used as it is); or any object with ``start``, ``run``,
    ``step`` and ``close``, called with their plain signatures (:class:`Plain`)."""
    if progress is None or progress is False:
        return None
    if progress is True or progress == "auto":
        return Bar() if sys.stderr.isatty() else Lines()
    if progress == "bar":
        return Bar()
    if progress == "lines":
        return Lines()
    if isinstance(progress, (Lines, Bar)):
        return progress
    if all(callable(getattr(progress, m, None)) for m in ("start", "run", "step", "close")):
        return Plain(progress)
    from gradscope.errors import GradscopeError

    raise GradscopeError(f"progress={progress!r}: use None, True, 'auto', 'bar', 'lines' or an object with start, "
                         f"run, step and close methods")
