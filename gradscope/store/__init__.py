"""The only place where frames meet the disk: record parts streamed while training, record files of a report,
loading them back, and atomic writes.

Every file a reader may open is written to a temporary name in the same folder and then moved into place with
``os.replace``, so a process killed mid-write leaves either the old file or the new one, never a truncated file.
This module needs pandas and pyarrow, never torch: the engine hands it plain Python lists of column values.
Reading files that others may have sent (bounded, schema-checked, nothing unpickled) is :mod:`gradscope.store.parquet`.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from gradscope import schema as S
from gradscope import words
from gradscope.errors import DataError, GradscopeError, OutputError
from gradscope.store.parquet import (  # noqa: F401 - re-exported: store.read_table, store.EXPANSION, ...
    _DTYPES, _META_KEY, EXPANSION, MAX_TEXT, MIN_BUDGET, _readable, _table_frame, check_promises, check_schema,
    read_table)

#: Record parts that ``attach(..., out=DIR)`` streams to ``DIR``, in write order.
PART_GLOB = "part-*.parquet"
#: The losses given to ``scope.step(loss=...)``, streamed beside the record parts (named by their first loss).
LOSS_PART_GLOB = "losses-*.parquet"
#: ``DIR/meta.json``: the block list of the run, written when the scope is attached.
META_FILE = "meta.json"
#: The record files of a report folder.
PARQUET, CSV, DTYPES = "records.parquet", "records.csv", "records.dtypes.json"
#: a profile folder's initialisation phase, beside the main phase's records.parquet (written by render/report.py)
INIT_PARQUET = "init_records.parquet"
#: Column of a profile folder's frame that names the phase (``init``/``train``): its parts' sub-folder.
PHASE = words.PHASE

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


def write_losses_part(losses: Sequence[tuple], out: Path, first: int) -> Path:
    """Write ``(step, loss)`` pairs as ``out/losses-NNNNNNNNN.parquet``, named by the index of the first of them
    among the run's losses (atomically): writing again from the same first loss replaces that file with a
    superset, so an interrupted write never leaves a loss in two files."""
    path = out / f"losses-{first:09d}.parquet"
    frame = pd.DataFrame({S.STEP: np.array([s for s, _ in losses], dtype="int64"),
                          "loss": np.array([v for _, v in losses], dtype="float64")})
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path


def read_losses(folder: Union[str, Path]) -> pd.DataFrame:
    """The losses an ``attach(..., out=DIR)`` run gave ``scope.step(loss=...)``, read back from ``DIR``: columns
    ``step, loss`` in step order (one row per recorded step that had a loss); empty with those columns if none."""
    paths = sorted(Path(folder).glob(LOSS_PART_GLOB))
    frames = []
    for path in paths:
        try:
            frames.append(pd.read_parquet(path, columns=[S.STEP, "loss"]))
        except Exception as exc:  # pyarrow raises its own types for a damaged file
            raise DataError(f"cannot read {str(path)!r}: {_first_line(exc)}; a losses part written by gradscope "
                            f"has the columns step, loss") from None
    if not frames:
        return pd.DataFrame({S.STEP: pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64")})
    frame = pd.concat(frames, ignore_index=True).drop_duplicates(S.STEP, keep="last")
    return frame.sort_values(S.STEP, kind="stable").reset_index(drop=True).astype({S.STEP: "int64",
                                                                                    "loss": "float64"})


def sort_frame(frame):
    """Rows in (step, depth, call, metric order of :data:`gradscope.schema.ALL_METRICS`) order, index reset."""
    order = {m: i for i, m in enumerate(S.ALL_METRICS)}
    key = frame[S.METRIC].map(lambda m: order.get(m, len(order))).astype("int64")
    return (frame.assign(_k=key).sort_values([S.STEP, S.DEPTH, S.CALL, "_k"], kind="stable")
            .drop(columns="_k").reset_index(drop=True))


def prepare_out(out: Path, blocks: Sequence[Mapping[str, str]]) -> None:
    """Create ``out`` and check that it is writable; write the block list to ``meta.json``."""
    if out.is_dir() and (any(out.glob(PART_GLOB)) or any(out.glob(LOSS_PART_GLOB))):
        raise OutputError(f"out={str(out)!r} already holds the records of another run (part-*.parquet, "
                          f"losses-*.parquet); "
                          f"pass a new folder, or delete that one, so that load() returns this run alone")
    try:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": "gradscope-records", "version": 1,
                "blocks": [dict(b) for b in blocks]}
        atomic_write(out / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    except OSError as exc:
        raise OutputError(f"cannot write records to out={str(out)!r}: {exc.strerror or exc}; "
                          f"pass a folder you can write to") from exc


def recreate_out(out: Path, blocks: Sequence[Mapping[str, str]], lost: Sequence[Path], rows: int) -> None:
    """``out`` vanished while a run streamed into it (moved or deleted): make it again and say so, once.

    The rows not yet written (in memory) and every later row go to the new folder; the ``rows`` rows of the
    parts ``lost`` (already released from memory) are wherever the old folder went. Raises ``OSError`` when the
    folder cannot be made (the caller keeps the rows in memory and retries).
    """
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "gradscope-records", "version": 1, "blocks": [dict(b) for b in blocks],
            "recreated": True}
    atomic_write(out / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    where = (f"the {rows} rows of its parts {', '.join(p.name for p in lost)} were in the folder that went "
             f"(they are wherever it was moved; deleted, they are gone); " if lost else "")
    warnings.warn(f"gradscope: the out= folder {str(out)!r} was moved or deleted during the run: recreated it; "
                  f"{where}the rows from now on are written to {str(out)!r}, and scope.frame() returns the rows "
                  f"it can still read", RuntimeWarning, stacklevel=4)


def _umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], write: Callable[[str], object]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then move it over ``path`` in one step.

    A reader (or a process killed mid-write) sees the old file or the new one, never a truncated one. Every file
    that gradscope writes for others to read goes through here (``write_text`` helpers: :func:`atomic_text`).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=str(path.parent))
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError as exc:  # a full disk's error names no file (or the temporary one): name the file meant
            if not isinstance(exc, GradscopeError) and exc.filename in (None, tmp):
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
            raise
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode open() would have given it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_text(path: Union[str, Path], text: str) -> None:
    """``Path(path).write_text(text)``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load(path: Union[str, os.PathLike]) -> pd.DataFrame:
    """Read the records in a folder back into one DataFrame, however the run that wrote them ended.

    ``path`` may hold the parts that ``attach(..., out=DIR)`` streamed (``DIR/part-*.parquet``; the result equals
    ``scope.frame()`` up to its last flush), a report's ``records.parquet``/``records.csv``, or the parts of a
    ``gradscope profile`` folder (``DIR/records/<run>/[init|train/]part-*.parquet``; ``run`` and ``phase`` columns
    added; a profile folder's ``records.parquet`` holds its training phase only, so where the parts hold more, as
    the initialisation phase and the runs measured only there, ``records.parquet`` and ``init_records.parquet``
    with a ``phase`` column, and any part row neither holds). Files are read with pyarrow and nothing in them is unpickled or executed. A truncated file (a process
    killed while writing it outside gradscope) is skipped with a warning naming it; a file of another schema is
    refused with :class:`~gradscope.errors.DataError` naming the file and the column; duplicated rows (a copied
    part) are dropped with a warning naming the files.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise GradscopeError(f"no gradscope records at {str(folder)!r}: not a folder; pass the out= folder of a run "
                             f"or a gradscope profile folder")
    parts = sorted(folder.glob(PART_GLOB))
    if parts:  # a run's own folder: its parts are the records (a report written into it never shadows them)
        return _dedupe(*_read_parts_of(parts))
    nested = sorted((folder / "records").glob("**/" + PART_GLOB)) if (folder / "records").is_dir() else []
    if _readable(folder / PARQUET):
        consolidated = read_records(folder / PARQUET)
        if not nested:
            return _dedupe(consolidated, [folder / PARQUET])
        frame, files = _read_nested(folder / "records", nested)
        if _covers(consolidated, frame):
            if not _beyond_main(frame, consolidated):
                return _dedupe(consolidated, [folder / PARQUET])
            # the parts also hold a phase or runs the report's records do not (a profile's initialisation, the
            # runs measured at initialisation only): both phases, from the report's files where they hold them
            return _dedupe(_both_phases(folder, consolidated, frame), [folder / PARQUET, *files])
        warnings.warn(f"gradscope: {str(folder / PARQUET)!r} holds fewer steps than the parts under "
                      f"{str(folder / 'records')!r} (a report written while the run was still streaming): "
                      f"reading the parts", RuntimeWarning, stacklevel=2)
        return _dedupe(frame, files)
    if nested:
        return _dedupe(*_read_nested(folder / "records", nested))
    if (folder / CSV).exists():
        return _dedupe(read_records(folder / CSV), [folder / CSV])
    if (folder / META_FILE).exists():  # attached, but nothing recorded yet
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(S.COLUMNS, _DTYPES)})
    raise GradscopeError(f"no gradscope records in {str(folder)!r}: expected {PARQUET}, {PART_GLOB} files "
                         f"written by attach(..., out=...), or records/<run>/ of a gradscope profile folder")


def _covers(consolidated: pd.DataFrame, parts: pd.DataFrame) -> bool:
    """True when a report's records hold every recorded step of the parts of the phase(s) they hold.

    A profile folder's ``records.parquet`` holds its main phase (training when there is one; no ``phase``
    column) and is written when the run ends; written earlier (``gradscope report`` on a live folder), later parts
    hold steps it lacks. Compared per run where both name runs.
    """
    if PHASE in parts.columns and PHASE not in consolidated.columns:
        parts = parts[parts[PHASE] == _main_phase(parts)]
    key = [c for c in (S.RUN, S.STEP) if c in consolidated.columns and c in parts.columns]
    have = set(map(tuple, consolidated[key].drop_duplicates().itertuples(index=False, name=None)))
    need = set(map(tuple, parts[key].drop_duplicates().itertuples(index=False, name=None)))
    return need <= have


def _main_phase(parts: pd.DataFrame) -> str:
    """The phase a profile folder's ``records.parquet`` holds: training when there is one."""
    phases = set(parts[PHASE])
    return "train" if "train" in phases else sorted(phases)[0]


def _beyond_main(parts: pd.DataFrame, consolidated: pd.DataFrame) -> bool:
    """Whether the parts hold rows of another phase than the report's records (which have no ``phase`` column),
    or of runs they lack."""
    if PHASE not in parts.columns or PHASE in consolidated.columns:
        return False
    if set(parts[PHASE]) != {_main_phase(parts)}:
        return True
    return S.RUN in parts.columns and S.RUN in consolidated.columns and \
        not set(parts[S.RUN]) <= set(consolidated[S.RUN])


def _both_phases(folder: Path, consolidated: pd.DataFrame, parts: pd.DataFrame) -> pd.DataFrame:
    """A finished profile folder's records with a ``phase`` column: ``records.parquet`` (the main phase) and
    ``init_records.parquet`` (initialisation), which carry the run facts (config, model, bn, seed, ...), then the
    rows of the parts neither holds (a phase without a report file; a last part written after the report), given
    their run's facts."""
    main = _main_phase(parts)
    frames = [consolidated.assign(**{PHASE: main})]
    init_file = folder / INIT_PARQUET
    if main != "init" and _readable(init_file):
        frames.append(read_records(init_file).assign(**{PHASE: "init"}))
    base = pd.concat(frames, ignore_index=True)
    key = [c for c in (S.RUN, PHASE, S.STEP, S.BLOCK, S.CALL, S.METRIC) if c in base.columns and c in parts.columns]
    seen = parts.merge(base[key].drop_duplicates(), on=key, how="left", indicator=True)["_merge"] == "both"
    missing = parts[~seen.to_numpy()].drop(columns="_file", errors="ignore")
    if not missing.empty and S.RUN in base.columns:
        facts = [c for c in base.columns if c not in missing.columns]
        missing = missing.merge(base.drop_duplicates(S.RUN)[[S.RUN, *facts]], on=S.RUN, how="left")
    return sort_frame(pd.concat([base, missing], ignore_index=True) if not missing.empty else base)


def read_parts(paths: Sequence[Path], tail: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """The rows of a run's own parts (none skipped, each checked), then ``tail`` (rows still in memory), sorted."""
    gone = [p for p in paths if not p.exists()]
    if gone:
        warnings.warn(f"gradscope: {len(gone)} records part(s) of this run are no longer on disk "
                      f"({', '.join(str(p) for p in gone[:3])}{', ...' if len(gone) > 3 else ''}: the out= folder "
                      f"was moved or deleted during the run); this frame holds every other row, the rows of those "
                      f"parts are wherever they went", RuntimeWarning, stacklevel=3)
    frames = [_table_frame(read_table(p), p) for p in paths if p.exists()] + ([tail] if tail is not None else [])
    if not frames:
        return frame_from_columns([], [], [], [], [], [], [])
    return sort_frame(pd.concat(frames, ignore_index=True))


def _read_parts_of(parts: Sequence[Path]) -> tuple:
    kept = [p for p in parts if _readable(p)]
    frames = [_table_frame(read_table(p), p).assign(_file=p.name) for p in kept]
    if not frames:
        raise DataError(f"no readable gradscope records among {[p.name for p in parts]}")
    return sort_frame(pd.concat(frames, ignore_index=True)), kept


def _read_nested(root: Path, parts: Sequence[Path]) -> tuple:
    """Parts of a profile folder: ``records/<run>/<phase>/part-*`` (or ``records/<run>/part-*``) with labels."""
    frames, files = [], []
    groups: dict = {}
    for p in parts:
        groups.setdefault(p.parent, []).append(p)
    for parent, group in groups.items():
        rel = parent.relative_to(root).parts
        kept = [p for p in group if _readable(p)]
        if not kept:
            continue
        frame = sort_frame(pd.concat([_table_frame(read_table(p), p).assign(_file=str(p.relative_to(root)))
                                      for p in kept], ignore_index=True))
        labels = {S.RUN: rel[0] if rel else root.name}
        if len(rel) > 1:
            labels[PHASE] = "/".join(rel[1:])
        frames.append(frame.assign(**labels))
        files.extend(kept)
    if not frames:
        raise DataError(f"no readable gradscope records under {str(root)!r}")
    return pd.concat(frames, ignore_index=True), files


def _dedupe(frame: pd.DataFrame, files: Sequence[Path]) -> pd.DataFrame:
    """Drop rows repeated under one (run, phase, step, block, call, metric) key, warning with the files involved."""
    key = [c for c in (S.RUN, PHASE, S.STEP, S.BLOCK, S.CALL, S.METRIC) if c in frame.columns]
    dup = frame.duplicated(key, keep="first") if set(S.COLUMNS) <= set(frame.columns) else None
    if dup is not None and dup.any():
        involved = frame[frame.duplicated(key, keep=False)]
        where = sorted(set(involved["_file"])) if "_file" in frame.columns else [str(f) for f in files]
        warnings.warn(f"gradscope: {int(dup.sum())} duplicate rows (same {', '.join(key)}) in {where}; "
                      f"kept the first of each", RuntimeWarning, stacklevel=3)
        frame = frame[~dup].reset_index(drop=True)
    return frame.drop(columns="_file", errors="ignore")


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
    when that file is absent), so the result equals the frame that was written, dtypes included. The parquet
    file's own pandas metadata is never used (see :func:`read_table`).
    """
    p = Path(path)
    if p.is_dir():
        p = p / PARQUET if (p / PARQUET).exists() else p / CSV
    if not p.exists():
        raise DataError(f"no records at {str(path)!r}; pass a report folder, a records.parquet or a records.csv.")
    if p.suffix == ".parquet":
        table = read_table(p)
        check_schema(table, p)
        raw = (table.schema.metadata or {}).get(_META_KEY)
        df = table.to_pandas(ignore_metadata=True)
        spec = json.loads(raw) if raw else {}
        return pd.DataFrame({c: _restore(df[c], spec[c], False) if c in spec else df[c] for c in df.columns})
    if p.suffix != ".csv":
        raise DataError(f"cannot read records from {str(p)!r}: expected a .parquet or .csv file.")
    try:
        return _read_csv_records(p)
    except (ValueError, KeyError, TypeError, pd.errors.ParserError) as exc:  # json's decode error is a ValueError
        raise DataError(f"cannot read records from {str(p)!r}: {type(exc).__name__}: {exc}. The file was cut short "
                        f"or edited by hand; write it again (gradscope report on the run's records/ folder) or "
                        f"read the Parquet file beside it") from exc


def _read_csv_records(p: Path) -> pd.DataFrame:
    """:func:`read_records` of a CSV file (errors left to the caller, which names the file)."""
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


# --- alerts -----------------------------------------------------------------------------------------------------

#: ``DIR/alerts.csv`` beside the record parts: the run's alerts, rewritten whole (atomically) when one is added.
ALERTS_FILE = "alerts.csv"


def alerts_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Alerts (dicts with :data:`gradscope.schema.ALERT_COLUMNS`) as a DataFrame, empty with those columns if none."""
    frame = pd.DataFrame(list(rows), columns=list(S.ALERT_COLUMNS))
    return frame.astype({"step": "int64", "value": "float64", "threshold": "float64"})


def write_alerts(rows: Sequence[Mapping[str, Any]], out: Union[str, Path]) -> Path:
    """Write ``out/alerts.csv`` atomically (a kill mid-write leaves the previous file)."""
    path = Path(out) / ALERTS_FILE
    frame = alerts_frame(rows)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # the folder moved or deleted mid-run: the records recreate it
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    except OSError as exc:  # a full disk: the alerts stay in memory (scope.alerts()) and the next alert retries
        warnings.warn(f"gradscope: could not write {str(path)!r}: {exc.strerror or exc}; scope.alerts() still "
                      f"returns every alert", RuntimeWarning, stacklevel=3)
    return path


#: Alert columns added after the first alerts.csv files were written: optional when reading.
_LATER_ALERT_COLUMNS = ("origin", "note")


def read_alerts(folder: Union[str, Path]) -> pd.DataFrame:
    """``folder/alerts.csv`` as written by :func:`write_alerts` (block names stay text); empty if there is none."""
    path = Path(folder) / ALERTS_FILE
    if not path.exists():
        return alerts_frame([])
    try:
        frame = pd.read_csv(path, dtype={"kind": str, "block": str, "metric": str, "others": str,
                                                **{c: str for c in _LATER_ALERT_COLUMNS}},
                            keep_default_na=False, na_values={"block": [""], "value": [""], "threshold": [""]})
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {_first_line(exc)}; an alerts.csv written by gradscope has "
                        f"the columns {', '.join(S.ALERT_COLUMNS)}") from None
    missing = [c for c in S.ALERT_COLUMNS if c not in frame.columns and c not in _LATER_ALERT_COLUMNS]
    if missing:
        raise DataError(f"cannot read {str(path)!r}: no column(s) {', '.join(missing)} (it has "
                        f"{', '.join(map(str, frame.columns[:8]))}); not an alerts.csv written by gradscope")
    frame["others"] = frame["others"].fillna("")
    for column in _LATER_ALERT_COLUMNS:  # files from before these columns read as empty text
        frame[column] = frame[column].fillna("") if column in frame else ""
    try:
        return alerts_frame(frame.to_dict("records"))
    except (ValueError, TypeError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {_first_line(exc)} (step must be a whole number, value and "
                        f"threshold numbers)") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
