"""The notebooks in ``notebooks/``: committed with the outputs of their current code, and runnable from scratch.

The rule (see notebooks/README.md): every committed notebook carries the outputs of a clean run of its current
code cells, made by ``python notebooks/execute.py``, which stores a hash of the code cells' sources in the
notebook's metadata. Here we check that

* the stored hash equals the hash of the committed code cells (code edited without re-executing fails), and every
  code cell has been executed and holds no error output;
* each notebook runs top to bottom in a fresh ``python3`` kernel on CPU without an error, with ``notebooks/`` as
  its working directory, and leaves no file behind in the repository (outputs go to temporary folders);
* markdown cells claim no measured numbers (numbers come from the cells' printed output), and the notebooks
  stay small on disk.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_degradation", "03_batchnorm_claim", "04_your_model"]
#: Total size of the committed notebooks (outputs and figures included).
MAX_TOTAL_BYTES = 2 * 1024 * 1024
#: A decimal number, a percentage or an "xN" factor in prose: numbers belong in the cells' printed output.
NUMBER_CLAIM = re.compile(r"(?<!§)\b\d+\.\d+|\d+\s*%|\bx\d|\d+x\b|\d+\s*times\b")


def _load_execute():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _load_execute()


def _read(path: Path):
    return nbformat.read(str(path), as_version=4)


def test_the_series_is_there():
    assert [p.stem for p in PATHS] == EXPECTED
    assert (NOTEBOOKS / "README.md").is_file()


def test_source_hash_depends_on_code_cells_only():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# title"),
                                         nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("print(x)")])
    h = execute.source_hash(nb)
    nb.cells[0].source = "# another title"
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="noise")]
    assert execute.source_hash(nb) == h
    nb.cells[2].source = "print(x + 1)"
    assert execute.source_hash(nb) != h
    nb.cells[1].source, nb.cells[2].source = "print(x)", "x = 1"  # same sources, other order
    assert execute.source_hash(nb) != h


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_committed_outputs_come_from_the_committed_code(path):
    nb = _read(path)
    stored = execute.stored_hash(nb)
    fix = f"run `python notebooks/execute.py {path.stem}` and commit the notebook with its outputs"
    assert stored is not None, f"{path.name} was never executed by notebooks/execute.py; {fix}"
    assert stored == execute.source_hash(nb), (
        f"{path.name}: its code cells differ from the code that produced its outputs (hash {stored[:12]} stored, "
        f"{execute.source_hash(nb)[:12]} now); {fix}")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"{path.name} cell {i} was not executed; {fix}"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name} cell {i} holds an error output: {errors[0].get('ename')}; {fix}"
    assert nb.metadata.get("kernelspec", {}).get("name") == execute.KERNEL


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_markdown_claims_no_numbers(path):
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type == "markdown":
            found = NUMBER_CLAIM.findall(cell.source)
            assert not found, (f"{path.name} markdown cell {i} states numbers {found}: print them from a code cell "
                               f"(computed from the frame) instead, so that prose cannot go stale")


def test_notebooks_are_small():
    total = sum(p.stat().st_size for p in PATHS)
    assert total < MAX_TOTAL_BYTES, f"notebooks take {total / 1e6:.2f} MB; keep figures few and at dpi ~80"


def _repo_files() -> set:
    """Files under notebooks/ that git does not ignore (tracked or not): what a notebook must not add to."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "notebooks"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout: fall back to a plain listing
        return {str(p.relative_to(ROOT)) for p in NOTEBOOKS.rglob("*") if p.is_file()}
    return set(out.stdout.split())


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_executes_from_scratch(path):
    nb = _read(path)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    before = _repo_files()
    start = time.perf_counter()
    execute.run_notebook(nb, cwd=NOTEBOOKS)  # raises CellExecutionError, with the cell and traceback, on any error
    seconds = time.perf_counter() - start
    new = sorted(_repo_files() - before)
    assert not new, f"{path.name} wrote {new} into the repository; write to tempfile.mkdtemp() instead"
    print(f"{path.name}: executed in {seconds:.1f} s")
