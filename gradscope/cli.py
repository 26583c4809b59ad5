"""The ``gradscope`` command: ``profile`` (the claim check), ``report DIR`` and ``models``.

Every command is a thin layer over the public API: parse, validate, call, render. ``main(argv)`` returns the exit
status: 0 success, 2 bad input (one line on stderr, no traceback), 3 a ``--fail-on`` verdict was met,
130 interrupted by Ctrl-C and 143 by SIGTERM (records written so far are kept and the report is written from
them; the console command then dies of the SIGTERM itself, as an unhandled one would), 1 an unexpected internal
error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from gradscope import commands
from gradscope.errors import GradscopeError, OutputError
from gradscope.schema import __version__

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FAIL_ON, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process killed by SIGTERM


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where the help is, not the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"gradscope: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _verdicts_met(phase: str, verdict: str) -> Callable[[Any], List[str]]:
    def check(results: Any) -> List[str]:
        v = results.verdicts.get(phase)
        if v is None:
            return []
        hit = v[v["verdict"] == verdict]
        where = hit.groupby(["run", "signal"], sort=False)["step"].agg(lambda s: s.dropna().astype(int).tolist())
        return [f"{run} {signal} {verdict} {'at initialisation' if phase == 'init' else f'at steps {steps[:5]}'}"
                for (run, signal), steps in where.items()]
    return check


def _diverged(results: Any) -> List[str]:
    out = [m for phase in ("init", "train") for m in _verdicts_met(phase, "diverged")(results)]
    out += [f"{run} training loss NaN" for run, loss in results.final_losses.items() if loss != loss]
    return out


def _alerts_met(kind: str) -> Callable[[Any], List[str]]:
    def check(results: Any) -> List[str]:
        a = results.alerts
        if a is None or not len(a):
            return []
        hit = a[a["kind"] == kind]
        return [f"{r['run']} {kind} at step {r['step']}" + (f", block {r['block']}" if isinstance(r["block"], str)
                                                             and r["block"] else "")
                for r in hit.to_dict("records")]
    return check


#: ``--fail-on`` kinds: name -> (help, check(results) -> what was met). Add a kind here and nowhere else.
FAIL_ON: Dict[str, Tuple[str, Callable[[Any], List[str]]]] = {
    "vanishing": ("a verdict at initialisation is vanishing", _verdicts_met("init", "vanishing")),
    "exploding": ("a verdict at initialisation is exploding", _verdicts_met("init", "exploding")),
    "unknown": ("a verdict at initialisation is unknown", _verdicts_met("init", "unknown")),
    "train-vanishing": ("a recorded training step is vanishing", _verdicts_met("train", "vanishing")),
    "train-exploding": ("a recorded training step is exploding", _verdicts_met("train", "exploding")),
    "diverged": ("non-finite values in any phase, or a NaN training loss", _diverged),
    # the training alerts (gradscope.engine.alerts; alerts.csv): the same kinds as attach(on_anomaly=...)
    "loss_spike": ("an alert: the training loss spiked (robust z-score over recent steps)", _alerts_met("loss_spike")),
    "grad_spike": ("an alert: a block's gradient norm spiked", _alerts_met("grad_spike")),
    "update_band": ("an alert: a block's update ratio left [1e-5, 1e-1]", _alerts_met("update_band")),
    "divergence": ("an alert: NaN/Inf first seen during training (names the block)", _alerts_met("divergence")),
}


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _names(text: str) -> List[str]:
    names = _csv(text)
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; pass comma-separated names")
    return names


def _ints(text: str) -> List[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    return values


def _positive_ints(text: str) -> List[int]:
    values = _ints(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    from gradscope.study.runs import DEFAULT_SEEDS, DEFAULT_TRAIN, DEFAULT_TRAIN_SIZE, Settings

    d = Settings()  # the training defaults live in one place (gradscope.study.runs.Settings)
    parser = _Parser(prog="gradscope", description=(
        "See how forward signals and backward gradients travel through every block of a network."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("profile", help="measure models at initialisation and over a short training run",
                       description=("With no options: plain20/resnet20/plain56/resnet56 with BN (trained) and without "
                                    "BN (measured at initialisation), three seeds, on the built-in synthetic data; "
                                    "answers He et al.'s BatchNorm and degradation claims."))
    g = p.add_argument_group("models")
    g.add_argument("--models", type=_names, default=None, metavar="NAMES",
                   help="comma-separated zoo names (default plain20,resnet20,plain56,resnet56); "
                        "with --depths, families such as plain,resnet")
    g.add_argument("--depths", type=_positive_ints, default=None, metavar="N,N", help="depths for families, e.g. 20,56,110")
    g.add_argument("--bn", choices=("on", "off", "both"), default="both", help="BatchNorm on, off or both (default)")
    g.add_argument("--shortcut", choices=("A", "B", "C"), default=None, help="residual shortcut option (default A)")
    g.add_argument("--init", choices=("kaiming", "xavier", "orthogonal"), default="kaiming")
    g.add_argument("--model", default=None, metavar="FILE.py:FACTORY",
                   help="your own model: path/to/file.py:factory or package.module:factory (a callable -> nn.Module)")
    g.add_argument("--input-shape", type=_positive_ints, default=None, metavar="C,H,W",
                   help="input shape of one example for --model (default 3,32,32)")
    g.add_argument("--blocks", default="auto", help="block selector: 'auto', a glob/regex on module names, "
                                                   "or a class name such as BatchNorm2d")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=d.steps, help=f"SGD steps per run (default {d.steps})")
    g.add_argument("--batch-size", type=_positive, default=d.batch_size, help=f"default {d.batch_size}")
    g.add_argument("--lr", type=float, default=d.lr, help=f"SGD learning rate (default {d.lr:g}; momentum "
                                                          f"{d.momentum:g}, weight decay {d.weight_decay:g})")
    g.add_argument("--every", type=_positive, default=d.every, help=f"record one step in N (default {d.every})")
    g.add_argument("--init-batches", type=_positive, default=d.init_batches,
                   help=f"batches averaged at initialisation (default {d.init_batches})")
    g.add_argument("--seeds", type=_ints, default=list(DEFAULT_SEEDS), metavar="S,S",
                   help=f"seeds (default {','.join(map(str, DEFAULT_SEEDS))}): claims pool them as mean ± sd")
    g.add_argument("--train", choices=("bn", "all"), default=DEFAULT_TRAIN,
                   help="which runs train: 'bn' (default: nets without BN are measured at initialisation only, "
                        "where their contrast is) or 'all'")
    g.add_argument("--data", default="synthetic", help="'synthetic' (built in) or a local CIFAR-10 folder "
                                                       "(cifar-10-batches-py)")
    g.add_argument("--train-size", type=_positive, default=DEFAULT_TRAIN_SIZE, help="synthetic training examples")
    g.add_argument("--image-size", type=_positive, default=d.image_size,
                   help=f"synthetic image size in pixels (default {d.image_size})")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="processes for the runs, one torch thread each (default 0: one per core)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="report folder (default ./gradscope-report/<timestamp>)")
    g.add_argument("--format", choices=("full", "records"), default="full",
                   help="full report (figures, HTML) or records and verdicts only")
    g.add_argument("--quiet", action="store_true", help="no progress display")
    g.add_argument("--json", action="store_true", help="print a JSON summary on stdout (implies --quiet)")
    g.add_argument("--fail-on", type=_csv, default=[], metavar="KINDS",
                   help="exit 3 when one of these is met: " + "; ".join(f"{k}: {h}" for k, (h, _) in
                                                                        FAIL_ON.items()))

    r = sub.add_parser("report", help="re-render the report of a saved run folder")
    r.add_argument("folder", help="a folder written by 'gradscope profile' or attach(out=...)")
    r.add_argument("--out", default=None, help="where to write the report (default: the folder itself)")

    sub.add_parser("models", help="list the built-in networks")
    commands.add_parsers(sub)  # compare, sweep (gradscope/commands.py)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed one line (or --help)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    with _one_line_warnings():
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "models":
            return _models()
        if args.command == "report":
            return _report(args)
        if args.command in commands.COMMANDS:
            return commands.run(args)
        return _profile(args)
    except GradscopeError as exc:
        print(f"gradscope: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradscope: interrupted", file=sys.stderr)
        return EXIT_TERMINATED if _STOP.signal == signal.SIGTERM else EXIT_INTERRUPTED
    except OSError as exc:  # a full disk, a folder gone: the environment, not a bug; say what and where
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"gradscope: error: {exc.strerror or exc}{where}; free some space or pass a folder you can write "
              f"to", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug of ours: one line, and where to look, rather than a traceback
        print(f"gradscope: internal error: {type(exc).__name__}: {exc} (set GRADSCOPE_DEBUG=1 for the traceback; "
              f"please report it)", file=sys.stderr)
        if os.environ.get("GRADSCOPE_DEBUG"):
            raise
        return EXIT_INTERNAL


def main_entry() -> None:
    """Console-script entry point. After a SIGTERM (records and report written) it dies of that signal."""
    code = main()
    if code == EXIT_TERMINATED and _STOP.signal == signal.SIGTERM:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    sys.exit(code)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings (a skipped truncated file, a failed part write) as one line each on stderr."""
    previous = warnings.showwarning

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        text = str(message)
        print(text if text.startswith("gradscope") else f"gradscope: warning: {text}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


class _Stop:
    """Which signal stopped the profile (SIGINT or SIGTERM). The handler only sets it: the study stops at its next
    safe point (:meth:`check`, after a step), never inside the writing of a part. A second signal stops at once."""

    signal: Optional[int] = None

    def handler(self, signum: int, frame: Any) -> None:
        first, self.signal = self.signal is None, signum
        if not first:  # asked twice (a step that hangs): stop now
            raise KeyboardInterrupt

    def check(self, *args: Any) -> None:
        """Called after every step, a safe point: stop the study if a signal asked for it."""
        if self.signal is not None:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """SIGINT and SIGTERM stop the study (the report is still written from what was recorded)."""
        self.signal = None
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self.handler)
        except ValueError:  # not the main thread: leave signals to whoever owns them
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


_STOP = _Stop()


# ---- commands -------------------------------------------------------------------------------------------------

def _models() -> int:
    from rich.console import Console
    from rich.table import Table

    from gradscope.models import available, build

    table = Table(title="gradscope models (build(name, **options))")
    for column in ("name", "family", "blocks", "parameters"):
        table.add_column(column)
    for name in available():
        if name in ("plain", "resnet"):
            table.add_row(name, "cifar", "6n", "any depth 6n+2: build(name, depth=...)")
            continue
        model = build(name, seed=0)
        config = getattr(model, "gradscope_config", {})
        count = sum(p.numel() for p in model.parameters())
        table.add_row(name, str(config.get("family", "")), str(config.get("num_blocks", "")), f"{count / 1e6:.2f}M")
    Console().print(table)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from gradscope.render.report import write_report
    from gradscope.store import load

    folder = Path(args.folder)
    if not folder.is_dir():
        raise GradscopeError(f"no run folder at {str(folder)!r}; pass a folder written by gradscope profile")
    # records.parquet, parts, or the records/<run>/<phase>/ parts of a killed profile (a "phase" column, which the
    # report splits into its initialisation and training parts)
    frame = load(folder)
    if frame.empty:
        raise GradscopeError(f"nothing was recorded in {str(folder)!r}; no report to write")
    out = Path(args.out or folder)
    try:
        path = write_report(frame, out)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write the report to {str(out)!r}: {exc.strerror or exc}") from exc
    print(f"report written to {path}")
    return EXIT_OK


def _specs(args: argparse.Namespace):
    from gradscope.models import available
    from gradscope.study.runs import DEFAULT_MODELS, RunSpec, grid

    if args.input_shape and not args.model:
        raise GradscopeError(f"--input-shape {','.join(map(str, args.input_shape))} applies to --model only; "
                             f"the built-in nets take 3,32,32")
    if args.model:
        from gradscope.study.userload import load_factory

        factory = load_factory(args.model)
        shape = tuple(args.input_shape or (3, 32, 32))
        return [RunSpec(model=args.model.rsplit(":", 1)[-1], bn=None, init=None, seed=s, factory=factory,
                        input_shape=shape, blocks=_selector(args.blocks)) for s in args.seeds]
    names = args.models or list(DEFAULT_MODELS)
    if args.depths:
        names = [f"{family}{depth}" if not family[-1].isdigit() else family for family in names for depth in args.depths]
    known = set(available())
    for name in names:
        if name not in known and not name.rstrip("0123456789") in ("plain", "resnet"):
            from gradscope.models import build

            build(name)  # raises the registry's error, with close matches
    bn = {"on": (True,), "off": (False,), "both": (True, False)}[args.bn]
    train = "all" if args.bn == "off" else args.train  # without BN runs at all, "bn" would train nothing
    specs = grid(names, bn=bn, seeds=args.seeds, shortcut=args.shortcut, init=args.init, train=train)
    return [s if args.blocks == "auto" else _with_blocks(s, args.blocks) for s in specs]


def _with_blocks(spec, blocks: str):
    from dataclasses import replace

    return replace(spec, blocks=_selector(blocks))


def _selector(text: str) -> Any:
    """'auto', a torch.nn class name (BatchNorm2d, nn.Conv2d), or a glob/regex on module names."""
    from torch import nn

    name = text[3:] if text.startswith("nn.") else text
    candidate = getattr(nn, name, None)
    if isinstance(candidate, type) and issubclass(candidate, nn.Module):
        return candidate
    return text


def _data(args: argparse.Namespace, specs):
    from gradscope.data import load_cifar10, synthetic

    if args.data == "synthetic":
        shape = specs[0].input_shape if specs and specs[0].factory is not None else (3, 32, 32)
        if specs and specs[0].factory is None:
            train, _ = synthetic(n_train=args.train_size, n_test=0, seed=0, image_size=args.image_size)
            return train
        if tuple(shape) == (3, 32, 32):
            train, _ = synthetic(n_train=args.train_size, n_test=0, seed=0)
            return train
        from gradscope.study.userload import random_data

        return random_data(specs[0], args.train_size)
    train, _ = load_cifar10(args.data)
    return train


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path("gradscope-report") / time.strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise GradscopeError(f"cannot write to output folder {str(out)!r}: {exc.strerror or exc}; "
                             f"pass --out with a folder you can write to") from exc
    return out


def _profile(args: argparse.Namespace) -> int:
    from gradscope.study.runs import Settings, resolve_device

    if args.steps < 0:
        raise GradscopeError(f"--steps {args.steps} must be >= 0")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise GradscopeError(f"--lr {args.lr} must be a positive number")
    unknown = [v for v in args.fail_on if v not in FAIL_ON]
    if unknown:
        raise GradscopeError(f"--fail-on {','.join(unknown)}: choose from {', '.join(FAIL_ON)}")
    device = resolve_device(args.device)
    rank = _init_distributed(device)
    quiet = args.quiet or args.json or rank != 0
    specs = _specs(args)
    _check_unique(specs)
    if specs[0].factory is not None:
        from gradscope.study.runs import check_input

        check_input(specs[0].build().to(device), (1,) + tuple(specs[0].input_shape), device)
    if specs[0].blocks != "auto":  # a selector that matches nothing fails now, not after the first run
        from gradscope.engine.sites import find_blocks

        find_blocks(specs[0].build(), specs[0].blocks)
    train_set = _data(args, specs)
    out = _out_dir(args) if rank == 0 else None
    settings = Settings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, every=args.every,
                        init_batches=args.init_batches, device=str(device), workers=args.workers,
                        image_size=args.image_size if args.data == "synthetic" else 32)
    provenance = _provenance(args, out, device)
    try:
        with _STOP.installed():
            result = _run_with_progress(specs, train_set, settings, out, quiet)
            result.interrupted = result.interrupted or _STOP.signal is not None
            if rank != 0:  # every rank holds the global frame; rank 0 alone writes and prints
                return EXIT_INTERRUPTED if result.interrupted else EXIT_OK
            try:
                code = _finish(args, result, settings, out, quiet)
            except OutputError:
                raise
            except OSError as exc:  # a full disk while writing the report: the records streamed so far stay
                raise OutputError(f"cannot write the report to {str(out)!r}: {exc.strerror or exc}") from exc
    except BaseException as exc:
        if provenance is not None:
            provenance.finish(exc)
        raise
    if provenance is not None:
        provenance.finish(exit_status=code, interrupted=result.interrupted, runs=list(result.configs))
    return EXIT_TERMINATED if code == EXIT_INTERRUPTED and _STOP.signal == signal.SIGTERM else code


def _provenance(args: argparse.Namespace, out: Optional[Path], device: Any) -> Any:
    """``out/provenance.json``: the command line, every option, the seeds, versions, device (rank 0 only)."""
    if out is None:
        return None
    from gradscope.engine.provenance import Provenance

    config = {k: v for k, v in vars(args).items() if not callable(v)}
    record = Provenance(out, "profile", config, seeds={"seeds": args.seeds}, device=str(device))
    record.start()
    return record


def _check_unique(specs: Sequence[Any]) -> None:
    """Two runs with one name would write into one folder: refuse before the first starts."""
    seen, repeated = set(), []
    for spec in specs:
        if spec.name in seen and spec.name not in repeated:
            repeated.append(spec.name)
        seen.add(spec.name)
    if repeated:
        raise GradscopeError(f"run name(s) {', '.join(repeated)} would repeat: each run needs a distinct "
                             f"model/--bn/--seeds combination (drop the repeated value)")


def _init_distributed(device) -> int:
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


def _run_with_progress(specs, train_set, settings, out: Path, quiet: bool):
    from gradscope.study.runs import run_study, total_steps

    if quiet:
        return run_study(specs, train_set, settings, out=out, on_step=_STOP.check)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("starting", total=total_steps(specs, settings))
        return run_study(specs, train_set, settings, out=out,
                         on_step=lambda phase, n: (_STOP.check(), progress.advance(task, n)),
                         on_run=lambda spec: progress.update(task, description=spec.name))


def _finish(args: argparse.Namespace, result, settings, out: Path, quiet: bool) -> int:
    """Evaluate once, let the one writer write the folder, print from the same results, pick the exit status."""
    from gradscope.render.report import write_folder
    from gradscope.study.results import evaluate

    if result.frame.empty:
        why = "; ".join(f"{run}: {msg}" for run, msg in result.failed.items())
        raise GradscopeError("nothing was recorded: no run finished a single step" + (f" ({why})" if why else ""))
    results = evaluate(result, settings)
    write_folder(results, out, format=args.format)
    if args.json:
        print(json.dumps({"report": str(out), **results.summary()}, default=str))
    else:
        _print_results(results, out)
    if result.interrupted:
        print(f"gradscope: interrupted; records so far are in {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.failed:
        for run, why in result.failed.items():
            print(f"gradscope: error: run {run} failed: {why}; its records so far are in {out}", file=sys.stderr)
        return EXIT_INTERNAL
    met = [m for kind in args.fail_on for m in FAIL_ON[kind][1](results)]
    if met:
        print("gradscope: --fail-on met: " + "; ".join(met), file=sys.stderr)
        return EXIT_FAIL_ON
    return EXIT_OK


def _print_results(results, out: Path) -> None:
    from rich.console import Console

    from gradscope.render.terminal import print_results

    console = Console()
    print_results(results, console)
    console.print(f"report: {out / 'report.html'}")
