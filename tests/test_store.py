"""gradscope.store: recovery from any folder that holds records, atomic writes, and files others send."""
from __future__ import annotations

import configparser
import re
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import gradscope
from gradscope import store
from gradscope.cli import EXIT_USAGE, main
from gradscope.errors import DataError
from tests import nets

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _record(out: Path, steps: int = 4, flush_every: int = 2) -> pd.DataFrame:
    model = nets.mlp(width=8, depth=2)
    with gradscope.attach(model, out=out, flush_every=flush_every) as scope:
        for _ in range(steps):
            model(torch.randn(4, 12)).sum().backward()
            scope.step()
    return scope.frame()


def _killed_profile_folder(root: Path) -> dict:
    """The layout a SIGKILL leaves: records/<run>/<phase>/part-*, a 4-byte records.parquet, no report."""
    frames = {}
    for run in ("a", "b"):
        for phase, steps in (("init", 2), ("train", 4)):
            frames[run, phase] = _record(root / "records" / run / phase, steps)
    (root / store.PARQUET).write_bytes(b"PAR1")
    return frames


def test_load_recovers_a_killed_profile_folder_and_skips_a_truncated_file(tmp_path):
    frames = _killed_profile_folder(tmp_path)
    with pytest.warns(RuntimeWarning, match=re.escape(f"skipped {str(tmp_path / store.PARQUET)!r}: truncated")):
        frame = gradscope.load(tmp_path)
    assert list(frame.columns[:7]) == list(gradscope.schema.COLUMNS)
    for (run, phase), expected in frames.items():
        got = frame[(frame.run == run) & (frame.phase == phase)].drop(columns=["run", "phase"])
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expected)


def test_report_rebuilds_a_killed_profile_folder(tmp_path, capsys):
    frames = _killed_profile_folder(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "Traceback" not in err
    assert (tmp_path / "report.html").exists()
    back = store.read_records(tmp_path / store.PARQUET)  # replaced the truncated one, atomically
    assert len(back) == len(frames["a", "train"]) + len(frames["b", "train"])  # the training phase
    assert set(back.run) == {"a", "b"}


def test_load_reads_flat_parts_and_skips_an_empty_part(tmp_path):
    expected = _record(tmp_path, steps=4, flush_every=2)
    (tmp_path / "part-000009.parquet").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="part-000009.parquet.*truncated or not a Parquet file \\(0 bytes\\)"):
        pd.testing.assert_frame_equal(gradscope.load(tmp_path), expected)


def test_duplicated_parts_are_named_and_read_once(tmp_path):
    expected = _record(tmp_path, steps=4, flush_every=2)
    shutil.copy(tmp_path / "part-000000.parquet", tmp_path / "part-000000-copy.parquet")
    with pytest.warns(RuntimeWarning, match=r"duplicate rows .* in \['part-000000-copy.parquet', "
                                            r"'part-000000.parquet'\]"):
        pd.testing.assert_frame_equal(gradscope.load(tmp_path), expected)


def _write(path: Path, frame: pd.DataFrame, metadata: dict = None) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)


@pytest.mark.parametrize("column, values, word", [
    ("value", ["0.5", "1.0"], "column 'value' holds (large_)?string"),
    ("step", [0.0, 1.0], "column 'step' holds double"),
    ("block", [1, 2], "column 'block' holds int64"),
])
def test_a_part_of_another_schema_is_refused_naming_file_and_column(tmp_path, column, values, word, capsys):
    frame = _record(tmp_path / "run", steps=1).head(2).copy()
    frame[column] = values
    _write(tmp_path / "run" / "part-000001.parquet", frame)
    with pytest.raises(DataError, match=word) as caught:
        gradscope.load(tmp_path / "run")
    assert "part-000001.parquet" in str(caught.value)
    assert main(["report", str(tmp_path / "run")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(word, err[0])


def test_a_foreign_table_is_refused_naming_the_missing_column(tmp_path):
    _write(tmp_path / "part-000000.parquet", pd.DataFrame({"x": [1.0]}))
    with pytest.raises(DataError, match="no column 'step'"):
        gradscope.load(tmp_path)


def test_garbage_pandas_metadata_is_refused_not_run(tmp_path, capsys):
    """pandas would json-load and act on b'pandas' metadata; gradscope reads with pyarrow and refuses garbage."""
    frame = _record(tmp_path / "run", steps=1)
    for name in ("part-000000.parquet",):
        _write(tmp_path / "run" / name, frame, {b"pandas": b"{'columns': __import__('os').system('touch x')"})
    with pytest.raises(DataError, match="'pandas' metadata is not valid JSON"):
        gradscope.load(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == EXIT_USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_report_records_ignore_the_files_pandas_metadata(tmp_path):
    frame = _record(tmp_path / "run", steps=1)
    store.write_records(frame, tmp_path)
    table = pq.read_table(tmp_path / store.PARQUET)
    meta = dict(table.schema.metadata)
    meta[b"pandas"] = b'{"index_columns": ["no_such_column"], "columns": []}'  # valid JSON, wrong: pandas fails
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / store.PARQUET)
    pd.testing.assert_frame_equal(store.read_records(tmp_path / store.PARQUET), frame)


def _floor(requirement: str) -> tuple:
    return tuple(int(p) for p in re.fullmatch(r"pyarrow>=([\d.]+)", requirement.replace(" ", "")).group(1).split("."))


def test_declared_pyarrow_floor_excludes_cve_2023_47248_and_installed_pyarrow_meets_it():
    floors = []
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    if config.has_option("options", "install_requires"):  # wherever the metadata lives, every floor counts
        floors += [_floor(line.strip()) for line in config["options"]["install_requires"].splitlines()
                   if line.strip().startswith("pyarrow")]
    pyproject = ROOT / "pyproject.toml"
    if pyproject.exists():
        floors += [_floor(r) for r in re.findall(r'"(pyarrow\s*>=\s*[\d.]+)', pyproject.read_text())]
    assert floors and all(f >= (14, 0, 1) for f in floors), floors
    installed = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)\.(\d+)", pa.__version__).groups())
    assert installed >= max(floors)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_files_written_atomically_get_the_mode_open_would_give(tmp_path):
    """A report file is readable by others as any file the user writes (umask 022: 0644), not 0600 as mkstemp's
    temporary file was."""
    import os
    import stat

    from gradscope.store import atomic_text

    old = os.umask(0o022)
    try:
        atomic_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        atomic_text(tmp_path / "b.txt", "y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600
