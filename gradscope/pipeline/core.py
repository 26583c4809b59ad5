"""``gradscope.profile(**options)``: the claim check as one library call, the stages in order.

check the options -> resolve the device -> build the run specs -> pick the data -> check one batch ->
(start the folder's provenance) -> run the study -> evaluate once -> (write the folder) -> return the results.

Nothing is written unless ``out=`` names a folder; the CLI is this function plus argument parsing, printing and
the exit status (:mod:`gradscope.pipeline.policy`).
"""
from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, List, Optional

from gradscope.analysis.results import Results
from gradscope.errors import GradscopeError, OutputError
from gradscope.pipeline.options import Options
from gradscope.pipeline.policy import outcome
from gradscope.pipeline.progress import reporter
from gradscope.pipeline.stop import STOP
from gradscope.study.runs import Settings, StudyResult, batches_of, check_batch, resolve_device, run_study, \
    total_steps
from gradscope.study.specs import RunSpec, pass_cost, planned_passes


def profile(**options: Any) -> Results:
    """Measure models at initialisation and over a short training run; return the results every report reads.

    The keyword arguments are the options of ``gradscope profile`` (``docs/cli.md``), named as in Python:
    ``models``, ``depths``, ``bn``, ``model`` (``"path/file.py:factory"`` or the factory itself), ``steps``,
    ``init_only``, ``seeds``, ``out``, ``fail_on``, ``progress``, ... With ``out=None`` (the default) nothing is
    written; with ``out=DIR`` records stream to ``DIR/records/<run>/`` while the runs go and the report folder
    (``report.html``, ``verdicts.csv``, ``summary.json``, ``provenance.json``, ...) is written from the same
    results. ``progress``: ``True`` for a bar on a terminal and lines on stderr otherwise.

    The results hold the claims (only those that apply), verdicts and frames per phase, losses, alerts and notes;
    ``gradscope.pipeline.fail_on(results, kinds)`` says what a ``--fail-on`` list meets.
    Raises :class:`~gradscope.errors.GradscopeError` for bad options, a model that rejects its data, or a study
    that recorded nothing. Ctrl-C or SIGTERM stops it with the results so far (``results.interrupted``).
    """
    opts = Options.of(options)
    device = resolve_device(opts.device)
    rank = _init_distributed(device)
    specs = opts.specs()
    settings = opts.recipe_settings(str(device)) if opts.recipe else opts.settings(str(device))
    train_set = _recipe_data(opts, settings) if opts.recipe else _data(opts, specs)
    if not opts.recipe:
        _check_first(specs, train_set, settings, device)
    out, refusal = None, None
    if opts.out is not None and rank == 0:
        try:
            out = _folder(opts.out)
            if not opts.resume:  # before provenance.json is written over the other study's
                from gradscope.study.executors import refuse_recorded

                refuse_recorded(out)
        except GradscopeError as exc:
            refusal = exc
    _raise_on_every_rank(refusal, rank)
    provenance = _provenance(opts, out, str(device), specs)
    show = reporter(opts.progress) if rank == 0 else None
    try:
        with STOP.installed():
            study = _run(specs, train_set, settings, out, show, opts)
            study.interrupted = study.interrupted or STOP.signal is not None
            results = _evaluate(study, settings, specs, opts)
            if out is not None:
                if callable(getattr(show, "note", None)):
                    what = " (figures and report.html)" if opts.format == "full" else ""
                    show.note(f"writing the report folder {out}{what}")
                _write(results, out, opts.format)
    except BaseException as exc:
        if provenance is not None:
            provenance.finish(exc)
        raise
    if provenance is not None:
        provenance.finish(exit_status=outcome(results, opts.fail_on, STOP.signal).status,
                          interrupted=results.interrupted, runs=list(results.configs))
    return results


def _signature() -> inspect.Signature:
    """``profile``'s keyword arguments as :class:`Options` defines them, so help() and IDEs show each one."""
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                default=f.default if f.default is not MISSING else f.default_factory())
              for f in fields(Options)]
    return inspect.Signature(params, return_annotation="Results")


profile.__signature__ = _signature()  # type: ignore[attr-defined]


def _run(specs: List[RunSpec], train_set: Any, settings: Any, out: Optional[Path], show: Any,
         opts: Options) -> StudyResult:
    where = {"executor": opts.executor, "address": opts.address, "resume": opts.resume}
    if opts.recipe:
        from gradscope.study.recipe_train import recipe_job

        where["job"] = recipe_job
    if show is None:
        return run_study(specs, train_set, settings, out=out, on_step=STOP.check, poll=STOP.check, **where)
    started = False

    def plan(todo: List[RunSpec]) -> None:  # the runs --resume does not load, each pass weighed by its cost
        nonlocal started
        show.start(total_steps(todo, settings), len(todo),
                   plan={s.name: (planned_passes(s, settings), pass_cost(s)) for s in todo})
        started = True
        if len(todo) < len(specs) and callable(getattr(show, "note", None)):
            rest = f"; the other {len(todo)} run from their start" if todo else ""
            show.note(f"resuming: {len(specs) - len(todo)} of {len(specs)} run(s) finished before{rest}")

    interrupted = True
    try:
        study = run_study(specs, train_set, settings, out=out,
                          on_step=lambda phase, n, run: (STOP.check(), show.step(phase, n, run)),
                          on_run=lambda spec: show.run(spec.name), poll=STOP.check, on_plan=plan, **where)
        interrupted = study.interrupted
        return study
    finally:
        if started:  # nothing to close when the study stopped before it began (a folder that cannot resume)
            show.close(interrupted)


def _evaluate(study: StudyResult, settings: Settings, specs: List[RunSpec], opts: Options) -> Results:
    from gradscope.study.evaluate import evaluate

    if study.frame.empty:
        why = "; ".join(f"{run}: {msg}" for run, msg in study.failed.items())
        raise GradscopeError("nothing was recorded: no run finished a single step" + (f" ({why})" if why else ""))
    # the paper's claims speak about the built-in nets only: a user's model gets none
    return evaluate(study, settings, title=opts.title, claims=all(s.builtin for s in specs))


def _write(results: Results, out: Path, format: str) -> None:
    from gradscope.render.report import write_folder

    try:
        for stale in KEPT.values():  # a rebuilt report's copies of an older profile's answers (pipeline/rebuild.py)
            (out / stale).unlink(missing_ok=True)
        write_folder(results, out, format=format)
    except OutputError:
        raise
    except OSError as exc:  # a full disk while writing the report: the records streamed so far stay
        raise OutputError.for_report(out, exc) from exc


def _data(opts: Options, specs: List[RunSpec]) -> Any:
    """The training set every run draws its batches from (None when the user's task gives its own batches)."""
    spec = specs[0]
    if not spec.builtin:
        if spec.task is not None and spec.task.batches is not None:
            if opts.input_shape:
                raise GradscopeError("--input-shape applies when the model file gives no batches(); its "
                                     "batches() decide the inputs")
            return None
        from gradscope.study.task import random_data

        return random_data(spec.build(), tuple(opts.input_shape or (3, 32, 32)), opts.train_size)
    from gradscope.data import load_cifar10, synthetic

    if opts.data == "synthetic":
        return synthetic(n_train=opts.train_size, n_test=0, seed=0, image_size=opts.image_size)[0]
    return load_cifar10(opts.data)[0]


def _recipe_data(opts: Options, settings: Any) -> Any:
    """The recipe's splits of the local CIFAR-10 copy at ``--data``, normalised by its per-pixel mean."""
    from gradscope.data import read_cifar10_pixels
    from gradscope.study.recipe import prepare

    return prepare(*read_cifar10_pixels(opts.data), settings.recipe)


def _check_first(specs: List[RunSpec], train_set: Any, settings: Settings, device: Any) -> None:
    """A model that rejects its data, or a block selector that matches nothing, fails now, not after a run."""
    spec = specs[0]
    model = spec.build().to(device)
    if not spec.builtin:
        from gradscope.study.task import move

        batch = move(next(batches_of(spec, train_set, settings)), lambda t: (t[:2] if t.dim() else t).to(device))
        check_batch(spec, model, batch)
    if spec.blocks != "auto":
        from gradscope.engine.sites import find_blocks

        find_blocks(model, spec.blocks)


def _folder(out: Any) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise GradscopeError(f"cannot write to output folder {str(out)!r}: {exc.strerror or exc}; "
                             f"pass --out with a folder you can write to") from exc
    return out


def _provenance(opts: Options, out: Optional[Path], device: str, specs: List[RunSpec]) -> Any:
    """``out/provenance.json``: the command line, every option, the seeds, versions, device, and each run's facts
    (so that ``gradscope report`` on a killed profile's folder still knows them; rank 0 only)."""
    if out is None:
        return None
    from gradscope.engine.provenance import Provenance

    record = Provenance(out, "profile", opts.record(), seeds={"seeds": list(opts.seeds)}, device=device)
    record.record[FACTS] = {s.name: s.facts() for s in specs}
    record.start()
    return record


#: Key of provenance.json holding each run's facts (run -> config, seed, model, bn, residual, ...).
FACTS = "run_facts"
#: a profile's own answers, kept under these names beside a report that ``gradscope report DIR`` rebuilds into the
#: profile's folder (pipeline/rebuild.py); a later profile into the folder removes them with its old report
KEPT = {"claims.md": "claims.profile.md", "summary.json": "summary.profile.json"}


def with_run_facts(frame: Any, folder: Any) -> Any:
    """``frame`` (records loaded from a profile folder) with each run's facts as columns, read from the folder's
    provenance.json: a killed profile's parts carry no config column, and seeds pool by it. Unchanged without."""
    import json

    from gradscope import schema as S
    from gradscope.engine.provenance import PROVENANCE_FILE

    path = Path(folder) / PROVENANCE_FILE
    try:
        facts = json.loads(path.read_text()).get(FACTS) or {}
    except (OSError, ValueError):
        return frame
    if S.RUN not in frame.columns or not facts:
        return frame
    out = frame.copy()
    for column in S.CONFIG_COLUMNS:
        if column not in out.columns:
            values = out[S.RUN].map(lambda run: (facts.get(str(run)) or {}).get(column))
            if values.notna().any():
                out[column] = values
    return out


def _init_distributed(device: Any) -> int:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA); returns the rank."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def _raise_on_every_rank(error: Optional[GradscopeError], rank: int) -> None:
    """Raise rank 0's refusal of the output folder on every rank: under torchrun the other ranks would otherwise go
    on into the first collective and end there with a connection error once rank 0 has exited (or wait for the
    process group's timeout), never saying why."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        said = [str(error) if error is not None else None]
        dist.broadcast_object_list(said, src=0)
        if said[0] is not None and error is None:
            error = GradscopeError(said[0])
    if error is not None:
        raise error


def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 writes and prints."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
