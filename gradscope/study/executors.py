"""Where a study's runs execute, behind one call: the local process pool or a Ray cluster; and resuming.

Both engines run the same module-level ``job(spec, train_set, settings, out, on_step, sink)`` and hand back the
same ``(done, failed, interrupted)``, so a study's results do not depend on where it ran (one torch thread per
run in both: tested equal, value for value). A run that finishes writes a snapshot of its result beside its
streamed records (``out/records/<run>/finished/``); a study started again on the same folder with ``resume=True``
loads those runs instead of running them again, after checking they were made with the same settings. A run
that had started but not finished (killed, stopped, crashed) runs again from its start: its partial records are
removed first, since a records folder holds one run's parts (:func:`gradscope.store.prepare_out` refuses a
second).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields as dataclass_fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from gradscope.errors import GradscopeError
from gradscope.study.parallel import keep

EXECUTORS = ("local", "ray")
FINISHED = "finished"
_RESULT_FILE = "result.json"


def execute(job: Callable[..., Any], specs: Sequence[Any], data: Any, settings: Any, out: Optional[Path],
            on_step: Optional[Callable[[str, int, str], None]], on_run: Optional[Callable[[Any], None]], *,
            steps_of: Callable[[Any], Dict[str, int]], executor: str = "local", address: Optional[str] = None,
            resume: bool = False, poll: Optional[Callable[[], None]] = None,
            on_plan: Optional[Callable[[Sequence[Any]], None]] = None
            ) -> Tuple[Dict[str, Any], Dict[str, str], bool]:
    """Run ``job(spec, data, settings, out, on_step, sink)`` for every spec on ``executor``: ``(done, failed,
    interrupted)``, ``done`` mapping run names to ``(frame, losses, config)``.

    A job reports its passes as ``on_step(phase, n)``; the executor hands them on as ``on_step(phase, n, run)``
    with the run's name, so a progress display can weigh each run's passes by their cost. ``on_plan`` gets the
    specs that will really run (those ``resume`` does not load) before the first starts.

    ``"local"``: worker processes when :func:`gradscope.study.parallel.worker_count` says so (one torch thread
    each), else one run after another here; ``"ray"``: :func:`run_ray`. ``resume=True`` first loads the runs that
    finished in ``out`` (each job saves its snapshot with :func:`save_finished`) and runs only the others.
    ``poll``: a stop check the worker pool and Ray call while they wait for runs in other processes (it may raise
    KeyboardInterrupt); runs here in this process are checked at each step only, through ``on_step``.
    """
    from gradscope.study import parallel

    if executor not in EXECUTORS:
        raise GradscopeError(f"executor={executor!r}: use one of {', '.join(EXECUTORS)}")
    if resume and out is None:
        raise GradscopeError("resume=True needs the out= folder of the study to resume")
    if out is not None and not resume:
        refuse_recorded(out)
    resumed: Dict[str, Any] = {}
    if resume:
        for spec in specs:
            triple = load_finished(out, spec.name, fingerprint(spec, settings))
            if triple is not None:
                resumed[spec.name] = triple
    todo = [s for s in specs if s.name not in resumed]
    if resume:
        for spec in todo:
            clear_unfinished(out, spec.name)
    if on_plan:
        on_plan(todo)
    if executor == "ray":
        done, failed, interrupted = run_ray(job, todo, data, settings, out, on_step, on_run, steps_of=steps_of,
                                            address=address, poll=poll)
    elif parallel.worker_count(todo, settings) > 1:
        done, failed, interrupted = parallel.run_parallel(job, todo, data, settings, out,
                                                          parallel.worker_count(todo, settings), on_step, on_run,
                                                          poll)
    else:
        done, failed, interrupted = run_here(job, todo, data, settings, out, on_step, on_run)
    return {**resumed, **done}, failed, interrupted


def named(on_step: Optional[Callable[[str, int, str], None]], run: str) -> Optional[Callable[[str, int], None]]:
    """The ``on_step(phase, n)`` a job of run ``run`` calls, handing its passes on with the run's name."""
    if on_step is None:
        return None
    return lambda phase, n: on_step(phase, n, run)


def run_here(job: Callable[..., Any], specs: Sequence[Any], data: Any, settings: Any, out: Optional[Path],
             on_step: Optional[Callable[[str, int, str], None]], on_run: Optional[Callable[[Any], None]]
             ) -> Tuple[Dict[str, Any], Dict[str, str], bool]:
    """The runs one after another in this process; a run that crashes is noted and the others go on."""
    done: Dict[str, Any] = {}
    failed: Dict[str, str] = {}
    interrupted = False
    for spec in specs:
        if on_run:
            on_run(spec)
        sink: List[Any] = []
        try:
            job(spec, data, settings, out, named(on_step, spec.name), sink)
        except KeyboardInterrupt:
            interrupted = True
        except GradscopeError:
            raise
        except Exception as exc:  # a model that crashes mid-run: keep its records, say why, go on with the others
            failed[spec.name] = f"{type(exc).__name__}: {exc}"
        if sink:
            done[spec.name] = sink[0]
        if interrupted:
            break
    return done, failed, interrupted


# --- resuming --------------------------------------------------------------------------------------------------
def fingerprint(spec: Any, settings: Any) -> Dict[str, Any]:
    """What must match for a finished run to stand in for a new one: the spec's fields (not its factory or task,
    which are code) and every setting."""
    fields = ({f.name: getattr(spec, f.name) for f in dataclass_fields(spec) if f.name not in ("factory", "task")}
              if is_dataclass(spec) else {})
    chosen = asdict(settings) if is_dataclass(settings) else dict(vars(settings))
    return json.loads(json.dumps({"spec": fields, "settings": chosen}, default=str))


def refuse_recorded(out: Path) -> None:
    """Refuse a study's ``out`` whose ``records/`` already holds runs: their rows would be read back with the new
    study's (another study's runs counted as seeds of this one), and a run of the same name would find its folder
    taken mid-study. ``resume=True`` is the way to go on with the same study."""
    records = Path(out) / "records"
    runs = sorted(p.name for p in records.iterdir() if p.is_dir()) if records.is_dir() else []
    if runs:
        shown = ", ".join(runs[:4]) + (f" and {len(runs) - 4} more" if len(runs) > 4 else "")
        raise GradscopeError(f"out={str(out)!r} already holds the records of a study (runs {shown}); pass a new "
                             f"folder, delete that one, or resume the same study (--resume, resume=True)")


def clear_unfinished(out: Path, name: str) -> bool:
    """Remove the records run ``name`` left in ``out`` without finishing, so that it can run again from its start;
    True when there were some. A run that finished is never touched (its snapshot is what ``resume`` loads)."""
    folder = Path(out) / "records" / name
    if not folder.is_dir() or (finished_dir(out, name) / _RESULT_FILE).is_file():
        return False
    shutil.rmtree(folder)
    return True


def finished_dir(out: Path, name: str) -> Path:
    return Path(out) / "records" / name / FINISHED


def is_finished(out: Path, name: str) -> bool:
    """Whether run ``name`` left a complete finished snapshot in ``out`` (its result file is written last)."""
    return (finished_dir(out, name) / _RESULT_FILE).is_file()


def save_finished(out: Path, name: str, triple: Tuple[Any, Any, Dict[str, Any]], key: Dict[str, Any]) -> None:
    """Snapshot a finished run: its labelled frame and losses, then (last, atomically) its config and ``key``."""
    from gradscope import store

    frame, losses, config = triple
    folder = finished_dir(out, name)
    folder.mkdir(parents=True, exist_ok=True)
    store.write_records(frame, folder)
    store.atomic_write(folder / "losses.csv", lambda tmp: losses.to_csv(tmp, index=False))
    store.atomic_text(folder / _RESULT_FILE, json.dumps({"config": config, "key": key}, default=str, indent=1))


def load_finished(out: Path, name: str, key: Dict[str, Any]) -> Optional[Tuple[Any, Any, Dict[str, Any]]]:
    """The snapshot of run ``name`` in ``out``, or None when it never finished; a GradscopeError when it finished
    under other settings (resuming would mix two studies)."""
    import pandas as pd

    from gradscope import store

    folder = finished_dir(out, name)
    if not (folder / _RESULT_FILE).is_file():
        return None
    saved = json.loads((folder / _RESULT_FILE).read_text())
    if saved.get("key") != key:
        differs = sorted(k for part in ("spec", "settings") for k in set(key.get(part, {})) |
                         set(saved.get("key", {}).get(part, {}))
                         if key.get(part, {}).get(k) != saved.get("key", {}).get(part, {}).get(k))
        raise GradscopeError(f"cannot resume {str(out)!r}: run {name!r} finished with other settings "
                             f"({', '.join(differs)}); use a new --out folder, or the same options as before")
    losses = pd.read_csv(folder / "losses.csv")
    frame = store.read_records(folder)
    for column in frame.columns[frame.dtypes == object]:  # missing labels read back as NaN: None, as written
        frame[column] = frame[column].where(frame[column].notna(), None)
    return frame, losses, saved["config"]


# --- Ray ------------------------------------------------------------------------------------------------------
def _ray_work(job: Callable[..., Any], spec: Any, train_set: Any, settings: Any, out: Optional[Path],
              threads: int) -> Tuple[Any, Optional[str]]:
    """One run inside a Ray worker: ``(triple or None, error or None)``; bad input (GradscopeError) propagates."""
    import torch

    torch.set_num_threads(threads)
    sink: List[Any] = []
    try:
        job(spec, train_set, settings, out, None, sink)
        return sink[0], None
    except GradscopeError:
        raise
    except Exception as exc:  # a model that crashes mid-run: keep its records, say why
        return (sink[0] if sink else None), f"{type(exc).__name__}: {exc}"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise GradscopeError("executor='ray' needs Ray: pip install 'torch-gradscope[ray]' (or pip install ray)"
                             ) from exc
    return ray


def run_ray(job: Callable[..., Any], specs: Sequence[Any], train_set: Any, settings: Any, out: Optional[Path],
            on_step: Optional[Callable[[str, int, str], None]], on_run: Optional[Callable[[Any], None]],
            steps_of: Callable[[Any], Dict[str, int]], address: Optional[str] = None,
            cpus_per_run: int = 1, poll: Optional[Callable[[], None]] = None
            ) -> Tuple[Dict[str, Any], Dict[str, str], bool]:
    """Each run a Ray task (``cpus_per_run`` CPUs, one GPU when ``settings.device`` is CUDA).

    Connects to ``address`` (``"auto"``, ``"ray://host:10001"``, ...) or starts a local cluster, which is shut
    down again afterwards. Records stream to ``out`` from the workers, so ``out`` must be a path every node can
    write (a shared file system) on a multi-node cluster. Progress is reported as runs finish (``on_run`` and
    ``on_step`` with the run's passes). Ctrl-C cancels the runs still pending and returns what finished, and so
    does a KeyboardInterrupt from ``poll`` (the CLI's stop check: SIGTERM), called every half second.
    """
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
        except Exception as exc:  # a wrong address, a cluster that is down: one clear line
            raise GradscopeError(f"cannot start or reach a Ray cluster (address={address!r}): "
                                 f"{type(exc).__name__}: {exc}") from exc
    gpus = 1 if str(settings.device).startswith("cuda") else 0
    task = ray.remote(_ray_work).options(num_cpus=cpus_per_run, num_gpus=gpus, max_retries=0)
    done: Dict[str, Any] = {}
    failed: Dict[str, str] = {}
    interrupted = False
    try:
        data = ray.put(train_set)
        pending = {task.remote(job, spec, data, settings, out, cpus_per_run): spec for spec in specs}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    spec = pending.pop(ref)
                    _take_ray(ray, ref, spec, done, failed)
                    if on_run:
                        on_run(spec)
                    if on_step:
                        for phase, count in steps_of(spec).items():
                            on_step(phase, count, spec.name)
                if poll:
                    poll()
        except KeyboardInterrupt:
            interrupted = True
            for ref in pending:
                ray.cancel(ref, force=True)
    finally:
        if started_here:
            ray.shutdown()
    return done, failed, interrupted


def _take_ray(ray: Any, ref: Any, spec: Any, done: Dict[str, Any], failed: Dict[str, str]) -> None:
    try:
        triple, error = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, GradscopeError):
            raise cause
        failed[spec.name] = f"{type(cause or exc).__name__}: {cause or exc}"
        return
    except ray.exceptions.RayError as exc:  # a worker that died (killed, out of memory): its parts stay on disk
        failed[spec.name] = f"{type(exc).__name__}: {exc}"
        return
    keep(spec, triple, error, done, failed)
