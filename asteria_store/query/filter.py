"""Filtered search: a SQL predicate over the metadata columns, and the plan it leads to.

``where`` is a SQL boolean expression (``"lang = 'en' AND year >= 2020 AND tag IN ('a',
'b')"``), evaluated by DuckDB over each segment's columns (Arrow, memory-mapped; no copy
into DuckDB). A row matches when the predicate is true (null counts as false).

A filtered search is a search of a :class:`~asteria_store.query.engine.View` in which the
rows that do not match are dead, like deleted rows: every search path (batch, one query,
by sketch, exact) already skips dead rows. The plan follows selectivity (``s``: matching
live rows over live rows):

* ``"exact"``: when few rows match, every matching row is scored exactly (brute force
  over them only). Chosen when the matching rows are no more than the rows a probed
  search would scan (below ``s ~= sqrt(probes / buckets)``), or when their vectors fit
  :data:`EXACT_BYTES`: those are gathered into memory once per filter and generation,
  so each query is one matrix product over them;
* ``"probed"``: otherwise probes rise to ``probes / s`` (so about as many matching rows
  are met as an unfiltered search meets rows), and a query that still has fewer than k
  results probes on (doubling) until it has them.

Either way a query returns k results whenever at least k live rows match.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..storage import columns as collib
from .engine import View

_local = threading.local()

#: Matching rows whose vectors fit this many bytes are searched exactly, from one copy
#: gathered per filter (kept with the filter's matching rows: reads.py keeps a few).
EXACT_BYTES = 32 << 20


def _connection():
    """This thread's DuckDB connection (a connection serves one thread at a time)."""
    con = getattr(_local, "con", None)
    if con is None:
        import duckdb

        con = _local.con = duckdb.connect()
        con.execute("SET preserve_insertion_order = true")  # a mask must line up with its rows
    return con


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a filtered search does (``explain`` shows it)."""

    where: str
    matching: int  # live rows that match
    live: int  # live rows
    plan: str  # "exact" or "probed"
    probes: int | None  # probes of a probed plan

    @property
    def selectivity(self) -> float:
        return self.matching / self.live if self.live else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "matching": self.matching, "selectivity": round(self.selectivity, 6),
                "plan": self.plan, "probes": self.probes}


def check_where(where: Any, schema: list[dict] | None) -> str:
    """``where`` as a checked predicate string: refused in one line when it is not a
    string, does not parse, names an unknown column, or is not boolean."""
    if not isinstance(where, str) or not where.strip():
        raise InvalidArgumentError(f"where must be a non-empty SQL predicate string, got {where!r}.")
    if not schema:
        raise InvalidArgumentError("This store has no metadata columns to filter on; ingest them with "
                                   "metadata= (or --metadata FILE.parquet).")
    import duckdb

    empty = collib.to_arrow_schema(schema).empty_table()
    try:
        out = _connection().from_arrow(empty).project(f"({where}) AS m")
        types = out.types
    except duckdb.Error as exc:
        raise InvalidArgumentError(_duckdb_message(where, exc, schema)) from None
    if str(types[0]) not in ("BOOLEAN", '"NULL"', "NULL"):
        raise InvalidArgumentError(f"Bad filter {where!r}: it gives {types[0]}, not true or false. "
                                   "Compare a column, e.g. \"year >= 2020\".")
    return where


def _duckdb_message(where: str, exc: Exception, schema: list[dict]) -> str:
    """DuckDB's error as one line: its first line, and where in ``where`` it points."""
    lines = str(exc).splitlines()
    first = (lines[0].strip() if lines else type(exc).__name__).rstrip("!.")
    for k, line in enumerate(lines[:-1]):
        if line.startswith("LINE 1: ") and where in line:
            at = lines[k + 1].find("^") - line.index(where)
            if 0 <= at <= len(where):
                first += f" (at position {at + 1} of the filter)"
            break
    names = ", ".join(e["name"] for e in schema)
    return f"Bad filter {where!r}: {first}. Columns: {names}."


def matching_rows(view: View, where: str) -> dict[int, np.ndarray]:
    """The live rows of each segment of ``view`` that match ``where`` (ascending)."""
    import duckdb

    out = {}
    con = _connection()
    for seg, reader in sorted(view.segments.items()):
        live = view.live_mask(seg, 0, reader.n)
        if live is not None and not live.any():
            continue
        table = reader.columns_table(view.schema)  # every row, no copy: DuckDB reads what it needs
        try:
            result = con.from_arrow(table).project(f"coalesce(({where}), false) AS m").to_arrow_table()
        except duckdb.Error as exc:  # a value error (a cast) that an empty table did not show
            raise InvalidArgumentError(_duckdb_message(where, exc, view.schema)) from None
        mask = result.column(0).to_numpy(zero_copy_only=False).astype(bool, copy=False)
        if live is not None:
            mask &= live
        if mask.any():
            out[seg] = np.flatnonzero(mask)
    return out


class Filtered:
    """One predicate over one generation: its matching rows, the view in which the others
    are dead, and (once asked for) the matching rows' vectors gathered into memory."""

    def __init__(self, view: View, where: str):
        self.where = where
        self.matches = matching_rows(view, where)
        self.view = filtered_view(view, self.matches)
        self._gathered: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self.view.count

    def gathered(self) -> tuple[np.ndarray, np.ndarray]:
        """The matching rows' float32 vectors (m, D) and int64 ids, gathered once."""
        with self._lock:
            if self._gathered is None:
                vecs, ids = [], []
                for seg, rows in sorted(self.matches.items()):
                    reader = self.view.segments[seg]
                    vecs.append(reader.take_vectors(rows))
                    ids.append(reader.take("ids", rows).astype(np.int64))
                some = next(iter(self.view.segments.values()), None)
                width = some.dim if some is not None else 0
                self._gathered = (np.concatenate(vecs) if vecs else np.empty((0, width), np.float32),
                                  np.concatenate(ids) if ids else np.empty(0, np.int64))
            return self._gathered


def filtered_view(view: View, matches: dict[int, np.ndarray]) -> View:
    """``view`` with every row outside ``matches`` dead (as if deleted): searches of it
    return matching rows only. Its bucket tables are its own."""
    deleted = {}
    for seg, reader in view.segments.items():
        keep = np.zeros(reader.n, dtype=bool)
        rows = matches.get(seg)
        if rows is not None:
            keep[rows] = True
        deleted[seg] = np.flatnonzero(~keep)
    return view.with_dead(deleted, int(sum(len(r) for r in matches.values())))


def plan(where: str, matching: int, live: int, probes: int | str, n_buckets: int, row_bytes: int) -> Plan:
    """The plan for a filtered search (see the module's docstring); ``row_bytes``: bytes
    of one gathered (float32) vector."""
    if probes == "all" or matching == 0 or matching * row_bytes <= EXACT_BYTES:
        return Plan(where, matching, live, "exact", None)
    scanned = min(1.0, probes / max(1, n_buckets)) * live  # rows a probed search scans
    raised = min(n_buckets, math.ceil(probes * live / matching))
    if matching <= scanned * live / matching or raised >= n_buckets:
        return Plan(where, matching, live, "exact", None)
    return Plan(where, matching, live, "probed", int(raised))


__all__ = ["EXACT_BYTES", "Filtered", "Plan", "check_where", "filtered_view", "matching_rows", "plan"]
