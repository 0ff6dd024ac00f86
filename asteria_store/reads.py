"""The read side of a store: the open handle's state, consistent snapshots, and search.

:class:`ReadSide` owns what every operation of an open handle shares: the catalog, the
routing model as of the newest generation read, the memory-mapped segment readers and
this handle's reader pin. Every read runs in ONE LMDB read transaction (a snapshot) with
its generation pinned (storage/pins.py), so directories that a commit retires stay on disk
until no reader can still need them. The write side (write/) reads through it too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lmdb
import numpy as np

from .config import StoreConfig
from .errors import IdNotFoundError, InvalidArgumentError
from .ids import as_id_array, id_kind, to_external, to_internal
from .io import ArrayLike, VectorSource, l2_distances, query_form
from .model.persist import load_router
from .model.router import Router
from .query import filter as qfilter
from .query.engine import Probes, SearchStats, View, search_batch, search_exact, search_gathered
from .query.kernels import check_kernel, check_threads, default_kernel
from .storage import columns as collib
from .storage import segments as seglib
from .storage.catalog import Catalog, segment_name
from .storage.pins import ReaderPin
from .verify import damage_from_meta, quarantined

SEGMENTS_DIR = "segments.zarr"

#: Rows read per block from a query source.
QUERY_BLOCK_ROWS = 16384

#: ``k`` may exceed the live count (results are padded with -1) up to this many.
_K_PAD_MAX = 65536
#: Filters (per generation and predicate) whose matching rows a handle keeps.
_FILTERS_KEPT = 4
#: Largest result arrays one search may allocate (ids and scores, 12 bytes per cell).
_RESULT_BYTES_MAX = 8 << 30


class Snapshot(NamedTuple):
    txn: lmdb.Transaction
    view: View


def codes_digest(router_rec: dict[str, str]) -> str:
    """What the LRSQ codes written under the catalog's router record are labelled with:
    the digest of the model that first encoded with its quantizer (``"codes"``: a model
    whose leaves were split keeps its parent's codes), else the model's own digest."""
    return router_rec.get("codes") or router_rec["digest"]


def _gaps(cat: Catalog, txn, rows: dict[int, int]) -> dict[int, np.ndarray]:
    """Row ranges ``[start, end)`` of each segment that no bucket extent covers (rows a
    split moved out), from one pass over the extents; only segments that have any."""
    covered: dict[int, list[tuple[int, int]]] = {}
    for _, seg, first, n in cat.iter_extents(txn):
        covered.setdefault(seg, []).append((first, first + n))
    out = {}
    for seg, n in rows.items():
        pos, gaps = 0, []
        for start, end in sorted(covered.get(seg, [])):
            if start > pos:
                gaps.append((pos, start))
            pos = max(pos, end)
        if pos < n:
            gaps.append((pos, n))
        if gaps:
            out[seg] = np.array(gaps, dtype=np.int64)
    return out


def _no_lookup(bucket: int) -> list[tuple[int, int, int]]:
    raise RuntimeError("a cached View is only searched through a snapshot")


class ReadSide:
    """An open handle's shared state and its reads (one snapshot each)."""

    def __init__(self, path: Path, config: StoreConfig, catalog: Catalog, router: Router,
                 router_rec: dict[str, str], pin: ReaderPin | None):
        self.path = path
        self.config = config
        self.catalog = catalog
        self.router = router
        self.router_digest = router_rec["digest"]
        #: The label of the LRSQ codes this router's segments hold (codes_digest).
        self.codes_digest = codes_digest(router_rec)
        self.pin = pin
        self.segments_root = path / SEGMENTS_DIR
        self.readers: dict[int, seglib.SegmentReader] = {}
        self.view: View | None = None
        #: A generation this handle has seen: a lower bound of any it will read next.
        self.seen_generation = 0
        #: Chunks this handle's own ``verify`` found damaged (a read-only handle cannot
        #: record them in the catalog): ``{segment: {(array, chunk): message}}``.
        self.local_damage: dict[int, dict[tuple[str, int], str]] = {}
        #: Threads sharing this handle (a batch job's worker threads) build a new view one
        #: at a time; reads of a built view need no lock.
        self._view_lock = threading.Lock()
        #: Matching rows and filtered views of recent filters (:meth:`_filtered`).
        self._filters: dict[tuple[int, str], qfilter.Filtered] = {}

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()
        self.view = None
        self._filters.clear()
        if self.pin is not None:
            self.pin.close()

    # -- snapshots -----------------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """One consistent read: an LMDB read transaction and the :class:`View` of its
        generation, whose files stay on disk until the ``with`` block ends (pinned)."""
        floor = self.seen_generation  # <= the generation the transaction below sees
        if self.pin is not None:
            self.pin.pin(floor)
        try:
            with self.catalog.read() as txn:
                view = self.view_at(txn)
                yield Snapshot(txn, view.bound(partial(self.catalog.extents, txn)))
        finally:
            if self.pin is not None:
                self.pin.unpin(floor)

    def view_at(self, txn) -> View:
        """The state as of ``txn``, reusing cached extents while the generation is unchanged.
        Building a new one drops the memory maps of segments it no longer has."""
        cat = self.catalog
        generation = int(cat.get_meta(txn, "generation"))
        self.seen_generation = max(self.seen_generation, generation)
        view = self.view
        if view is not None and view.generation == generation:
            return view
        with self._view_lock:
            view = self.view
            if view is not None and view.generation == generation:
                return view
            return self._build_view(txn, generation)

    def _build_view(self, txn, generation: int) -> View:
        cat = self.catalog
        count = int(cat.get_meta(txn, "count"))
        segs = cat.segments(txn)
        deleted = cat.tombstones(txn)
        router_rec = cat.get_meta(txn, "router")
        damage = damage_from_meta(cat.get_meta(txn, "damaged") or {})
        if router_rec["digest"] != self.router_digest:  # (re)trained since we loaded it
            self.router = load_router(self.path / router_rec["dir"], digest=router_rec["digest"])
            self.router_digest = router_rec["digest"]
            self.codes_digest = codes_digest(router_rec)
        readers = {}
        for seg, rec in segs.items():
            r = self.readers.get(seg)
            if r is None:
                r = seglib.SegmentReader(
                    self.segments_root, segment_name(seg), n=rec["rows"], dim=self.config.stored_dim,
                    dtype=self.config.dtype, chunk_rows=rec.get("chunk_rows", self.config.chunk_rows),
                    lrsq=rec.get("lrsq"), columns=rec.get("columns"),
                )
                self.readers[seg] = r
            r.quarantine(quarantined(seg, r, {**damage.get(seg, {}), **self.local_damage.get(seg, {})},
                                           deleted.get(seg)))
            readers[seg] = r
        for seg in [s for s in self.readers if s not in segs]:  # retired since the last view
            self.readers.pop(seg).close()
        view = View(generation=generation, count=count, segments=readers, deleted=deleted,
                    lookup_extents=_no_lookup, gaps=_gaps(cat, txn, {s: rec["rows"] for s, rec in segs.items()}),
                    codes_digest=self.codes_digest, schema=cat.get_meta(txn, "schema"))
        self.view = view
        return view

    def current_view(self) -> View:
        """The state now, for a writer holding the writer lock (no other process commits
        meanwhile, so the view stays current): extents are read in short transactions."""
        with self.snapshot() as snap:
            view = snap.view
        cat = self.catalog

        def lookup(bucket: int) -> list[tuple[int, int, int]]:
            with cat.read() as t:
                return cat.extents(t, bucket)

        return view.bound(lookup)

    # -- reads ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A short summary of the store; what only upkeep, tests and tools look at is under
        ``"internals"``."""
        with self.snapshot() as snap:
            cat, txn = self.catalog, snap.txn
            meta = cat.all_meta(txn)
            segs = cat.segments(txn)
            n_extents = sum(1 for _ in cat.iter_extents(txn))
            router = self.router
            digest = self.router_digest
        disk = 0
        for root, _dirs, files in os.walk(self.path):  # skips directories removed meanwhile
            for name in files:
                try:
                    disk += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:  # removed by a writer's collection meanwhile
                    pass
        growth = meta.get("growth") or {}
        stored = sum(s["rows"] for s in segs.values())
        return {
            "path": str(self.path),
            "format_version": meta["format_version"],
            "dim": self.config.dim,
            "metric": self.config.metric,
            "dtype": self.config.dtype,
            "count": meta["count"],
            # The kind of ids it holds: "int" or "string" (asteria_store/ids.py).
            "ids": meta.get("id_kind") or "int",
            # Metadata columns: name -> kind (storage/columns.py).
            "columns": {e["name"]: e["kind"] for e in meta.get("schema") or []},
            # Rows deleted but still stored (compact() drops them).
            "deleted": stored - meta["count"],
            "segments": len(segs),
            "buckets": router.n_buckets,
            "router": router.kind,
            # True while a learned store waits for its first big enough ingest to train.
            "pending_training": meta.get("pending_training") is not None,
            # How the batch path scores rows: "f32", or "bf16" on CPUs with AMX tiles.
            "kernel": default_kernel(),
            "generation": meta["generation"],
            "disk_bytes": disk,
            "internals": {
                "chunk_rows": self.config.chunk_rows,
                "rows_stored": stored,
                "extents": n_extents,
                "next_id": meta["next_id"],
                "router": {**router.config(), "digest": digest[:16]},
                # The live count the routing model was sized and fitted for, and whether the
                # index re-fits itself as the store outgrows it (see write/upkeep.py).
                "fitted_rows": growth.get("fitted_rows"),
                "grows": bool(growth.get("grow", False)),
                # Segment and model directories retired by a commit, kept while readers pin them.
                "retired": len(meta.get("retired") or []),
                # Re-fits and merges so far: how many, rows rewritten, seconds.
                "maintenance": meta.get("maintenance") or {},
            },
        }

    def ids(self) -> np.ndarray:
        """Every live id, from one snapshot: ascending uint64, or sorted str (an object
        array) in a store of string ids."""
        with self.snapshot() as snap:
            n = int(self.catalog.get_meta(snap.txn, "count"))
            ids = np.fromiter((i for i, _seg, _row in self.catalog.iter_ids(snap.txn)), dtype=np.uint64, count=n)
            if id_kind(self.catalog, snap.txn) != "string":
                return ids
            return np.array(sorted(self.catalog.names_of(snap.txn, ids.tolist())), dtype=object)

    def get(self, ids: ArrayLike) -> np.ndarray:
        with self.snapshot() as snap:
            id_arr = to_internal(self.catalog, snap.txn, ids)
            found, segs, rows = self.catalog.locate(snap.txn, id_arr)
            if not found.all():
                raise IdNotFoundError(f"Id {int(id_arr[~found][0])} is not in the store.")
            out = np.empty((len(id_arr), self.config.dim), dtype=np.float32)
            for seg in np.unique(segs).tolist():
                sel = segs == seg
                out[sel] = snap.view.segments[seg].take_vectors(rows[sel])[:, : self.config.dim]
        return out

    def search(self, queries: ArrayLike, k: int, *, probes: Probes, candidates: int | None,
               prune: bool | Literal["auto"], explain: bool, fill: bool = True, threads: int | None = None,
               kernel: str | None = None, device=None, rerank: int | None = None, where: str | None = None,
               table: bool = False, table_columns: list[str] | None = None):
        """Search (engine.py; with ``where``, filter.py). ``table``: return the results as
        one pyarrow Table (query, rank, id, score and the metadata ``table_columns``, None:
        all), read in the same snapshot as the search."""
        k = check_k(k)
        threads = check_threads(threads)
        kernel = default_kernel() if kernel is None else check_kernel(kernel)
        if device is not None:  # query/device.py imports torch: only for device searches
            from .query.device import check_device

            device = check_device(device)
        q = VectorSource(queries, dim=self.config.dim, what="queries")
        given = q.read_all(QUERY_BLOCK_ROWS)
        qs = np.ascontiguousarray(query_form(given, self.config.metric))
        if probes != "all":
            if isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) or probes < 1:
                raise InvalidArgumentError(f"probes must be a positive integer or 'all', got {probes!r}.")
            if candidates is not None and (not isinstance(candidates, (int, np.integer)) or candidates < 1):
                raise InvalidArgumentError(f"candidates must be a positive integer or None, got {candidates!r}.")
            if prune not in (True, False, "auto"):
                raise InvalidArgumentError(f"prune must be True, False or 'auto', got {prune!r}.")
            self.check_rerank(rerank, k, device)
        with self.snapshot() as snap:
            view = snap.view
            check_k_fits(k, len(qs), view.count)
            if table:
                table_columns = check_columns(table_columns, view.schema)
            plan = filtered = None
            if where is not None:
                filtered = self._filtered(snap.view, where)
                view = filtered.view.bound(snap.view.lookup_extents)
                plan = qfilter.plan(where, view.count, snap.view.count, probes, self.router.n_buckets,
                                    4 * self.config.stored_dim)
                probes = "all" if plan.plan == "exact" else plan.probes
            if probes != "all":
                opts = {"prune": prune, "threads": threads, "kernel": kernel, "device": device, "rerank": rerank}
                out = search_batch(view, self.router, qs, k, int(probes), candidates, explain=bool(explain), **opts)
                if candidates is None and fill:
                    self._probe_on(view, qs, k, int(probes), out, opts)
            else:
                out = search_exact(view, qs, k) if filtered is None else search_gathered(*filtered.gathered(), qs, k)
                if explain:
                    out += (self._exact_stats(view, len(qs), plan is not None),)
            if explain and plan is not None:
                out[2].plan = plan.to_dict()
            if self.config.metric == "l2":
                out = (out[0], l2_distances(given, out[1])) + tuple(out[2:])
            if table:
                return self._result_table(snap, out[0], out[1], table_columns)
            return (to_external(self.catalog, snap.txn, out[0]),) + tuple(out[1:])

    def _exact_stats(self, view: View, nq: int, filtered: bool) -> SearchStats:
        """What brute force read: every stored row, or with a filter its matching rows."""
        row_bytes = self.config.stored_dim * np.dtype(self.config.dtype).itemsize + 8
        rows = view.count if filtered else sum(r.n for r in view.segments.values())
        return SearchStats(np.full(nq, -1), np.full(nq, view.count), np.full(nq, rows * row_bytes), rows * row_bytes)

    def _filtered(self, view: View, where: str) -> qfilter.Filtered:
        """``where`` over ``view`` (checked first: a one-line error for a bad predicate),
        kept for the last few predicates of this generation: a filter costs a pass over
        its columns, and its exact plan a gather of its rows."""
        if not isinstance(where, str):
            qfilter.check_where(where, view.schema)  # raises
        key = (view.generation, where)
        hit = self._filters.get(key)
        if hit is None:
            hit = qfilter.Filtered(view, qfilter.check_where(where, view.schema))
            if len(self._filters) >= _FILTERS_KEPT:
                self._filters.pop(next(iter(self._filters)))
            self._filters[key] = hit
        return hit

    # -- metadata ------------------------------------------------------------------------

    def id_kind(self) -> str:
        """``"int"`` or ``"string"`` (asteria_store/ids.py); a store that holds nothing yet
        reports ``"int"`` (string ids are still open to it)."""
        with self.snapshot() as snap:
            return id_kind(self.catalog, snap.txn) or "int"

    def fetch(self, ids: ArrayLike, columns: list[str] | None, vectors: bool):
        """The rows of ``ids`` as a pyarrow Table: id, the ``columns`` asked (None: all),
        and their vectors if asked."""
        with self.snapshot() as snap:
            names = check_columns(columns, snap.view.schema)
            id_arr = to_internal(self.catalog, snap.txn, ids)
            found, segs, rows = self.catalog.locate(snap.txn, id_arr)
            if not found.all():
                raise IdNotFoundError(f"Id {int(id_arr[~found][0])} is not in the store.")
            return self._rows_table(snap, id_arr.astype(np.int64), segs, rows, names, vectors)

    def export(self, columns: list[str] | None, vectors: bool, batch_rows: int) -> Iterator:
        """Every live row as pyarrow RecordBatches of at most ``batch_rows`` rows (id, the
        ``columns`` asked, their vectors if asked), segment by segment, from ONE snapshot
        that stays pinned while the caller iterates."""
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer)) or batch_rows < 1:
            raise InvalidArgumentError(f"batch_rows must be a positive integer, got {batch_rows!r}.")
        with self.snapshot() as snap:  # checked now, not at the first batch
            check_columns(columns, snap.view.schema)
        return self._export(columns, vectors, int(batch_rows))

    def _export(self, columns: list[str] | None, vectors: bool, batch_rows: int) -> Iterator:
        with self.snapshot() as snap:
            view = snap.view
            names = check_columns(columns, view.schema)
            for seg, reader in sorted(view.segments.items()):
                live = view.live_mask(seg, 0, reader.n)
                rows = np.arange(reader.n) if live is None else np.flatnonzero(live)
                for s in range(0, len(rows), batch_rows):
                    block = rows[s : s + batch_rows]
                    ids = reader.take("ids", block).astype(np.int64)
                    table = self._rows_table(snap, ids, np.full(len(block), seg), block, names, vectors)
                    yield from table.combine_chunks().to_batches(max_chunksize=batch_rows)

    def _rows_table(self, snap: Snapshot, ids: np.ndarray, segs: np.ndarray, rows: np.ndarray, names: list[str],
                    vectors: bool):
        """Rows ``(segs, rows)`` of internal ``ids`` as a table: id (the store's kind), the
        metadata ``names``, vectors if asked."""
        import pyarrow as pa

        view = snap.view
        schema = [e for e in view.schema or [] if e["name"] in names]
        schema.sort(key=lambda e: names.index(e["name"]))
        pieces, order = [], []
        vecs = np.empty((len(ids), self.config.dim), dtype=np.float32) if vectors else None
        for seg in np.unique(segs).tolist():
            sel = np.flatnonzero(segs == seg)
            sel = sel[np.argsort(rows[sel], kind="stable")]
            reader = view.segments[seg]
            if schema:
                pieces.append(reader.take_columns(rows[sel], schema))
            order.append(sel)
            if vecs is not None:
                vecs[sel] = reader.take_vectors(rows[sel])[:, : self.config.dim]
        id_column = _id_column(to_external(self.catalog, snap.txn, ids))
        if pieces:  # (Arrow keeps no row count for a table without columns: id comes first)
            table = pa.concat_tables(pieces).take(np.argsort(np.concatenate(order), kind="stable"))
            table = table.add_column(0, "id", id_column)
        else:
            table = collib.null_table(len(ids), schema) if schema else pa.table({})
            table = pa.table({"id": id_column, **{c: table.column(c) for c in table.column_names}})
        if vecs is not None:
            flat = pa.array(vecs.reshape(-1), type=pa.float32())
            table = table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, self.config.dim))
        return table

    def results_table(self, ids: np.ndarray, scores: np.ndarray, columns: list[str] | None, first_query: int):
        """Results (Q, k) of an integer-id store found earlier (a batch job's) as a table,
        their metadata read now; ``query`` counts from ``first_query``."""
        import pyarrow as pa

        with self.snapshot() as snap:
            names = check_columns(columns, snap.view.schema)
            table = self._result_table(snap, np.asarray(ids, dtype=np.int64), scores, names)
        query = table.column("query").to_numpy() + np.int32(first_query)
        return table.set_column(0, "query", pa.array(query.astype(np.int32)))

    def contains(self, ids: ArrayLike) -> np.ndarray:
        """Which of the integer ``ids`` are live (a bool mask), from one snapshot."""
        with self.snapshot() as snap:
            return self.catalog.locate(snap.txn, as_id_array(ids))[0]

    def check_columns(self, columns: Any) -> list[str]:
        """:func:`check_columns` against the store's schema now."""
        with self.snapshot() as snap:
            return check_columns(columns, snap.view.schema)

    def _result_table(self, snap: Snapshot, ids: np.ndarray, scores: np.ndarray, names: list[str]):
        """Search results (Q, k) as a table of their real results: query, rank, id, score,
        and the metadata ``names`` of each row (read in the snapshot the search used)."""
        import pyarrow as pa

        q, rank = np.nonzero(ids >= 0)
        flat = ids[q, rank]
        if names:
            found, segs, rows = self.catalog.locate(snap.txn, flat.astype(np.uint64))
            table = self._rows_table(snap, flat, segs, rows, names, False)
        else:
            table = pa.table({"id": _id_column(to_external(self.catalog, snap.txn, flat))})
        table = table.add_column(0, "rank", pa.array(rank.astype(np.int32)))
        table = table.add_column(0, "query", pa.array(q.astype(np.int32)))
        return table.add_column(3, "score", pa.array(scores[q, rank].astype(np.float32)))

    def check_rerank(self, rerank, k: int, device=None) -> None:
        """``rerank`` is None, or an integer >= k on a store whose model has a sketch."""
        if rerank is None:
            return
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < k:
            raise InvalidArgumentError(f"rerank must be an integer >= k ({k}) or None, got {rerank!r}.")
        if device is not None:
            raise InvalidArgumentError("rerank runs on the CPU; search on a device without it.")
        lrsq = self.router.lrsq
        if lrsq is None or lrsq.sketch is None:
            raise InvalidArgumentError(
                "rerank needs a model with a sketch, and this store's model has none (trained with "
                "sketch=False, or by an older asteria-store). Search without rerank, or retrain the model.")

    def _probe_on(self, view: View, qs: np.ndarray, k: int, probes: int, out: tuple, opts: dict) -> None:
        """Queries whose probed buckets held fewer than ``k`` live rows, while the store holds
        at least ``k``, are searched again with twice the probes until they fill (or every
        bucket is probed); their rows of ``out`` are replaced in place. A query's result is
        then exactly the search at the probe count that filled it."""
        want = min(k, view.count)
        ids, scores = out[0], out[1]
        if want == 0 or ids[:, want - 1].min() >= 0:  # every query filled (the usual case)
            return
        n_buckets = self.router.n_buckets
        stats = out[2] if len(out) == 3 else None
        short = np.flatnonzero((ids >= 0).sum(axis=1) < want)
        while len(short) and probes < n_buckets:
            probes = min(2 * probes, n_buckets)
            more = search_batch(view, self.router, qs[short], k, probes, None, explain=stats is not None, **opts)
            ids[short], scores[short] = more[0], more[1]
            if stats is not None:
                for name in ("buckets", "scanned", "bytes_read", "pruned"):
                    mine, theirs = getattr(stats, name), getattr(more[2], name)
                    if mine is not None and theirs is not None:
                        mine[short] = theirs
                stats.batch_bytes += more[2].batch_bytes
            short = short[(more[0] >= 0).sum(axis=1) < want]


def _id_column(ids: np.ndarray):
    """Ids of either kind as an Arrow column (int64, or string)."""
    import pyarrow as pa

    return pa.array(ids, type=pa.string() if ids.dtype == object else pa.int64())


def check_columns(columns: Any, schema: list[dict] | None) -> list[str]:
    """The metadata column names asked for (None: all of ``schema``), each one known."""
    have = [e["name"] for e in schema or []]
    if columns is None:
        return have
    if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
        raise InvalidArgumentError(f"columns must be a list of column names, got {columns!r}.")
    for c in columns:
        if c not in have:
            raise InvalidArgumentError(f"Unknown column {c!r}; this store's columns are: "
                                       f"{', '.join(have) if have else 'none'}.")
    return list(dict.fromkeys(columns))


def check_k_fits(k: int, n_queries: int, count: int) -> None:
    """Refuse a ``k`` that asks for far more results than the store can return."""
    if k > max(count, _K_PAD_MAX):
        raise InvalidArgumentError(
            f"k={k:,} is more than the {count:,} vectors in the store can fill; at most "
            f"{max(count, _K_PAD_MAX):,} is allowed (results beyond the live count are -1)."
        )
    if n_queries * k * 12 > _RESULT_BYTES_MAX:
        raise InvalidArgumentError(
            f"{n_queries:,} queries x k={k:,} need {mib(n_queries * k * 12)} of results; search "
            "in smaller batches of queries or with a smaller k."
        )


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidArgumentError(f"k must be a positive integer, got {k!r}.")
    return int(k)


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


__all__ = ["ReadSide", "Snapshot", "as_id_array", "check_columns", "check_k", "check_k_fits", "mib"]
