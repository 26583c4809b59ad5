"""Runs spread over worker processes: one torch thread each, longest runs first, progress sent back by queue.

Measured on the project's 2-core machine (README, "The default study"): a 56-layer step at 16 px and batch 32
takes ~0.15 s on one thread, two such processes side by side ~0.15 s each, while one process with two torch
threads took 0.85 s under the same shared load: processes, not threads, use the cores.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
import queue as queue_mod
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_QUEUE: Any = None


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(specs: Sequence[Any], settings: Any) -> int:
    """Processes to use: ``settings.workers`` (0: one per core), 1 under torchrun, for a user's factory, on a GPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return 1
    if any(s.factory is not None for s in specs) or str(settings.device).startswith("cuda"):
        return 1
    wanted = settings.workers or available_cores()
    return max(1, min(wanted, len(specs)))


def _cost(spec: Any, settings: Any) -> float:
    """Relative cost of a run: its passes times the cost of one (:func:`gradscope.study.specs.pass_cost`)."""
    from gradscope.study.specs import pass_cost, planned_passes

    return pass_cost(spec) * planned_passes(spec, settings)


def _init_worker(q: Any) -> None:
    global _QUEUE
    import torch

    torch.set_num_threads(1)
    # Progress still buffered when this worker exits is dropped, not waited on: once the study stops reading it
    # (interrupted), a worker waiting to flush a full pipe would block its own exit, and the pool's shutdown forever.
    q.cancel_join_thread()
    _QUEUE = q


class _Progress:
    """A run's progress, sent to the study at most every ``interval`` seconds (a run's very first step at once,
    so the study learns it started; a new phase sends what the last one held).

    Why: one message per training step cost the default study about 4 CPU-seconds of pickling and queue feeding
    (py-spy, docs/performance.md), and the more that is queued, the more a stopped study must drain. ``totals``
    (every step counted, sent or not) goes back with the run's result, and the study reports what its messages did
    not carry (:func:`run_parallel`): a result can overtake the last messages, so only that makes the counts add up.
    """

    def __init__(self, name: str, interval: float = 0.25) -> None:
        self.name, self.interval = name, interval
        self._phase: Optional[str] = None
        self._count = 0
        self._sent = -math.inf
        self.totals: Dict[str, int] = {}

    def __call__(self, phase: str, n: int) -> None:
        if phase != self._phase:
            self.flush()
            self._phase = phase
        self._count += n
        self.totals[phase] = self.totals.get(phase, 0) + n
        if time.monotonic() - self._sent >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self._count and self._phase is not None and _QUEUE is not None:
            _QUEUE.put((self.name, self._phase, self._count))
            self._sent = time.monotonic()
        self._count = 0


def _work(job: Callable[..., Any], spec: Any, train_set: Any, settings: Any, out: Optional[Path]
          ) -> Tuple[Any, Optional[str], bool, Dict[str, int]]:
    """In a worker: ``job(spec, train_set, settings, out, on_step, sink)`` (:func:`runs.measure_job` or a recipe's
    job), one run.

    Returns ``(triple or None, error or None, interrupted, steps run per phase)``; a GradscopeError (bad input)
    propagates.
    """
    from gradscope.errors import GradscopeError

    sink: List[Any] = []
    progress = _Progress(spec.name)
    error, interrupted = None, False
    try:
        job(spec, train_set, settings, out, progress, sink)
    except KeyboardInterrupt:
        interrupted = True
    except GradscopeError:
        raise
    except Exception as exc:  # a model that crashes mid-run: keep its records, say why
        error = f"{type(exc).__name__}: {exc}"
    return (sink[0] if sink else None), error, interrupted, progress.totals


def run_parallel(job: Callable[..., Any], specs: Sequence[Any], train_set: Any, settings: Any,
                 out: Optional[Path], workers: int, on_step: Optional[Callable[[str, int, str], None]],
                 on_run: Optional[Callable[[Any], None]], poll: Optional[Callable[[], None]] = None
                 ) -> Tuple[Dict[str, Any], Dict[str, str], bool]:
    """Run ``specs`` on ``workers`` processes; ``(done, failed, interrupted)`` as
    :func:`gradscope.study.executors.run_here` gives.

    ``on_step`` may raise KeyboardInterrupt (the CLI's stop check, a safe point): every result already handed back
    is kept first, and the workers are asked to stop and hand back theirs. ``poll`` (the same check) is called
    every 0.2 s whatever the workers do, so a stop asked while no run reports steps (building a net, writing its
    records) is seen at once too, not at the next step.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    done: Dict[str, Any] = {}
    failed: Dict[str, str] = {}
    interrupted = False
    order = sorted(specs, key=lambda s: -_cost(s, settings))
    started: set = set()
    by_name = {s.name: s for s in specs}
    received: Dict[Tuple[str, str], int] = {}  # (run, phase) -> steps its messages carried
    closed: set = set()  # runs whose result is in: their late messages are already counted
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
        futures: Dict[Future, Any] = {pool.submit(_work, job, s, train_set, settings, out): s for s in order}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                late = []
                for f in finished:
                    name = futures[f].name
                    totals = _take(f, futures[f], done, failed)
                    late += [(phase, n - received.get((name, phase), 0), name) for phase, n in totals.items()]
                    closed.add(name)
                _drain(q, on_step, on_run, started, by_name, received, closed)
                for spec in (futures[f] for f in finished if futures[f].name not in started):
                    started.add(spec.name)  # a run that ended before its first message was read
                    if on_run:
                        on_run(spec)
                for phase, n, name in late:
                    if on_step and n > 0:
                        on_step(phase, n, name)
                if poll:
                    poll()
        except KeyboardInterrupt:  # stop the workers too: each keeps and returns what it recorded
            interrupted = True
            for f in pending:
                f.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                try:
                    os.kill(proc.pid, signal.SIGINT)
                except (OSError, AttributeError):
                    pass
            for f in _wait_draining(pending, q, timeout=60.0):
                if not f.cancelled():
                    _take(f, futures[f], done, failed)
    return done, failed, interrupted


def _wait_draining(pending: set, q: Any, timeout: float) -> set:
    """The futures of ``pending`` that finish within ``timeout`` s, reading (and dropping) the workers' progress
    meanwhile: a worker whose progress pipe is full cannot hand back its result."""
    deadline = time.monotonic() + timeout
    finished: set = set()
    while pending and time.monotonic() < deadline:
        now, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        finished |= now
        _drain(q, None, None, set(), {})
    return finished


def _take(future: Future, spec: Any, done: Dict[str, Any], failed: Dict[str, str]) -> Dict[str, int]:
    """File one finished future's run (:func:`keep`); returns the steps it ran per phase (empty if it died)."""
    try:
        triple, error, _, totals = future.result()
    except KeyboardInterrupt:
        return {}
    except Exception as exc:  # a worker that died (e.g. killed): the run's streamed parts stay on disk
        from gradscope.errors import GradscopeError

        if isinstance(exc, GradscopeError):
            raise
        failed[spec.name] = f"{type(exc).__name__}: {exc}"
        return {}
    keep(spec, triple, error, done, failed)
    return totals


def keep(spec: Any, triple: Any, error: Any, done: Dict[str, Any], failed: Dict[str, str]) -> None:
    """File one finished run's result: its ``(frame, losses, config)`` in ``done`` (also when it stopped part-way)
    and its error, if any, in ``failed``; shared by the local pool and the Ray executor."""
    if triple is not None:
        done[spec.name] = triple
    if error:
        failed[spec.name] = error


def _drain(q: Any, on_step, on_run, started: set, by_name: Dict[str, Any],
           received: Optional[Dict[Tuple[str, str], int]] = None, closed: Any = ()) -> None:
    """Report the progress messages waiting in ``q``: ``on_run`` at a run's first, ``on_step`` for each; counts go
    into ``received``; messages of ``closed`` runs (counted from their result) are dropped."""
    while True:
        try:
            name, phase, n = q.get_nowait()
        except queue_mod.Empty:
            return
        if name in closed:
            continue
        if received is not None:
            received[(name, phase)] = received.get((name, phase), 0) + n
        if name not in started:
            started.add(name)
            if on_run:
                on_run(by_name[name])
        if on_step:
            on_step(phase, n, name)
