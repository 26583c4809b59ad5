"""The ends a training loop does not see coming: the interpreter exiting, and SIGTERM.

Every scope that streams to disk (``attach(out=...)``) is registered here until it is detached:

- **at exit** (``atexit``: an uncaught exception, ``sys.exit``) every registered scope still alive writes the rows it
  holds; a scope collected earlier wrote its own rows then (``Scope.__del__``);
- **SIGTERM** (what docker, Kubernetes and Slurm send before SIGKILL): a handler writes the rows of every live
  scope and then does what the signal would have done without gradscope: it calls the handler that was installed
  before (yours, or the CLI's, which stops the study and writes the report), or, where there was none, restores the
  default action and sends the signal again, so the process still dies of SIGTERM (exit status 143 in a shell).
  A handler set to ``SIG_IGN`` stays as it is, and so does any handler installed after ``attach()``.

The registry holds scopes weakly: registering keeps nothing alive. Only the process that attached writes: a forked
child (a DataLoader worker, which Slurm signals too) holds copies of the scopes and leaves the folder alone.
"""
from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from typing import Any, Callable, Dict, Tuple, Union

Handler = Union[Callable[[int, Any], Any], int, None]


class LiveScopes:
    """Scopes with rows that must reach disk however the process ends."""

    def __init__(self) -> None:
        self._scopes: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self._previous: Handler = None
        self._registered_exit = False
        self._pid = os.getpid()
        #: run records a caller completes after detaching (see :meth:`keep_record`): id -> (record, scope)
        self._records: Dict[int, Tuple[Any, Any]] = {}

    def add(self, scope: Any) -> None:
        """Watch ``scope`` (its recorder writes the rows) until :meth:`forget` or until it is collected."""
        if os.getpid() != self._pid:  # attached in a child process: that process owns the registry from now on
            self._scopes.clear()
            self._pid = os.getpid()
        self._scopes[id(scope)] = scope
        if not self._registered_exit:
            atexit.register(self.write_all)
            self._registered_exit = True
        self._install_sigterm()

    def forget(self, scope: Any) -> None:
        self._scopes.pop(id(scope), None)

    def keep_record(self, record: Any, scope: Any) -> None:
        """Mark ``record`` (a :class:`~gradscope.engine.provenance.Provenance`) interrupted on a SIGTERM until
        :meth:`drop_record`, with ``scope``'s step and row counts: a callback completes its ``out/provenance.json``
        only after detaching and writing its report, which takes seconds a SIGTERM may land in."""
        self._records[id(record)] = (record, scope)

    def drop_record(self, record: Any) -> None:
        self._records.pop(id(record), None)

    def write_all(self) -> None:
        """Every live scope's buffered and in-memory rows to its folder (never raises)."""
        if os.getpid() != self._pid:  # a forked copy of the scopes: the parent writes them
            return
        for scope in list(self._scopes.values()):
            rec = getattr(scope, "_rec", None)
            if rec is not None and getattr(scope, "_attached", False):
                rec.write_remaining()

    # ---- SIGTERM ---------------------------------------------------------------------------------------------
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the exit writer still covers the rest
        current = signal.getsignal(signal.SIGTERM)
        if current == self._on_sigterm or current in (signal.SIG_IGN, None):
            return  # ours already, ignored on purpose, or set outside Python: leave it
        self._previous = current
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def mark_terminated(self) -> None:
        """Each live scope's ``provenance.json`` says the run was interrupted by SIGTERM (it said "running" forever:
        the process dies before any ``detach()``); never raises. Only in the attaching process: a forked child (a
        pool worker terminated) holds copies of the scopes and leaves their records alone."""
        if os.getpid() != self._pid:
            return
        pairs = [(getattr(scope, "provenance", None), scope) for scope in list(self._scopes.values())
                 if getattr(scope, "_attached", False)] + list(self._records.values())
        for record, scope in pairs:
            rec = getattr(scope, "_rec", None)
            if record is None or rec is None:
                continue
            try:
                record.finish(interrupted=True, signal="SIGTERM", steps=rec.step, rows=rec.row_count)
            except Exception:  # noqa: BLE001 - a handler on the way to dying must not raise
                pass

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.write_all()
        previous = self._previous
        if callable(previous):  # its owner decides what happens next (the CLI's stops the study and reports)
            previous(signum, frame)
            return
        self.mark_terminated()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what the signal would have done: die of it
        os.kill(os.getpid(), signal.SIGTERM)
