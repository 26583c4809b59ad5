"""Reading Parquet files that others may have sent: pyarrow only, nothing unpickled or run, the schema checked,
and a file whose metadata promises more memory than gradscope records can need refused before its data is read.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from gradscope import schema as S
from gradscope.errors import DataError, GradscopeError

_DTYPES = ("int64", "str", "int64", "str", "str", "float64", "int64")  # of schema.COLUMNS
_META_KEY = b"gradscope_dtypes"

_MAGIC = b"PAR1"
#: Column -> the Arrow type family a gradscope frame stores there.
_FAMILIES = {S.STEP: "integer", S.BLOCK: "string", S.DEPTH: "integer", S.KIND: "string", S.METRIC: "string",
             S.VALUE: "floating", S.CALL: "integer"}


def _readable(path: Path) -> bool:
    """True for a complete Parquet file; a truncated one (or not Parquet at all) warns, naming it, and is False."""
    if not path.is_file():
        return False
    size = path.stat().st_size
    if size >= 12:
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            if head == _MAGIC and handle.read(4) == _MAGIC:
                return True
    warnings.warn(f"gradscope: skipped {str(path)!r}: truncated or not a Parquet file ({size} bytes); "
                  f"reading the other records", RuntimeWarning, stacklevel=3)
    return False


#: What a file's metadata may promise before it is read: bytes in memory per byte on disk, and a floor.
EXPANSION, MIN_BUDGET = 200, 256 * 2**20
#: Longest text value (a block, kind, metric or run name) a records file may hold.
MAX_TEXT = 64 * 2**10
_ROW_BYTES = 64  # a frame row in memory, before its text: four 8-byte numbers, three pointers, pandas' copies


def read_table(path: Path) -> Any:
    """A pyarrow Table of ``path``; its pandas and gradscope metadata must be JSON (read as data, never run).

    A file whose metadata promises more memory than :func:`check_promises` allows is refused before its data is
    read; text columns are read dictionary-encoded (a value repeated a million times is stored once) and decoded
    only after their decoded size is checked, so a small crafted file cannot exhaust memory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        budget = check_promises(meta.metadata, path)
        text = [f.name for f in meta.schema_arrow if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        table = pq.read_table(path, read_dictionary=text)
    except GradscopeError:
        raise
    except Exception as exc:  # a damaged file, or a pickled extension type that pyarrow>=14.0.1 refuses
        raise DataError(f"cannot read {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    table = _decode_text(table, path, budget)
    for key, raw in (table.schema.metadata or {}).items():
        if key in (b"pandas", _META_KEY):
            try:
                json.loads(raw)
            except ValueError:
                raise DataError(f"refusing {str(path)!r}: its {key.decode()!r} metadata is not valid JSON; "
                                f"this file was not written by gradscope") from None
    return table


def check_promises(metadata: Any, path: Path) -> int:
    """The memory budget of a Parquet file (bytes), after refusing one whose metadata promises more.

    What reading allocates grows with the rows and the uncompressed column chunks the footer declares; what a
    gradscope file needs is at most :data:`EXPANSION` times its size on disk (a floor of :data:`MIN_BUDGET` for
    small files). A crafted file (20 million constant rows compress to 0.5 MB) promises far more.
    """
    size = Path(path).stat().st_size
    budget = max(MIN_BUDGET, EXPANSION * size)
    chunks = sum(metadata.row_group(g).column(c).total_uncompressed_size
                 for g in range(metadata.num_row_groups) for c in range(metadata.num_columns))
    promised = metadata.num_rows * _ROW_BYTES + chunks
    if promised > budget:
        raise DataError(f"refusing {str(path)!r}: its metadata promises {metadata.num_rows} rows and "
                        f"{chunks / 2**20:.0f} MiB of columns ({promised / 2**20:.0f} MiB in memory) from "
                        f"{size / 2**10:.0f} KiB on disk, more than gradscope records need (at most "
                        f"{budget / 2**20:.0f} MiB); not a gradscope records file")
    return budget


def _decode_text(table: Any, path: Path, budget: int) -> Any:
    """Dictionary-encoded text columns decoded, after checking the longest value and the decoded size."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, field in enumerate(table.schema):
        if not pa.types.is_dictionary(field.type):
            continue
        column = table.column(i)
        decoded = longest = 0
        for chunk in column.chunks:
            lengths = pc.binary_length(chunk.dictionary)
            longest = max(longest, pc.max(lengths).as_py() or 0)
            decoded += pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0
        if longest > MAX_TEXT or decoded > budget:
            raise DataError(f"refusing {str(path)!r}: column {field.name!r} decodes to {decoded / 2**20:.0f} MiB "
                            f"of text (longest value {longest} characters); gradscope names are short")
        table = table.set_column(i, field.name, column.cast(field.type.value_type))
    return table


def check_schema(table: Any, path: Path) -> None:
    """Refuse a table that lacks a frame column or stores one with the wrong type (names the file and column)."""
    import pyarrow as pa

    names = table.schema.names
    for column, family in _FAMILIES.items():
        if column not in names:
            raise DataError(f"refusing {str(path)!r}: no column {column!r} (it has {names[:8]}); "
                            f"not gradscope records")
        kind = table.schema.field(column).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        ok = {"integer": pa.types.is_integer(kind),
              "floating": pa.types.is_floating(kind) or pa.types.is_integer(kind),
              "string": pa.types.is_string(kind) or pa.types.is_large_string(kind)}[family]
        if not ok:
            raise DataError(f"refusing {str(path)!r}: column {column!r} holds {kind}, expected {family} values; "
                            f"not gradscope records")


def _table_frame(table: Any, path: Path) -> pd.DataFrame:
    """A checked table as a frame with the schema's dtypes (pandas metadata ignored, so nothing of it runs)."""
    check_schema(table, path)
    df = table.to_pandas(ignore_metadata=True)
    for column, dtype in zip(S.COLUMNS, _DTYPES):
        df[column] = df[column].astype(object).astype(str) if dtype == "str" else df[column].astype(dtype)
    return df


