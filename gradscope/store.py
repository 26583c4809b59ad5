"""The only place where frames meet the disk: record parts streamed while training, record files of a report,
loading them back, and atomic writes.

Every file a reader may open is written to a temporary name in the same folder and then moved into place with
``os.replace``, so a process killed mid-write leaves either the old file or the new one, never a truncated file.
This module needs pandas and pyarrow, never torch: the engine hands it plain Python lists of column values.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope.errors import DataError, GradscopeError, OutputError

#: Record parts that ``attach(..., out=DIR)`` streams to ``DIR``, in write order.
PART_GLOB = "part-*.parquet"
#: ``DIR/meta.json``: the block list of the run, written when the scope is attached.
META_FILE = "meta.json"
#: The record files of a report folder.
PARQUET, CSV, DTYPES = "records.parquet", "records.csv", "records.dtypes.json"
_DTYPES = ("int64", "str", "int64", "str", "str", "float64", "int64")  # of schema.COLUMNS
_META_KEY = b"gradscope_dtypes"

#: Dtypes assumed for a CSV without its dtypes file (frame columns by the schema; anything else is inferred).
DEFAULT_DTYPES = {S.STEP: "int64", S.DEPTH: "int64", S.CALL: "int64", S.SEED: "int64", S.VALUE: "float64",
                  S.BLOCK: "str", S.KIND: "str", S.METRIC: "str", S.RUN: "str", S.MODEL: "str",
                  S.SHORTCUT: "str", S.INIT: "str"}


# --- record parts (streamed while training) ---------------------------------------------------------------

def frame_from_columns(step: Sequence[int], block: Sequence[str], depth: Sequence[int], kind: Sequence[str],
                       metric: Sequence[str], value: Sequence[float], call: Sequence[int]) -> pd.DataFrame:
    """A tidy frame (columns of :data:`gradscope.schema.COLUMNS`, schema dtypes) from parallel lists, sorted."""
    frame = pd.DataFrame({
        S.STEP: pd.array(step, dtype="int64"),
        S.BLOCK: pd.array(block, dtype=object).astype(str),
        S.DEPTH: pd.array(depth, dtype="int64"),
        S.KIND: pd.array(kind, dtype=object).astype(str),
        S.METRIC: pd.array(metric, dtype=object).astype(str),
        S.VALUE: pd.array(value, dtype="float64"),
        S.CALL: pd.array(call, dtype="int64"),
    })
    return sort_frame(frame)


def write_part(frame: pd.DataFrame, out: Path, index: int) -> Path:
    """Write ``frame`` as ``out/part-NNNNNN.parquet`` (atomically) and return the path."""
    path = out / f"part-{index:06d}.parquet"
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path


def sort_frame(frame):
    """Rows in (step, depth, call, metric order of :data:`gradscope.schema.ALL_METRICS`) order, index reset."""
    order = {m: i for i, m in enumerate(S.ALL_METRICS)}
    key = frame[S.METRIC].map(lambda m: order.get(m, len(order))).astype("int64")
    return (frame.assign(_k=key).sort_values([S.STEP, S.DEPTH, S.CALL, "_k"], kind="stable")
            .drop(columns="_k").reset_index(drop=True))


def prepare_out(out: Path, blocks: Sequence[Mapping[str, str]]) -> None:
    """Create ``out`` and check that it is writable; write the block list to ``meta.json``."""
    if out.is_dir() and any(out.glob(PART_GLOB)):
        raise OutputError(f"out={str(out)!r} already holds the records of another run (part-*.parquet); "
                          f"pass a new folder, or delete that one, so that load() returns this run alone")
    try:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": "gradscope-records", "version": 1,
                "blocks": [dict(b) for b in blocks]}
        atomic_write(out / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    except OSError as exc:
        raise OutputError(f"cannot write records to out={str(out)!r}: {exc.strerror or exc}; "
                          f"pass a folder you can write to") from exc


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then move it over ``path`` in one step."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Union[str, os.PathLike]):
    """Read the records that ``attach(..., out=DIR)`` streamed to ``DIR`` back into one DataFrame.

    Parts are read in order; the result equals ``scope.frame()`` of the run that wrote them (up to its last flush).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise GradscopeError(f"no gradscope records at {str(folder)!r}: not a folder; pass the out= folder of a run")
    parts = sorted(folder.glob(PART_GLOB))
    if not parts:
        if (folder / META_FILE).exists():  # attached, but nothing recorded yet
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(S.COLUMNS, _DTYPES)})
        raise GradscopeError(f"no gradscope records in {str(folder)!r}: expected {PART_GLOB} files "
                             f"written by attach(..., out=...)")
    try:
        frames = [pd.read_parquet(p) for p in parts]
    except Exception as exc:  # a part damaged outside gradscope (parts are written atomically)
        raise GradscopeError(f"cannot read gradscope records in {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
    frame = pd.concat(frames, ignore_index=True)
    return sort_frame(frame)



# --- report record files --------------------------------------------------------------------------------------------------

def dtype_spec(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """``{column: {"dtype": str, ["categories", "ordered"]}}``, enough to restore the frame's dtypes."""
    spec: dict[str, dict[str, Any]] = {}
    for col, dt in frame.dtypes.items():
        entry: dict[str, Any] = {"dtype": str(dt)}
        if isinstance(dt, pd.CategoricalDtype):
            entry["categories"] = [c.item() if hasattr(c, "item") else c for c in dt.categories]
            entry["ordered"] = bool(dt.ordered)
        spec[str(col)] = entry
    return spec


def _restore(col: pd.Series, entry: Mapping[str, Any], from_text: bool) -> pd.Series:
    """One column converted back to the dtype in ``entry`` (from CSV text or from parquet's own types)."""
    dt = entry["dtype"]
    if dt == "category":
        cats = entry["categories"]
        lookup = {str(c): c for c in cats} if from_text else None
        vals = col.map(lambda v: lookup.get(v, v)) if lookup is not None else col.astype(object)
        return pd.Series(pd.Categorical(vals, categories=cats, ordered=entry["ordered"]), name=col.name)
    if from_text and dt in ("bool", "boolean"):
        return col.map({"True": True, "False": False}).astype(dt)
    if dt == "object":
        return col.astype(object).where(col.notna(), np.nan)
    if str(col.dtype) == dt:
        return col
    return col.astype(dt)


def write_records(frame: pd.DataFrame, out: Union[str, Path]) -> dict[str, Path]:
    """Write ``records.parquet``, ``records.csv`` and ``records.dtypes.json`` into folder ``out``.

    The index is not written (a frame equals its read-back after ``reset_index(drop=True)``). In the CSV an empty
    field means missing, so an empty string in a text column reads back as missing.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    frame = frame.reset_index(drop=True)
    spec = dtype_spec(frame)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[_META_KEY] = json.dumps(spec).encode()
    atomic_write(out / PARQUET, lambda tmp: pq.write_table(table.replace_schema_metadata(meta), tmp))
    atomic_write(out / CSV, lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write(out / DTYPES, lambda tmp: Path(tmp).write_text(json.dumps(spec, indent=1) + "\n"))
    return {"parquet": out / PARQUET, "csv": out / CSV, "dtypes": out / DTYPES}


def read_records(path: Union[str, Path]) -> pd.DataFrame:
    """Read a frame written by :func:`write_records`: a ``.parquet`` or ``.csv`` file, or a report folder.

    Dtypes are restored from the parquet metadata or from ``<name>.dtypes.json`` beside the CSV (schema dtypes
    when that file is absent), so the result equals the frame that was written, dtypes included.
    """
    import pyarrow.parquet as pq

    p = Path(path)
    if p.is_dir():
        p = p / PARQUET if (p / PARQUET).exists() else p / CSV
    if not p.exists():
        raise DataError(f"no records at {str(path)!r}; pass a report folder, a records.parquet or a records.csv.")
    if p.suffix == ".parquet":
        table = pq.read_table(p)
        raw = (table.schema.metadata or {}).get(_META_KEY)
        df = table.to_pandas()
        spec = json.loads(raw) if raw else {}
        return pd.DataFrame({c: _restore(df[c], spec[c], False) if c in spec else df[c] for c in df.columns})
    if p.suffix != ".csv":
        raise DataError(f"cannot read records from {str(p)!r}: expected a .parquet or .csv file.")
    side = p.with_name(p.stem + ".dtypes.json")
    if side.exists():
        spec = json.loads(side.read_text())
        df = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
        cols = {c: _restore(df[c], spec[c], True) if c in spec else df[c] for c in df.columns}
    else:  # no dtypes file: schema dtypes for the frame's columns, pandas' inference for the rest
        known = [c for c in pd.read_csv(p, nrows=0).columns if c in DEFAULT_DTYPES]
        df = pd.read_csv(p, dtype={c: str for c in known}, keep_default_na=False,
                         na_values={c: [""] for c in known})
        other = pd.read_csv(p, usecols=[c for c in df.columns if c not in known]) if len(known) < df.shape[1] else df
        cols = {c: _restore(df[c], {"dtype": DEFAULT_DTYPES[c]}, True) if c in known else other[c]
                for c in df.columns}
    return pd.DataFrame(cols)
