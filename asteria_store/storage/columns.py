"""Metadata columns: the store's schema, and each segment's columns as Arrow IPC files.

A store may hold named columns beside its vectors, one value (or null) per row. Their
types are few on purpose, each with one Arrow type on disk:

=================  =========================  ==========================================
kind               Arrow type                 taken from
=================  =========================  ==========================================
``int64``          int64                      any integer type (uint64 up to 2**63 - 1)
``float64``        float64 (double)           any floating type
``bool``           bool                       bool
``string``         string (utf8)              string, large_string
``timestamp``      timestamp[us] (tz kept)    timestamps of any unit
``list<string>``   list<string>               lists of strings
=================  =========================  ==========================================

The schema (column names and kinds, in the order first seen) is the catalog's ``schema``
meta entry: a JSON list of ``{"name", "kind"}`` (``"tz"`` for a zoned timestamp). A
column appears in a later ingest with nulls before it; a type clash is refused before
anything is written.

On disk, beside the Zarr arrays of a segment::

    seg-00000001/columns/c/<i>   Arrow IPC file (little-endian, uncompressed) of rows
                                 [i * chunk_rows, (i + 1) * chunk_rows): one record batch

Chunks follow the segment's vector chunks, so a chunk's CRC-32C, its damage record and
its quarantine work as for the Zarr arrays. The segment record's ``"columns"`` lists the
columns its files hold; a column it lacks reads as nulls. Files are memory-mapped when
read (Arrow reads them without copying). pyarrow is imported only when columns are used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError

if TYPE_CHECKING:
    import pyarrow as pa

#: Names a column may not take: they are the columns of table results.
RESERVED = ("id", "vector", "score", "rank", "query")

#: What the docs call each kind, for error messages.
KINDS_TEXT = "ints, floats, bools, strings, timestamps or lists of strings"

COLUMNS_DIR = "columns"


def _pa():
    import pyarrow as pa

    return pa


def kind_type(entry: Mapping[str, Any]) -> pa.DataType:
    """The Arrow type of a schema entry ``{"name", "kind"[, "tz"]}``."""
    pa = _pa()
    kind = entry["kind"]
    if kind == "int64":
        return pa.int64()
    if kind == "float64":
        return pa.float64()
    if kind == "bool":
        return pa.bool_()
    if kind == "string":
        return pa.string()
    if kind == "timestamp":
        return pa.timestamp("us", tz=entry.get("tz"))
    if kind == "list<string>":
        return pa.list_(pa.string())
    raise InvalidInputError(f"Unknown column kind {kind!r} in the store's schema; upgrade asteria-store.")


def to_arrow_schema(entries: list[Mapping[str, Any]] | None) -> pa.Schema:
    """The store's schema (catalog entries) as an Arrow schema."""
    pa = _pa()
    return pa.schema([pa.field(e["name"], kind_type(e)) for e in entries or []])


def _entry(name: str, typ: pa.DataType) -> dict[str, Any] | None:
    """The schema entry of a column of Arrow type ``typ``, None if no kind takes it."""
    pa = _pa()
    t = pa.types
    if t.is_integer(typ):
        return {"name": name, "kind": "int64"}
    if t.is_floating(typ):
        return {"name": name, "kind": "float64"}
    if t.is_boolean(typ):
        return {"name": name, "kind": "bool"}
    if t.is_string(typ) or t.is_large_string(typ):
        return {"name": name, "kind": "string"}
    if t.is_timestamp(typ):
        return {"name": name, "kind": "timestamp", **({"tz": typ.tz} if typ.tz else {})}
    if (t.is_list(typ) or t.is_large_list(typ)) and (t.is_string(typ.value_type) or t.is_large_string(typ.value_type)
                                                   or t.is_null(typ.value_type)):
        return {"name": name, "kind": "list<string>"}
    return None


def read_table(metadata: Any) -> pa.Table:
    """``metadata`` (a pyarrow Table or RecordBatch, a pandas DataFrame, a dict of equal-
    length columns, or a path to a ``.parquet`` file) as a pyarrow Table."""
    pa = _pa()
    if isinstance(metadata, (str, os.PathLike)):
        path = Path(metadata)
        if path.suffix.lower() != ".parquet":
            raise InvalidInputError(f"Expected metadata as a .parquet file, got {str(path)!r}.")
        if not path.is_file():
            raise InvalidInputError(f"Metadata file {str(path)!r} does not exist.")
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise InvalidInputError(f"Cannot read metadata file {str(path)!r}: {_first_line(exc)}") from None
    if isinstance(metadata, pa.Table):
        return metadata
    if isinstance(metadata, pa.RecordBatch):
        return pa.Table.from_batches([metadata])
    if type(metadata).__module__.startswith("pandas") and type(metadata).__name__ == "DataFrame":
        try:
            return pa.Table.from_pandas(metadata, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise InvalidInputError(f"Cannot read the metadata DataFrame: {_first_line(exc)}") from None
    if isinstance(metadata, Mapping):
        cols = {}
        for name, values in metadata.items():
            try:
                cols[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
            except (pa.ArrowException, TypeError, ValueError) as exc:
                raise InvalidInputError(f"Cannot read metadata column {name!r}: {_first_line(exc)}") from None
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise InvalidInputError(f"Expected metadata columns of equal length, got lengths {sorted(lengths)}.")
        return pa.table(cols) if cols else pa.table({})
    raise InvalidInputError(
        f"Expected metadata as a pyarrow Table, a pandas DataFrame, a dict of columns or a .parquet path, "
        f"got {type(metadata).__name__}.")


def conform(metadata: Any, n: int, schema: list[dict] | None) -> tuple[pa.Table, list[dict]]:
    """Check ``metadata`` for ``n`` rows against the store's ``schema`` (catalog entries);
    return it cast to the merged schema (every column, nulls where it gave none) and the
    merged schema. Every problem is a one-line :class:`InvalidInputError`."""
    pa = _pa()
    table = read_table(metadata)
    if table.num_rows != n:
        raise InvalidInputError(f"Expected metadata with one row per vector ({n:,}), got {table.num_rows:,} rows.")
    merged = [dict(e) for e in schema or []]
    known = {e["name"]: e for e in merged}
    seen = set()
    for field in table.schema:
        name = field.name
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"Expected metadata column names to be non-empty strings, got {name!r}.")
        if name in seen:
            raise InvalidInputError(f"Metadata column {name!r} appears twice.")
        seen.add(name)
        if name in RESERVED:
            raise InvalidInputError(f"Metadata column {name!r} is a reserved name ({', '.join(RESERVED)}); "
                                    "rename it.")
        typ = field.type
        if pa.types.is_dictionary(typ):
            typ = typ.value_type
        have = known.get(name)
        if pa.types.is_null(typ):
            if have is None:
                raise InvalidInputError(f"Metadata column {name!r} holds only nulls, so its type is unknown; "
                                        "give it a typed column (e.g. pa.array([...], type=pa.string())).")
            continue
        entry = _entry(name, typ)
        if entry is None:
            raise InvalidInputError(f"Metadata column {name!r} has type {typ}; columns hold {KINDS_TEXT}.")
        if have is None:
            merged.append(entry)
            known[name] = entry
        elif have != entry:
            raise InvalidInputError(
                f"Metadata column {name!r} holds {_kind_text(have)} in this store, got {_kind_text(entry)}. "
                "Cast it, or use another column name.")
    return conform_table(table, merged), merged


def conform_table(table: pa.Table, schema: list[dict]) -> pa.Table:
    """``table`` with exactly the columns of ``schema`` (catalog entries), in its order and
    types; a column it lacks is all nulls."""
    pa = _pa()
    n = table.num_rows
    names = set(table.column_names)
    cols = []
    for e in schema:
        typ = kind_type(e)
        if e["name"] not in names:
            cols.append(pa.nulls(n, typ))
            continue
        col = table.column(e["name"])
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if col.type != typ:
            try:
                col = col.cast(typ, safe=True)
            except (pa.ArrowException, ValueError) as exc:
                raise InvalidInputError(f"Metadata column {e['name']!r} does not fit {_kind_text(e)}: "
                                        f"{_first_line(exc)}") from None
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=to_arrow_schema(schema))


def null_table(n: int, schema: list[dict]) -> pa.Table:
    """``n`` rows of nulls in every column of ``schema``."""
    pa = _pa()
    return conform_table(pa.table({"_": pa.nulls(n)}).drop_columns(["_"]), schema)


def _kind_text(entry: Mapping[str, Any]) -> str:
    return entry["kind"] + (f" ({entry['tz']})" if entry.get("tz") else "")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def chunk_file(segment_dir: str | os.PathLike[str], index: int) -> Path:
    """The IPC file of chunk ``index`` of a segment's columns."""
    return Path(segment_dir) / COLUMNS_DIR / "c" / str(index)


def write_chunk(segment_dir: str | os.PathLike[str], index: int, table: pa.Table) -> None:
    """Write one chunk's rows as an Arrow IPC file (one record batch)."""
    pa = _pa()
    path = chunk_file(segment_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(os.fspath(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks(), max_chunksize=max(1, table.num_rows))


def read_chunk(segment_dir: str | os.PathLike[str], index: int) -> pa.Table:
    """One chunk's rows, memory-mapped (raises the OS or Arrow error it meets)."""
    pa = _pa()
    # not closed here: the table's buffers are views of the map, which lives while they do
    return pa.ipc.open_file(pa.memory_map(os.fspath(chunk_file(segment_dir, index)), "r")).read_all()


__all__ = ["COLUMNS_DIR", "KINDS_TEXT", "RESERVED", "chunk_file", "conform", "conform_table", "kind_type",
           "null_table", "read_chunk", "read_table", "to_arrow_schema", "write_chunk"]
