"""The ``gradscope compare`` and ``gradscope sweep`` subcommands: argument parsing and printing around
:func:`gradscope.compare` and :func:`gradscope.sweep` (the CLI adds them with :func:`add_parsers` and runs them with
:func:`run`; errors are GradscopeErrors, which the CLI turns into exit status 2).

Exit status: 0, or 3 when ``--fail-on differs`` (compare) / ``--fail-on grows`` (sweep) finds what it names.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, List

from gradscope.errors import GradscopeError, ModelError

COMMANDS = ("compare", "sweep")
EXIT_OK, EXIT_FOUND = 0, 3
_OPTIMIZERS = ("adam", "adamw", "sgd")


def _ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers such as 64,128,256")
    return values


def add_parsers(sub: Any) -> None:
    """Add ``compare`` and ``sweep`` to the CLI's subparsers."""
    c = sub.add_parser("compare", help="compare two configurations block by block against seed noise",
                       description=("A and B: records folders (attach(out=) folders, report folders, gradscope "
                                    "profile folders) or records files; several comma-separated folders make the "
                                    "seeds of one side. Every run in a side counts as a seed."))
    c.add_argument("a", metavar="A", help="side A: a folder or file, or comma-separated folders (one per seed)")
    c.add_argument("b", metavar="B", help="side B: the same kinds")
    c.add_argument("--metrics", default="act_var,grad_norm", help="comma-separated metrics, or 'all' "
                                                                 "(default act_var,grad_norm)")
    c.add_argument("--steps", default=None, help="steps compared: 'first', 'last' or N,N (default: all common)")
    c.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate (default 0.05)")
    c.add_argument("--correction", choices=("holm", "bonferroni"), default="holm")
    c.add_argument("--labels", default="A,B", help="names of the two sides (default A,B)")
    c.add_argument("--out", default=None, help="write compare.html, compare.png and the CSVs into this folder")
    c.add_argument("--fail-on", choices=("differs",), default=None, help="exit 3 when a block differs")
    c.add_argument("--json", action="store_true", help="print the per-block verdicts as JSON")

    s = sub.add_parser("sweep", help="width/depth coordinate check: fitted exponents of each block's signals",
                       description=("Train FILE.py:factory(width=W[, depth=D]) for a few steps at each size with "
                                    "one optimizer and fit how each block's activation change, activation RMS, "
                                    "gradient RMS and update ratio scale with width (and depth)."))
    s.add_argument("--model", required=True, metavar="FILE.py:FACTORY", help="a callable taking width= (and depth=)")
    s.add_argument("--widths", type=_ints, required=True, metavar="W,W,W", help="three or more widths")
    s.add_argument("--depths", type=_ints, default=None, metavar="D,D", help="depths to sweep as well")
    s.add_argument("--optimizer", default="adam", metavar="NAME|FILE.py:FN",
                   help="adam, adamw, sgd, or a callable model -> optimizer (default adam)")
    s.add_argument("--lr", type=float, default=1e-3, help="learning rate of a named optimizer (default 1e-3)")
    s.add_argument("--steps", type=int, default=5, help="training steps per size (default 5)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--blocks", default="auto", help="block selector (default auto)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tolerance", type=float, default=0.2, help="exponents within +-this are stable (default 0.2)")
    s.add_argument("--out", default=None, help="write sweep.png and the CSVs into this folder")
    s.add_argument("--fail-on", choices=("grows",), default=None,
                   help="exit 3 when a block's activation change grows with width")
    s.add_argument("--json", action="store_true", help="print the fits as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``compare`` or ``sweep``; returns the exit status."""
    return _compare(args) if args.command == "compare" else _sweep(args)


def _side(text: str) -> Any:
    parts = [p for p in text.split(",") if p]
    items: List[Any] = []
    for part in parts:
        path = Path(part)
        if path.is_file():
            from gradscope.store import read_records

            items.append(read_records(path))
        else:
            items.append(path)
    return items if len(items) > 1 else items[0]


def _compare(args: argparse.Namespace) -> int:
    from gradscope.analysis.compare import compare

    labels = tuple(args.labels.split(","))
    if len(labels) != 2:
        raise GradscopeError(f"--labels {args.labels!r}: give two names, e.g. kaiming,xavier")
    steps: Any = args.steps
    if steps not in (None, "first", "last"):
        steps = _ints(steps) if steps.replace(",", "").isdigit() else steps
        if isinstance(steps, str):
            raise GradscopeError(f"--steps {args.steps!r}: use first, last or N,N")
    metrics = "all" if args.metrics == "all" else [m for m in args.metrics.split(",") if m]
    result = compare(_side(args.a), _side(args.b), metrics=metrics, steps=steps, alpha=args.alpha,
                     correction=args.correction, labels=labels)
    if args.json:
        print(strict_json({"differs": result.differs, "summary": result.summary(),
                           "blocks": result.blocks.to_dict("records"), "not_compared": result.one_sided}))
    else:
        print(result.summary())
        print(result.blocks.to_string(index=False))
    if args.out:
        from gradscope.render.compare import write_compare

        page = write_compare(result, args.out)
        if not args.json:
            print(f"wrote {page}")
    return EXIT_FOUND if args.fail_on == "differs" and result.differs else EXIT_OK


def _callable(spec: str, what: str) -> Callable[..., Any]:
    from gradscope.study.task import _import

    if ":" not in spec:
        raise ModelError(f"{what} {spec!r} needs the form path/to/file.py:name or package.module:name")
    where, name = spec.rsplit(":", 1)
    found = getattr(_import(where, spec), name, None)
    if not callable(found):
        raise ModelError(f"{what} {spec!r}: {where} has no callable {name!r}")
    return found


def _optimizer(args: argparse.Namespace) -> Callable[[Any], Any]:
    import torch

    name = args.optimizer.lower()
    if name in _OPTIMIZERS:
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
        return lambda model: cls(model.parameters(), lr=args.lr)
    if ":" in args.optimizer:
        return _callable(args.optimizer, "--optimizer")
    raise GradscopeError(f"--optimizer {args.optimizer!r}: use one of {list(_OPTIMIZERS)} or FILE.py:function")


def _sweep(args: argparse.Namespace) -> int:
    from gradscope.study.sweep import ACT_CHANGE, sweep

    factory = _callable(args.model, "--model")
    result = sweep(factory, args.widths, args.depths, optimizer=_optimizer(args), steps=args.steps,
                   batch_size=args.batch_size, blocks=args.blocks, seed=args.seed, tolerance=args.tolerance)
    fits = result.fits
    if args.json:
        print(strict_json({"summary": result.summary(), "fits": fits.to_dict("records")}))
    else:
        print(result.summary())
        cols = ["against", "block", "quantity", "exponent", "se", "verdict"]
        print(fits[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        from gradscope.render.sweep import write_sweep

        png = write_sweep(result, args.out)
        if not args.json:
            print(f"wrote {png}")
    grows = fits[(fits["quantity"] == ACT_CHANGE) & fits["verdict"].str.startswith("grows")]
    if args.fail_on == "grows" and len(grows):
        for row in grows.to_dict("records"):  # as `profile --fail-on` names what it found, on stderr
            print(f"gradscope: --fail-on grows: block {row['block']!r}: {ACT_CHANGE} {row['verdict']} against "
                  f"{row['against']} (exponent {row['exponent']:+.2f} ± {row['se']:.2f})", file=sys.stderr)
        return EXIT_FOUND
    return EXIT_OK


def strict_json(value: Any) -> str:
    """``value`` as strict JSON: NaN and infinities become null (a bare ``NaN`` token is not JSON, and strict
    parsers such as ``jq`` or JavaScript's ``JSON.parse`` reject it); other non-JSON objects their ``str``."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if hasattr(v, "item") and callable(v.item) and not isinstance(v, (str, bytes)):  # numpy scalars
            try:
                return clean(v.item())
            except (TypeError, ValueError):
                return str(v)
        return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)

    return json.dumps(clean(value), allow_nan=False)

