"""Execute the notebooks in a fresh kernel and store their outputs: ``python notebooks/execute.py [names...]``.

Every committed notebook carries the outputs of a clean run of the current code. This script is how they get
there: it runs each notebook top to bottom in a new ``python3`` kernel with ``notebooks/`` as the working
directory and the repository root first on ``PYTHONPATH`` (so the notebooks import the gradscope next to them),
writes the outputs back into the file, and records in ``metadata["gradscope"]["executed_source_sha256"]`` a hash
of all code cells' sources. ``tests/test_notebooks.py`` fails when a committed notebook's code differs from the
code that produced its outputs (edit a code cell, then run this script), and when a fresh run raises.

Names may be given with or without ``.ipynb`` (``01_quickstart``, ``notebooks/01_quickstart.ipynb``); with no
names every ``notebooks/*.ipynb`` is executed. Exit status: 0 when every notebook ran, 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL = "python3"
META_KEY = "gradscope"
HASH_KEY = "executed_source_sha256"
#: Seconds one cell may run before the execution fails (generous: a shared 2-core CI machine can be slow).
CELL_TIMEOUT = 600


def code_sources(nb) -> List[str]:
    """The source of every code cell, in order (a cell's source as one string)."""
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            src = cell.source
            out.append("".join(src) if isinstance(src, list) else str(src))
    return out


def source_hash(nb) -> str:
    """sha256 (hex) of all code cells' sources, in order; markdown and outputs do not enter it."""
    payload = json.dumps(code_sources(nb), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def stored_hash(nb) -> Optional[str]:
    """The hash this script recorded when it last executed ``nb`` (None if it never did)."""
    return nb.metadata.get(META_KEY, {}).get(HASH_KEY)


def kernel_env() -> dict:
    """The kernel's environment: the repository root first on PYTHONPATH and hash randomisation fixed, so that a
    run depends on the code next to the notebooks and on the seeds only; matplotlib's inline backend, as Jupyter
    would choose it, even where the calling shell exports ``MPLBACKEND=Agg`` (CI does), so figures are stored."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONHASHSEED"] = "0"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def run_notebook(nb, cwd: Path = HERE, timeout: int = CELL_TIMEOUT):
    """Execute ``nb`` in place in a fresh ``python3`` kernel with working directory ``cwd``; returns ``nb``.

    Raises ``nbclient.exceptions.CellExecutionError`` on the first cell that raises.
    """
    from nbclient import NotebookClient

    client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(cwd=str(cwd), env=kernel_env())
    return nb


def execute(path: Path) -> float:
    """Execute the notebook at ``path``, store its outputs and code hash in the file; returns seconds taken."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": KERNEL}
    start = time.perf_counter()
    run_notebook(nb, cwd=path.parent)
    seconds = time.perf_counter() - start
    nb.metadata.setdefault(META_KEY, {})[HASH_KEY] = source_hash(nb)
    nbformat.validate(nb)
    nbformat.write(nb, str(path))
    return seconds


def resolve(names: Sequence[str]) -> List[Path]:
    """Notebook paths for the command-line names (every ``notebooks/*.ipynb`` when there are none)."""
    if not names:
        return sorted(HERE.glob("*.ipynb"))
    paths = []
    for name in names:
        candidates = [Path(name), HERE / name, HERE / f"{name}.ipynb", Path(f"{name}.ipynb")]
        found = next((c for c in candidates if c.is_file() and c.suffix == ".ipynb"), None)
        if found is None:
            known = ", ".join(p.stem for p in sorted(HERE.glob("*.ipynb")))
            raise SystemExit(f"execute.py: no notebook {name!r}; notebooks here: {known}")
        paths.append(found.resolve())
    return paths


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Execute notebooks and store their outputs and code hash.")
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all in notebooks/)")
    args = parser.parse_args(None if argv is None else list(argv))
    failed = []
    for path in resolve(args.names):
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"executing {rel} ...", flush=True)
        try:
            seconds = execute(path)
        except Exception as exc:  # report every notebook, then fail
            failed.append(str(rel))
            print(f"FAILED {rel}: {type(exc).__name__}: {str(exc)[-2000:]}", file=sys.stderr, flush=True)
            continue
        print(f"  ok in {seconds:.1f} s, {path.stat().st_size / 1024:.0f} KiB", flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)} (not rewritten)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
