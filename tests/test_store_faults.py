"""Files in the wild: a report written into a folder that a run still streams into, the out= folder moved or
deleted mid-run, crafted Parquet files that promise huge allocations, a malformed alerts.csv."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import gradscope
from gradscope import store
from gradscope.cli import EXIT_USAGE, main
from gradscope.errors import DataError, GradscopeError
from tests import nets

KEY = ["step", "block", "call", "metric"]


def _step(model, scope) -> None:
    model(torch.randn(4, 12)).sum().backward()
    scope.step()
    model.zero_grad()


# --- 1. live report folders ---------------------------------------------------------------------------------------

def test_a_report_of_a_run_still_streaming_never_shadows_its_later_rows(tmp_path, capsys):
    """stream 10 steps, `gradscope report` the live folder, stream 10 more: load() returns all 20 steps."""
    torch.manual_seed(0)
    model = nets.mlp(width=8, depth=2)
    with gradscope.attach(model, out=tmp_path, flush_every=2) as scope:
        for _ in range(10):
            _step(model, scope)
        assert main(["report", str(tmp_path)]) == 0  # writes records.parquet beside the parts
        assert (tmp_path / store.PARQUET).exists()
        for _ in range(10):
            _step(model, scope)
    loaded = gradscope.load(tmp_path)
    assert sorted(loaded.step.unique()) == list(range(20))
    pd.testing.assert_frame_equal(loaded, scope.frame())


def test_a_report_written_into_the_out_folder_by_the_api_mid_run_does_not_shadow_it(tmp_path):
    model = nets.mlp(width=8, depth=2)
    with gradscope.attach(model, out=tmp_path, flush_every=3) as scope:
        for _ in range(5):
            _step(model, scope)
        gradscope.report(scope.frame(), tmp_path)
        for _ in range(7):
            _step(model, scope)
    assert len(gradscope.load(tmp_path)) == len(scope.frame())


def test_attach_into_an_old_report_folder_reads_the_new_run(tmp_path):
    old = nets.mlp(width=8, depth=2)
    with gradscope.attach(old) as first:
        for _ in range(3):
            _step(old, first)
    gradscope.report(first.frame(), tmp_path)
    model = nets.mlp(width=8, depth=3)
    with gradscope.attach(model, out=tmp_path, flush_every=2) as scope:
        for _ in range(6):
            _step(model, scope)
    pd.testing.assert_frame_equal(gradscope.load(tmp_path), scope.frame())


def _profile_folder(out, steps: int) -> None:
    from tests.test_cli import FIXTURE
    assert main(["profile", "--model", f"{FIXTURE}:tiny", "--input-shape", "3,8,8", "--steps", str(steps),
                 "--every", "1", "--train-size", "64", "--batch-size", "16", "--init-batches", "1", "--quiet",
                 "--format", "records", "--out", str(out)]) == 0


def test_a_profile_folder_reads_its_parts_when_its_report_is_older_than_them(tmp_path):
    """A report written while a profile streamed: later parts (here: a longer run's) win over records.parquet."""
    _profile_folder(tmp_path / "short", 2)
    _profile_folder(tmp_path / "long", 5)
    finished = gradscope.load(tmp_path / "long")  # its own report covers every training part; the parts also
    # hold the initialisation phase, which records.parquet does not: all phases are read, labelled
    assert set(finished.phase) == {"init", "train"}
    assert sorted(finished[finished.phase == "train"].step.unique()) == list(range(5))
    shutil.copy(tmp_path / "short" / store.PARQUET, tmp_path / "long" / store.PARQUET)  # a stale report
    with pytest.warns(RuntimeWarning, match="fewer steps than the parts"):
        loaded = gradscope.load(tmp_path / "long")
    assert sorted(loaded[loaded.phase == "train"].step.unique()) == list(range(5))


# --- 2. the out= folder moved or deleted mid-run --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_out_folder_gone_mid_run_is_recreated_and_the_frame_still_reads(tmp_path, how):
    out = tmp_path / "run"
    model = nets.mlp(width=8, depth=2)
    scope = gradscope.attach(model, out=out, flush_every=2)
    for _ in range(4):
        _step(model, scope)
    before = scope.frame()
    if how == "deleted":
        shutil.rmtree(out)
    else:
        shutil.move(str(out), str(tmp_path / "elsewhere"))
    with pytest.warns(RuntimeWarning, match=f"out= folder {str(out)!r} was moved or deleted during the run: "
                                            f"recreated it; the .* rows of its parts part-000000"):
        for _ in range(6):
            _step(model, scope)
    with pytest.warns(RuntimeWarning, match="no longer on disk"):
        frame = scope.frame()  # no exception: the rows it can still read
    scope.detach()
    assert sorted(frame.step.unique()) == list(range(4, 10))
    assert sorted(gradscope.load(out).step.unique()) == list(range(4, 10))
    if how == "moved":  # the earlier rows are where the folder went: together, every row once
        both = pd.concat([gradscope.load(tmp_path / "elsewhere"), gradscope.load(out)], ignore_index=True)
        assert sorted(both.step.unique()) == list(range(10)) and not both.duplicated(KEY).any()
        pd.testing.assert_frame_equal(gradscope.load(tmp_path / "elsewhere"), before)


def test_alerts_still_written_when_the_folder_went(tmp_path):
    rows = [{"step": 3, "kind": "spike", "block": "a", "metric": "grad_norm", "value": 1.0, "threshold": 2.0,
             "others": ""}]
    store.write_alerts(rows, tmp_path / "gone" / "run")
    assert len(store.read_alerts(tmp_path / "gone" / "run")) == 1


# --- 3. crafted Parquet files ----------------------------------------------------------------------------------------

def _bomb(path, rows: int) -> None:
    """A file of the frame's schema whose ``rows`` constant rows compress to a few hundred KB."""
    zeros = np.zeros(rows, dtype=np.int64)
    text = lambda word: pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array([word]))
    table = pa.table({"step": zeros, "block": text("b"), "depth": zeros, "kind": text("k"),
                      "metric": text("act_var"), "value": np.zeros(rows), "call": zeros})
    pq.write_table(table, path, compression="zstd", row_group_size=rows)


def _text_bomb(path, rows: int) -> None:
    """Few rows on disk, each naming its block with the same 1 MB string (stored once, in the dictionary)."""
    zeros = np.zeros(rows, dtype=np.int64)
    name = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["x" * 2**20]))
    table = pa.table({"step": zeros, "block": name, "depth": zeros, "kind": ["k"] * rows,
                      "metric": ["act_var"] * rows, "value": np.zeros(rows), "call": zeros})
    pq.write_table(table, path, compression="zstd")


def test_a_crafted_part_promising_millions_of_rows_is_refused_before_reading(tmp_path, capsys):
    _bomb(tmp_path / "part-000000.parquet", 20_000_000)
    size = (tmp_path / "part-000000.parquet").stat().st_size
    assert 50_000 < size < 1_000_000
    with pytest.raises(DataError, match="metadata promises 20000000 rows"):
        gradscope.load(tmp_path)
    assert main(["report", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing" in err[0] and "not a gradscope records file" in err[0]


def test_a_crafted_text_column_is_refused_before_it_is_decoded(tmp_path, capsys):
    _text_bomb(tmp_path / "part-000000.parquet", 2000)  # 2000 x 1 MB = 2 GB if decoded
    with pytest.raises(DataError, match="column 'block' decodes to 2000 MiB"):
        gradscope.load(tmp_path)
    assert main(["report", str(tmp_path)]) == EXIT_USAGE


def test_real_records_are_far_inside_the_bound(tmp_path):
    """The bound never refuses gradscope's own files: a run's parts and its report read back equal."""
    model = nets.mlp(width=8, depth=6)
    with gradscope.attach(model, out=tmp_path / "run", flush_every=50) as scope:
        for _ in range(200):
            _step(model, scope)
    for part in (tmp_path / "run").glob("part-*.parquet"):
        meta = pq.ParquetFile(part).metadata
        assert meta.num_rows * 64 < store.EXPANSION * part.stat().st_size / 10  # ten times inside
    gradscope.report(scope.frame(), tmp_path / "report")
    pd.testing.assert_frame_equal(gradscope.load(tmp_path / "run"), scope.frame())
    assert len(store.read_records(tmp_path / "report")) == len(scope.frame())


# --- 4. a malformed alerts.csv ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, word", [
    ("step,kind,block\n1,spike,a\n", "no column"),
    ("step,kind,block,metric,value,threshold,others\nten,spike,a,grad_norm,1,2,\n", "whole number"),
    ('step,kind,block,metric,value,threshold,others\n1,spike,"a,grad_norm,1,2,\n', "cannot read"),
    ("\xff\xfe\x00garbage", "cannot read"),
])
def test_a_malformed_alerts_csv_is_one_clear_error(tmp_path, text, word):
    (tmp_path / store.ALERTS_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(GradscopeError, match=word) as caught:
        store.read_alerts(tmp_path)
    assert "alerts.csv" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("damage", ["a value edited by hand", "cut in half", "its dtypes file garbled"])
def test_a_damaged_records_csv_is_one_clear_error_and_exit_2(tmp_path, capsys, damage):
    """A records.csv edited by hand or cut short gave a bare ValueError from load() and "internal error ... please
    report it" (exit 1) from `gradscope report`; cli.md lists a malformed records file under exit 2."""
    model = nets.mlp()
    with gradscope.attach(model) as scope:
        model(torch.randn(4, 12)).sum().backward()
        scope.step()
    folder = tmp_path / "rep"
    folder.mkdir()
    store.write_records(scope.frame(), folder)
    (folder / store.PARQUET).unlink()  # a CSV-only folder, as someone might share it
    csv = folder / store.CSV
    text = csv.read_text()
    if damage == "a value edited by hand":
        lines = text.splitlines()
        cells = lines[1].split(",")
        cells[list(lines[0].split(",")).index("value")] = "abc"
        csv.write_text("\n".join([lines[0], ",".join(cells)] + lines[2:]) + "\n")
    elif damage == "cut in half":
        csv.write_text(text[:len(text) // 2])
    else:
        (folder / store.DTYPES).write_text("{not json")
    with pytest.raises(DataError, match="cannot read records from .*records.csv.*cut short or edited by hand"):
        gradscope.load(folder)
    assert main(["report", str(folder)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "records.csv" in err and "internal error" not in err and "Traceback" not in err


# --- a write that fails names the file it was writing -----------------------------------------------------------
def test_a_failed_atomic_write_names_the_file_meant_and_leaves_no_temporary(tmp_path):
    """A full disk's ``OSError`` names no file (or the temporary ``.tmp-*``): ``atomic_write`` re-raises it naming
    the file it was writing, so the CLI's one-line error can say which; an error that already names another file,
    and gradscope's own errors, pass unchanged."""
    import errno
    import os

    from gradscope.errors import OutputError

    target = tmp_path / "report.html"

    def full(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as caught:
        store.atomic_write(target, full)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # neither the temporary file nor a truncated target

    def elsewhere(tmp):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/some/input.csv")

    with pytest.raises(FileNotFoundError) as caught:
        store.atomic_write(target, elsewhere)
    assert caught.value.filename == "/some/input.csv"
    ours = OutputError("cannot write")
    with pytest.raises(OutputError) as caught:
        store.atomic_write(target, lambda tmp: (_ for _ in ()).throw(ours))
    assert caught.value is ours
