"""Ctrl-C and SIGTERM stop a profile at a safe point; what was recorded is kept and reported.

While :func:`gradscope.profile` runs in the main thread, SIGINT and SIGTERM set :data:`STOP`; the study stops at
its next safe point (after a step; where runs go on in worker processes or on Ray, within the half second in
which the waiting process polls) with a KeyboardInterrupt that it catches (each run keeps its rows), and the CLI
exits 130 or 143 by the signal that came.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator, Optional


class Stop:
    """Which signal stopped the profile (SIGINT or SIGTERM). The handler only sets it: the study stops at its next
    safe point (:meth:`check`, after a step), never inside the writing of a part. A second signal stops at once."""

    signal: Optional[int] = None

    def handler(self, signum: int, frame: Any) -> None:
        first, self.signal = self.signal is None, signum
        if not first:  # asked twice (a step that hangs): stop now
            raise KeyboardInterrupt

    def check(self, *args: Any) -> None:
        """Called after every step, a safe point, and by a study waiting on its workers: stop the study if a
        signal asked for it."""
        if self.signal is not None:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator["Stop"]:
        """SIGINT and SIGTERM stop the study (the report is still written from what was recorded)."""
        self.signal = None
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self.handler)
        except ValueError:  # not the main thread: leave signals to whoever owns them
            pass
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


#: The one stop of this process (signal handlers are per process).
STOP = Stop()
