"""The ``gradscope`` command: ``profile`` (the claim check), ``report DIR``, ``models``, ``compare`` and ``sweep``.

Every command parses its flags, calls the library, prints and picks the exit status; the work is in the library
(``profile`` is :func:`gradscope.profile`). A subcommand is one :func:`subcommand` entry: a function that adds its
arguments and a function ``run(args) -> exit status``.

``main(argv)`` returns the exit status: 0 success, 2 bad input (one line on stderr, no traceback), 3 a
``--fail-on`` kind was met, 130 interrupted by Ctrl-C and 143 by SIGTERM (records written so far are kept and the
report is written from them; the console command then dies of the SIGTERM itself, as an unhandled one would),
1 an unexpected internal error or a run that failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from gradscope import commands
from gradscope.errors import GradscopeError, OutputError
from gradscope.pipeline.policy import (EXIT_FAIL_ON, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED,
                                       EXIT_USAGE, FAIL_ON)
from gradscope.pipeline.stop import STOP
from gradscope.schema import __version__

__all__ = ["EXIT_FAIL_ON", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE",
           "FAIL_ON", "build_parser", "main", "main_entry", "subcommand"]

#: name -> (help, add_arguments(parser), run(args) -> exit status), in the order ``--help`` lists them.
COMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``run(args) -> exit status`` as ``gradscope NAME``; ``arguments(parser)`` adds its options."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, arguments, run)
        return run
    return register


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where the help is, not the whole usage block; and no
    abbreviated options (``--step`` would silently mean ``--steps``, and a typo would land on another option)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"gradscope: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _names(text: str) -> List[str]:
    if not _csv(text):
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; pass comma-separated names")
    return _csv(text)


def _ints(text: str, minimum: Optional[int] = None) -> List[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if minimum is not None and any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values


def _positive_ints(text: str) -> List[int]:
    return _ints(text, minimum=1)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from gradscope.pipeline.options import Options
    from gradscope.study.runs import Settings

    d, s = Options(), Settings()  # every default lives in the library (Options, Settings)
    p.description = ("With no options: plain20/resnet20/plain56/resnet56 with BN (trained) and without BN "
                     "(measured at initialisation), three seeds, on the built-in synthetic data; answers He et "
                     "al.'s BatchNorm and degradation claims. Every option: docs/cli.md.")
    g = p.add_argument_group("models")
    g.add_argument("--models", type=_names, metavar="NAMES",
                   help="comma-separated zoo names (default plain20,resnet20,plain56,resnet56); with --depths, "
                        "families such as plain,resnet")
    g.add_argument("--depths", type=_positive_ints, metavar="N,N", help="depths for families, e.g. 20,56,110")
    g.add_argument("--bn", choices=("on", "off", "both"), default=d.bn, help="BatchNorm on, off or both (default)")
    g.add_argument("--shortcut", choices=("A", "B", "C"), help="residual shortcut option (default A)")
    g.add_argument("--init", choices=("kaiming", "xavier", "orthogonal"), default=d.init)
    g.add_argument("--model", metavar="FILE.py:FACTORY",
                   help="your own model and task: path/to/file.py:factory or package.module:factory; the file "
                        "may define loss(output, batch) and batches(batch_size, seed) (docs/cli.md)")
    g.add_argument("--input-shape", type=_positive_ints, metavar="C,H,W",
                   help="input shape of one example for --model without batches() (default 3,32,32)")
    g.add_argument("--blocks", default=d.blocks, help="block selector: 'auto', a glob/regex on module names, "
                                                      "or a class name such as BatchNorm2d")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=d.steps, help=f"SGD steps per run (default {d.steps})")
    g.add_argument("--init-only", action="store_true",
                   help="measure at initialisation only (no training; the same as --steps 0): the CI guard")
    g.add_argument("--batch-size", type=_positive, default=d.batch_size, help=f"default {d.batch_size}")
    g.add_argument("--lr", type=float, default=d.lr, help=f"SGD learning rate (default {d.lr:g}; momentum "
                                                          f"{s.momentum:g}, weight decay {s.weight_decay:g})")
    g.add_argument("--every", type=_positive, default=d.every, help=f"record one step in N (default {d.every})")
    g.add_argument("--init-batches", type=_positive, default=d.init_batches,
                   help=f"batches averaged at initialisation (default {d.init_batches})")
    g.add_argument("--seeds", type=_ints, default=list(d.seeds), metavar="S,S",
                   help=f"seeds (default {','.join(map(str, d.seeds))}): claims pool them as mean ± sd")
    g.add_argument("--train", choices=("bn", "all"), default=d.train,
                   help="which runs train: 'bn' (default: nets without BN are measured at initialisation only, "
                        "where their contrast is) or 'all'")
    g.add_argument("--data", default=d.data, help="'synthetic' (built in) or a local CIFAR-10 folder "
                                                  "(cifar-10-batches-py)")
    g.add_argument("--train-size", type=_positive, default=d.train_size, help="synthetic training examples")
    g.add_argument("--image-size", type=_positive, default=d.image_size,
                   help=f"synthetic image size in pixels (default {d.image_size})")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="processes for the runs, one torch thread each (default 0: one per core)")
    g.add_argument("--device", default=d.device, help="cpu, cuda or auto (default)")
    g = p.add_argument_group("where the runs execute")
    g.add_argument("--executor", choices=("local", "ray"), default=d.executor,
                   help="local worker processes (default) or a Ray cluster, each run a task (pip install "
                        "'torch-gradscope[ray]')")
    g.add_argument("--address", help="the Ray cluster to join ('auto', 'ray://host:10001'; default: a local one)")
    g.add_argument("--resume", action="store_true",
                   help="reuse the runs that already finished in --out instead of running them again")
    g = p.add_argument_group("He et al.'s CIFAR-10 recipe (docs/recipe.md)")
    g.add_argument("--recipe", help="he2016 (64k iterations) or he2016-short (4k); needs --data DIR")
    g.add_argument("--iterations", type=_positive, help="run the recipe over N iterations, milestones scaled alike")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast of the training forward (CUDA or CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="images and weights channels-last (default: on for the built-in nets of a study, about 10%% "
                        "less CPU time; off for --recipe and --model)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="report folder (default ./gradscope-report/<timestamp>)")
    g.add_argument("--format", choices=("full", "records"), default=d.format,
                   help="full report (figures, HTML) or records and verdicts only")
    g.add_argument("--quiet", action="store_true", help="no progress (else a bar on a terminal, lines on stderr "
                                                        "when piped)")
    g.add_argument("--json", action="store_true", help="print a JSON summary on stdout (implies --quiet)")
    g.add_argument("--fail-on", type=_csv, default=[], metavar="KINDS",
                   help="exit 3 when one of these is met: " + "; ".join(f"{k}: {h}" for k, (h, _) in
                                                                        FAIL_ON.items()))


@subcommand("profile", "measure models at initialisation and over a short training run", _profile_arguments)
def _profile(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from gradscope.pipeline import Options, outcome, profile, rank

    options = {f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)}
    if args.resume and not args.out:  # the default folder is new each time: there would be nothing to resume
        raise GradscopeError("--resume needs --out: the folder of the study to resume")
    out = Path(args.out) if args.out else Path("gradscope-report") / time.strftime("%Y%m%d-%H%M%S")
    results = profile(**{**options, "out": out, "progress": not (args.quiet or args.json)})
    result = outcome(results, args.fail_on, STOP.signal, where=str(out))
    if rank() != 0:  # every rank holds the global results; rank 0 alone prints
        return result.status
    if args.json:
        print(json.dumps({"report": str(out), **results.summary()}, default=str))
    else:
        from gradscope.render.terminal import console, print_results

        shown = console()
        print_results(results, shown)
        # --format records writes no report.html: name the folder it did write
        shown.print(f"report: {out / 'report.html'}" if args.format == "full" else f"records and tables: {out}",
                    soft_wrap=True)  # a path is copied whole, never wrapped
        shown.file.flush()
    for line in result.lines:
        print(f"gradscope: {line}", file=sys.stderr)
    return result.status


@subcommand("report", "re-render the report of a saved run folder",
            lambda p: (p.add_argument("folder", help="a folder written by 'gradscope profile' or attach(out=...)"),
                       p.add_argument("--out", help="where to write the report (default: the folder itself)")))
def _report(args: argparse.Namespace) -> int:
    from gradscope.pipeline import with_run_facts
    from gradscope.pipeline.rebuild import attach_rebuild, profile_rebuild
    from gradscope.render.report import write_report
    from gradscope.store import load

    folder = Path(args.folder)
    if not folder.is_dir():
        raise GradscopeError(f"no run folder at {str(folder)!r}; pass a folder written by gradscope profile")
    # records.parquet, parts, or the records/<run>/<phase>/ parts of a killed profile (a "phase" column, which the
    # report splits into its initialisation and training parts)
    frame = with_run_facts(load(folder), folder)  # a killed profile's parts: the runs' facts from provenance.json
    if frame.empty:
        raise GradscopeError(f"nothing was recorded in {str(folder)!r}; no report to write")
    out = Path(args.out or folder)
    try:
        # a profile's folder: the profile's runs, and plainly what the records alone cannot rebuild
        frame, about = profile_rebuild(frame, folder, out)
        found = attach_rebuild(frame, folder)
        about = {**about, **found, "notes": list(about.get("notes", ())) + list(found.get("notes", ()))}
        path = write_report(frame, out, **about)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError.for_report(out, exc) from exc
    print(f"report written to {path}")
    return EXIT_OK


@subcommand("models", "list the built-in networks")
def _models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from gradscope.models import available, build, facts
    from gradscope.render.terminal import console

    table = Table(title="gradscope models (build(name, **options))")
    for column in ("name", "family", "blocks", "parameters"):
        table.add_column(column)
    for name in available():
        if name == facts(name)["family"] and name != "mlp":  # a family of any depth 6n+2
            table.add_row(name, "cifar", "3n", "any depth 6n+2 (3n blocks of two layers): build(name, depth=...)")
            continue
        model = build(name, seed=0)
        config, count = getattr(model, "gradscope_config", {}), sum(p.numel() for p in model.parameters())
        table.add_row(name, str(config.get("family", "")), str(config.get("num_blocks", "")), f"{count / 1e6:.2f}M")
    shown = console()
    shown.print(table)
    shown.file.flush()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The parser of every registered subcommand."""
    parser = _Parser(prog="gradscope", description=(
        "See how forward signals and backward gradients travel through every block of a network."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, arguments, _) in COMMANDS.items():
        arguments(sub.add_parser(name, help=help, description=help))
    commands.add_parsers(sub)  # compare, sweep (gradscope/commands.py)
    parser.command_parsers = sub.choices  # main() names the subcommand's help in an unknown option's error
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would report it as the top level's: point at the subcommand's own --help
            where = getattr(parser, "command_parsers", {}).get(args.command, parser)
            where.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse already printed one line (or --help)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    with _one_line_warnings():
        return _dispatch(COMMANDS[args.command][2] if args.command in COMMANDS else commands.run, args)


def _dispatch(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command; map what it raises onto one line on stderr and an exit status."""
    try:
        return run(args)
    except GradscopeError as exc:
        print(f"gradscope: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradscope: interrupted", file=sys.stderr)
        return EXIT_TERMINATED if STOP.signal == signal.SIGTERM else EXIT_INTERRUPTED
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
    if code == EXIT_TERMINATED and STOP.signal == signal.SIGTERM:
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
