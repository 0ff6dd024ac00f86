"""Query path: probe buckets in the router's order, prune with LRSQ bounds, rescore exactly.

The engine works on a :class:`View`: one consistent catalog snapshot (a generation) with
its live segments, tombstones and bucket extents. Final scores are exact inner products of
the (normalised) query with the stored vectors, read from memory-mapped chunks; LRSQ codes
(when the segment was encoded by the live router) only decide which rows need reading.

* :func:`search_batch`: a batch, bucket by bucket (each probed bucket read once for all its
  queries, one matrix product); a single query prunes over all its probed rows at once.
* :func:`search_exact`: brute force over every live row (``probes="all"``).

Budgets (per query):

* ``probes``: buckets visited, in the router's probe order. More probes raise recall and
  latency and bytes read; ``"all"`` scans every live row and is exactly brute force.
* ``candidates``: stop probing once this many rows are gathered. Caps latency on skewed
  buckets; ``None`` means no cap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np

try:
    import resource
except ImportError:  # not on Windows: search by sketch then always asks for its rows first
    resource = None

from ..storage.segments import SegmentReader
from . import native
from .table import BucketTable
from .kernels import error_scale, one_blas_thread, score_into

Probes = Union[int, Literal["all"]]

#: Default probe budget: the home bucket and its cheapest Hamming neighbours.
DEFAULT_PROBES = 32

#: Queries scored together against one window of rows in exact (probes="all") mode.
_QUERY_BLOCK = 256

#: Held while a view's bucket table is made (once per view).
_TABLE_LOCK = threading.Lock()


@dataclass
class View:
    """One consistent state of the store, as of catalog ``generation``."""

    generation: int
    count: int
    segments: dict[int, SegmentReader]
    deleted: dict[int, np.ndarray]
    lookup_extents: Callable[[int], list[tuple[int, int, int]]]
    #: Row ranges ``[start, end)`` (k, 2) of each segment that no bucket extent covers:
    #: rows a split moved to another segment, not live (like deleted rows).
    gaps: dict[int, np.ndarray] = field(default_factory=dict)
    #: What the LRSQ codes of this state's router are labelled with (codes_digest of the
    #: catalog's router record): codes labelled so are usable.
    codes_digest: str = ""
    #: The store's metadata columns (catalog schema entries, storage/columns.py); None: none.
    schema: list[dict] | None = None
    _extent_cache: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    #: The flat bucket table of one-query searches, made on first use (shared by bound copies).
    _tables: dict[tuple[int, int, int], BucketTable] = field(default_factory=dict)

    def bound(self, lookup_extents: Callable[[int], list[tuple[int, int, int]]]) -> View:
        """This view reading extents through ``lookup_extents`` (one read transaction),
        sharing its readers and extent cache."""
        view = object.__new__(View)
        view.__dict__.update(self.__dict__)
        view.lookup_extents = lookup_extents
        return view

    def extents(self, bucket: int) -> list[tuple[int, int, int]]:
        ext = self._extent_cache.get(bucket)
        if ext is None:
            ext = self._extent_cache[bucket] = self.lookup_extents(bucket)
        return ext

    def table(self, lrsq, n_buckets: int) -> BucketTable:
        """The view's flat bucket table for codes of ``lrsq`` and keys below ``n_buckets``
        (made on first use, its buckets added as queries probe them: a view never
        changes)."""
        shape = (lrsq.rank, lrsq.aux_width, 0 if lrsq.sketch is None else lrsq.sketch.m)
        table = self._tables.get(shape)
        if table is None:
            with _TABLE_LOCK:
                table = self._tables.get(shape)
                if table is None:
                    table = self._tables[shape] = BucketTable(self, *shape)
        return table.sized(n_buckets)

    def with_dead(self, deleted: dict[int, np.ndarray], count: int) -> View:
        """This state with the rows ``deleted`` (sorted, per segment) dead instead of its
        tombstones, ``count`` rows live (a filtered search's view: the rows that do not
        match are dead). It shares the extent cache; its bucket tables are its own."""
        return dataclasses.replace(self, deleted=deleted, count=count, _extent_cache=self._extent_cache, _tables={})

    def live_mask(self, seg: int, first: int, n: int) -> np.ndarray | None:
        """Boolean mask of live rows in ``[first, first + n)`` of ``seg`` (not deleted, not
        in a gap); None if all live."""
        mask = None
        dead = self.deleted.get(seg)
        if dead is not None and len(dead):
            lo, hi = np.searchsorted(dead, [first, first + n])
            if lo < hi:
                mask = np.ones(n, dtype=bool)
                mask[dead[lo:hi] - first] = False
        gaps = self.gaps.get(seg)
        if gaps is not None and len(gaps):
            lo = int(np.searchsorted(gaps[:, 1], first, side="right"))
            hi = int(np.searchsorted(gaps[:, 0], first + n, side="left"))
            for start, end in gaps[lo:hi].tolist():
                if mask is None:
                    mask = np.ones(n, dtype=bool)
                mask[max(start, first) - first : min(end, first + n) - first] = False
        return mask


def _merge(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int):
    """Merge candidate scores/ids (Q, m) into the running top-k (Q, k), best first.

    Equal scores are ordered by id (``-1``, "no result", last), so the result does not
    depend on the order in which rows arrive: batch and one-query searches agree.
    """
    return _sorted(*_select(np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1), k))


def _sorted(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (scores, ids) sorted best first, equal scores by id."""
    order = np.lexsort((_id_key(i), -s), axis=-1)
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def _id_key(ids: np.ndarray) -> np.ndarray:
    """Sort key of ids: ascending, with -1 ("no result") after every real id."""
    return np.where(ids < 0, np.iinfo(np.int64).max, ids)


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def search_exact(view: View, queries: np.ndarray, k: int,
                 rows: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over every live row (probes="all"): the reference result. ``rows``:
    over these rows of each segment only (ascending; a filter's matching rows)."""
    nq = len(queries)
    best_s, best_i = _empty(nq, k)
    for seg, reader in view.segments.items():
        step = reader.chunk_rows
        if rows is not None:
            mine = rows.get(seg)
            blocks = [] if mine is None else [mine[s : s + step] for s in range(0, len(mine), step)]
        else:
            blocks = range(0, reader.n, step)
        for block in blocks:
            if rows is not None:
                vecs = reader.take_vectors(block)
                ids = reader.take("ids", block).astype(np.int64)
            else:
                start, stop = block, min(reader.n, block + step)
                vecs = np.asarray(reader.vectors(start, stop), dtype=np.float32)
                ids = reader.ids(start, stop).astype(np.int64)
                mask = view.live_mask(seg, start, stop - start)
                if mask is not None:
                    vecs, ids = vecs[mask], ids[mask]
            if len(ids):
                _score_into(best_s, best_i, queries, vecs, ids, k)
    return best_i, best_s


def search_gathered(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    """Brute force over rows gathered in memory (float32 ``vectors`` (m, D), int64
    ``ids``): a filter's few matching rows. Same results as :func:`search_exact` over them."""
    best_s, best_i = _empty(len(queries), k)
    if len(ids):
        _score_into(best_s, best_i, queries, vectors, ids, k)
    return best_i, best_s


def _score_into(best_s: np.ndarray, best_i: np.ndarray, queries: np.ndarray, vecs: np.ndarray, ids: np.ndarray,
                k: int) -> None:
    """Merge the exact scores of rows ``vecs`` (ids ``ids``) into each query's top k."""
    for q0 in range(0, len(queries), _QUERY_BLOCK):
        q = queries[q0 : q0 + _QUERY_BLOCK]
        s = q @ vecs.T
        tile_i = np.broadcast_to(ids, s.shape)
        best_s[q0 : q0 + len(q)], best_i[q0 : q0 + len(q)] = _merge(
            best_s[q0 : q0 + len(q)], best_i[q0 : q0 + len(q)], s, tile_i, k
        )


@dataclass
class SearchStats:
    """What a probed search did, per query (``explain=True``).

    ``buckets``: buckets probed; ``scanned``: live rows scored exactly; ``bytes_read``: bytes
    of vectors and ids those rows occupy (what a one-query search reads). ``batch_bytes``:
    bytes the whole batch read, each probed bucket once however many queries shared it.
    """

    buckets: np.ndarray
    scanned: np.ndarray
    bytes_read: np.ndarray
    batch_bytes: int = 0
    #: Candidates whose LRSQ upper bound ruled them out: their full vector was not scored.
    pruned: np.ndarray | None = None
    #: A filtered search's plan (query/filter.py ``Plan.to_dict()``), None without a filter.
    plan: dict | None = None

    @classmethod
    def zeros(cls, nq: int) -> SearchStats:
        """Stats of ``nq`` queries that have done nothing yet (filled in block by block)."""
        return cls(*(np.zeros(nq, dtype=np.int64) for _ in range(3)), 0, np.zeros(nq, dtype=np.int64))

    def rows(self) -> list[dict]:
        pruned = self.pruned if self.pruned is not None else np.zeros(len(self.buckets), dtype=np.int64)
        extra = {} if self.plan is None else {"filter": self.plan}
        return [{"buckets": int(b), "scanned": int(c), "pruned": int(p), "bytes_read": int(r), **extra}
                for b, c, p, r in zip(self.buckets, self.scanned, pruned, self.bytes_read)]



def probe_order(router, queries: np.ndarray, probes: int) -> np.ndarray:
    """Bucket keys (Q, P) int64 each query probes first, in its probe order
    (``P = min(probes, buckets)``): vectorised where the router scores every bucket."""
    return router.probe_order(queries, probes)


def probe_order_chunked(router, queries: np.ndarray, probes: int, map_fn=None) -> np.ndarray:
    """:func:`probe_order` in fixed chunks of :data:`_PROBE_CHUNK` queries (``map_fn``:
    how the chunks are run, e.g. on threads). A product's rounding depends on its shape,
    so fixed chunks keep the probe order independent of threads and devices: every
    search path routes a query the same way."""
    starts = list(range(0, len(queries), _PROBE_CHUNK))
    parts = (map_fn or _serial)(lambda a: probe_order(router, queries[a : a + _PROBE_CHUNK], probes), starts)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _serial(fn, items: list) -> list:
    return [fn(it) for it in items]


def visits(view: View, keys: np.ndarray, candidates: int | None) -> np.ndarray:
    """Which of each query's probe keys (Q, P) are visited under the ``candidates`` budget:
    a bucket is visited while fewer than ``candidates`` rows (stored, deleted ones
    included) have been gathered before it."""
    if candidates is None:
        return np.ones(keys.shape, dtype=bool)
    uniq, inv = np.unique(keys, return_inverse=True)
    sizes = np.array([sum(e[2] for e in view.extents(int(key))) for key in uniq.tolist()], dtype=np.int64)
    sz = sizes[inv.reshape(keys.shape)]
    return np.cumsum(sz, axis=1) - sz < candidates


#: In a batch, a bucket probed by more queries than this is read and scored whole, without
#: LRSQ pruning: the survivors of that many queries cover most of its rows, so bounds would
#: save little reading and cost as much CPU as the exact product (docs/benchmarks.md).
PRUNE_GROUP_MAX = 4

#: A batch whose queries probe each bucket this many times or fewer on average (queries x
#: probes <= this x buckets) is searched query by query on the compiled one-query path:
#: scoring a bucket once for a few queries saves less than the batch passes' per-bucket
#: numpy work costs. Measured crossover (one thread, docs/benchmarks.md): at 8 queries per
#: bucket query by query ran 1.47x the batch passes, at 16 0.76x; at 3.9 (1M rows, 2,048
#: buckets, 8 probes) 3.7x, at 62 (wordnet, 2,000 queries, 32 probes) 0.34x.
EACH_MAX_SHARING = 12

#: Probe scores and per-query candidates held at once: a batch is searched in blocks of queries.
_BLOCK_CELLS = 1 << 22

#: Scores of probed rows held at once (pass 1 of a block; 4 bytes each).
_SCORE_CELLS = 1 << 24

#: Queries whose probe order is computed together (one product with every bucket's centroid).
_PROBE_CHUNK = 512


@dataclass
class BucketRows:
    """The live rows of one or more probed buckets, as slices of memory-mapped chunks."""

    parts: list[tuple[SegmentReader, int, int, np.ndarray | None]]  # reader, first, n, live rows
    ids: np.ndarray  # (m,) int64
    stored_bytes: int  # ids of every stored row (deleted ones too): read to find the live ones

    @classmethod
    def gather(cls, view: View, keys) -> BucketRows:
        parts, ids, nbytes = [], [], 0
        for key in keys:
            for seg, first, n in view.extents(key):
                reader = view.segments[seg]
                i = reader.read("ids", first, first + n)
                nbytes += i.nbytes
                live = view.live_mask(seg, first, n)
                if live is not None:
                    live = np.flatnonzero(live)
                    if len(live) == 0:
                        continue
                    i = i[live]
                parts.append((reader, first, n, live))
                ids.append(i)
        if len(ids) == 1:  # ids are < 2**63: the stored uint64 read as int64, no copy
            ids = ids[0].view(np.int64)
        else:
            ids = np.concatenate(ids).astype(np.int64) if ids else np.empty(0, dtype=np.int64)
        return cls(parts, ids, nbytes)

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored vector."""
        reader = self.parts[0][0]
        return reader.dim * reader.dtype.itemsize

    def usable_codes(self, digest: str) -> bool:
        """Whether every part has LRSQ codes encoded by the router with this digest."""
        return all(r.lrsq_meta is not None and r.lrsq_meta["model"] == digest for r, _, _, _ in self.parts)

    def _cat(self, array: str, dtype=None) -> np.ndarray:
        """``array``'s live rows of every part in one array (of ``dtype``: a copy)."""
        out = [r.read(array, first, first + n) if live is None else r.read(array, first, first + n)[live]
               for r, first, n, live in self.parts]
        if len(out) == 1:  # a view of the mapped chunk when no conversion is needed
            return out[0] if dtype is None or out[0].dtype == dtype else out[0].astype(dtype)
        return np.concatenate(out, dtype=dtype)  # several parts: gather (and widen) in one pass

    def vectors(self, sel: np.ndarray | None = None) -> np.ndarray:
        """float32 vectors of all live rows, or of the rows ``sel`` (indices into ``ids``),
        gathered with one indexing per segment chunk."""
        if sel is None:
            return self._cat("vectors", np.float32)
        sizes = np.array([n if live is None else len(live) for _, _, n, live in self.parts])
        offsets = np.cumsum(sizes) - sizes
        part = np.searchsorted(offsets, sel, side="right") - 1
        local = sel - offsets[part]
        firsts = np.array([first for _, first, _, _ in self.parts])
        rows = firsts[part] + local
        for p, (_, first, _, live) in enumerate(self.parts):
            if live is not None:  # deleted rows in this extent: map past them
                mine = part == p
                rows[mine] = first + live[local[mine]]
        readers = [r for r, _, _, _ in self.parts]
        if all(r is readers[0] for r in readers):
            return readers[0].take_vectors(rows)
        out = np.empty((len(sel), readers[0].dim), dtype=np.float32)
        which = np.array([id(r) for r in readers])[part]
        for r in {id(r): r for r in readers}.values():
            mine = which == id(r)
            out[mine] = r.take_vectors(rows[mine])
        return out

    def codes(self) -> tuple[np.ndarray, np.ndarray, int]:
        """LRSQ codes and aux of the live rows, and the bytes stored for all rows."""
        codes = self._cat("lrsq")
        aux = self._cat("lrsq_aux")
        nbytes = sum(n * (r.lrsq_meta["rank"] + 2 * r.lrsq_meta["aux"]) for r, _, n, _ in self.parts)
        return codes, aux, nbytes


def _select(s: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of ``s`` (Q, m) by score, equal scores by id (``ids``: (m,)
    or (Q, m); -1 only with score -inf): (Q, k) scores and ids, in no particular order,
    padded with -inf / -1. The order is total, so selecting from parts and then from the
    selections gives the same set as selecting from everything at once."""
    nq, m = s.shape
    ids = np.broadcast_to(ids, s.shape)
    if m <= k:
        out_s, out_i = _empty(nq, k)
        out_s[:, :m], out_i[:, :m] = s, ids
        return out_s, out_i
    part = np.argpartition(s, m - k, axis=1)[:, m - k :]
    sel_s = np.take_along_axis(s, part, axis=1)
    sel_i = np.take_along_axis(ids, part, axis=1)
    kth = sel_s.min(axis=1)
    ties = np.flatnonzero(((s >= kth[:, None]).sum(axis=1) > k) & np.isfinite(kth))
    for r in ties.tolist():  # more rows tie with the k-th score than fit: the smallest ids win
        o = np.lexsort((_id_key(ids[r]), -s[r]))[:k]
        sel_s[r], sel_i[r] = s[r, o], ids[r, o]
    return sel_s, sel_i


def search_batch(view: View, router, queries: np.ndarray, k: int, probes: int,
                 candidates: int | None, *, explain: bool = False, prune: bool | str = "auto",
                 threads: int = 1, kernel: str = "f32", device=None, rerank: int | None = None):
    """Probed search of a batch, bucket by bucket: each probed bucket is read ONCE and
    scored against all the queries that probe it with one matrix product. Same
    candidates, hence the same results, as searching each query alone.

    A block of queries is searched in three passes (:class:`_Block`): every probed bucket
    scored once; each query's threshold, the k-th score in its home bucket (its first
    probe), below which no row can enter its top k; the rows at or above the thresholds,
    from which each query's top k is selected. The passes run on ``threads`` threads
    (buckets split between them, each bucket one product of a fixed shape: the results do
    not depend on the thread count).

    ``prune`` (with LRSQ codes encoded by the view's router): a bucket's codes are read
    first; candidates whose certified upper bound is below the query's threshold are
    dropped without reading their full vector. Lossless. ``True`` prunes every bucket
    for the queries that probe it after their home bucket; ``"auto"`` a single query's buckets and, in a batch, buckets
    probed by at most :data:`PRUNE_GROUP_MAX` of its queries; ``False`` none.

    ``kernel``: how rows are scored (kernels.py); the results do not depend on it.
    ``device``: a torch device (not the CPU) to score on instead (device.py).
    ``rerank`` (a router whose LRSQ has a sketch): each query alone scores its probed rows
    from their sketch codes and rescores only its ``rerank`` best exactly (approximate:
    :func:`_search_sketched`); ``prune`` and ``kernel`` do not apply.

    Returns ``(ids, scores)``, plus :class:`SearchStats` with ``explain``.
    """
    if device is not None:
        from .device import search_batch_device

        return search_batch_device(view, router, queries, k, probes, candidates, device, explain=explain)
    compiled = router.compiled_routing() is not None
    if rerank is not None:
        with contextlib.nullcontext() if compiled else one_blas_thread():
            each = _search_each(view, router, router.lrsq, queries, k, probes, candidates, threads, rerank)
        if each is not None:
            return each if explain else each[:2]
    lrsq = router.lrsq if prune else None
    if lrsq is not None and (len(queries) == 1 or compiled and len(queries) * min(probes, router.n_buckets)
                             <= EACH_MAX_SHARING * router.n_buckets):
        # query by query; BLAS is used only to route where the routing is not compiled
        with contextlib.nullcontext() if compiled else one_blas_thread():
            each = _search_each(view, router, lrsq, queries, k, probes, candidates, threads)
        if each is not None:
            return each if explain else each[:2]
    with one_blas_thread():
        return _search_batch(view, router, queries, k, probes, candidates, explain, prune, threads, kernel)


def _search_batch(view: View, router, queries: np.ndarray, k: int, probes: int, candidates: int | None,
                  explain: bool, prune: bool | str, threads: int, kernel: str):
    nq = len(queries)
    lrsq = router.lrsq if prune else None
    group_max = nq if prune is True else PRUNE_GROUP_MAX
    stats = SearchStats.zeros(nq)
    best_i = np.empty((nq, k), dtype=np.int64)
    best_s = np.empty((nq, k), dtype=np.float32)
    n_buckets = router.n_buckets
    p = min(probes, n_buckets)
    # probe scores and candidates per query, and the scores of its probed rows (pass 1)
    block = min(_BLOCK_CELLS // max(n_buckets, p * k), _SCORE_CELLS // max(1, p * view.count // n_buckets))
    block = max(1, min(nq, block))
    pool = _pool(threads) if threads > 1 and nq >= _POOL_MIN_QUERIES else None
    for q0 in range(0, nq, block):
        q1 = min(nq, q0 + block)
        ctx = _Block(view, router, lrsq, queries[q0:q1], k, group_max, kernel, pool, threads)
        best_i[q0:q1], best_s[q0:q1] = ctx.search(probes, candidates, stats, q0)
    return (best_i, best_s, stats) if explain else (best_i, best_s)


#: What the compiled searches read of every probed row (asked for first: BucketTable.prefetch).
CODE_ARRAYS = ("ids", "lrsq", "lrsq_aux")
SKETCH_ARRAYS = ("sketch",)

#: Queries whose rows to rescore are asked for together in search by sketch (rerank).
RERANK_WINDOW = 32

#: Batches smaller than this run on the calling thread (a pool's hand-offs would cost more).
_POOL_MIN_QUERIES = 32


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` search threads, made on first use and shared by
    every search that asks for that many (they wait for its threads, so concurrent searches
    share the cores rather than oversubscribe them)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="asteria-search")


def group_by_bucket(keys: np.ndarray, visit: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The visited (query, probe) pairs of ``keys`` (Q, P) grouped by bucket:
    ``(bucket, queries probing it, whether it is their home bucket)``, by bucket key."""
    qi, pos = np.nonzero(visit)
    bk = keys[qi, pos]
    order = np.argsort(bk, kind="stable")
    qi, home, bk = qi[order], pos[order] == 0, bk[order]
    uniq, start = np.unique(bk, return_index=True)
    bounds = np.append(start, len(bk)).tolist()
    return [(int(b), qi[s:e], home[s:e]) for b, s, e in zip(uniq.tolist(), bounds[:-1], bounds[1:])]


@dataclass
class _Bucket:
    """One probed bucket of a block: its live rows and the queries probing it."""

    rows: BucketRows
    qs: np.ndarray
    home: np.ndarray  # bool per query of qs: this is its home bucket (first probe)
    pruned: bool  # the queries probing it later are pruned with LRSQ bounds, not scored
    scored: np.ndarray  # the queries scored in pass 1: all of qs, or its home queries if pruned
    at: int = 0  # where its scores (scored x rows, row-major) start in the block's buffer
    #: A pruned bucket's cost for its later queries: rows each kept, code bytes, rows read.
    cost: tuple[np.ndarray, int, int] | None = None

    @property
    def m(self) -> int:
        return len(self.rows.ids)

    @property
    def scored_home(self) -> np.ndarray:
        """Whether each scored query's home bucket this is."""
        return self.home[self.home] if self.pruned else self.home[: len(self.scored)]


class _Block:
    """One block of a batch, in three passes over its probed buckets (:func:`search_batch`):

    1. score every bucket against the queries probing it (one matrix product each, into
       one buffer); a bucket few queries probe is pruned with LRSQ bounds in pass 3
       instead, except for the queries whose home bucket it is;
    2. each query's threshold: the k-th best score in its home bucket (no row below it
       can be in its top k, which holds those k rows or better ones);
    3. the rows at or above their queries' thresholds, in one pass over the buffer (and
       the survivors of the pruned buckets); each query's top k is selected from those.
    """

    def __init__(self, view: View, router, lrsq, queries: np.ndarray, k: int, group_max: int,
                 kernel: str, pool: ThreadPoolExecutor | None, threads: int):
        self.view, self.router, self.lrsq = view, router, lrsq
        self.queries, self.k, self.group_max, self.kernel = queries, k, group_max, kernel
        self.pool, self.threads = pool, threads

    @functools.cached_property
    def qy(self) -> np.ndarray:
        """Rotated queries (LRSQ bounds), computed when a bucket is pruned."""
        return self.router.rotate(self.queries)

    @functools.cached_property
    def qerr(self) -> np.ndarray:
        """Per query, an approximate kernel's score error per unit row norm."""
        return error_scale(self.kernel, self.queries)

    def search(self, probes: int, candidates: int | None, stats: SearchStats, q0: int):
        nq, k = len(self.queries), self.k
        keys = probe_order_chunked(self.router, self.queries, probes, self._map)
        visit = visits(self.view, keys, candidates)
        stats.buckets[q0 : q0 + nq] = visit.sum(axis=1)
        buckets = [self._bucket(*g) for g in group_by_bucket(keys, visit)]
        scores, err = self._score(buckets)
        pairs = _Pairs(buckets)
        thr = self._thresholds(pairs, scores, err)
        found = [self._above(pairs, scores, err, thr, buckets)]
        found += self._map(lambda b: self._prune(b, thr), [b for b in buckets if b.pruned and b.m])
        self._count(buckets, stats, q0)
        q, s, i = (np.concatenate([f[n] for f in found]) for n in range(3))
        return top_per_query(q, s, i, nq, k)

    def _map(self, fn, items: list) -> list:
        """``fn`` of every item, in order; on the pool's threads in chunks."""
        if self.pool is None or len(items) < 2:
            return _serial(fn, items)
        n = min(len(items), 8 * self.threads)
        edges = np.linspace(0, len(items), n + 1).astype(int).tolist()
        out = []
        for part in self.pool.map(lambda a, b: [fn(it) for it in items[a:b]], edges[:-1], edges[1:]):
            out.extend(part)
        return out

    def _bucket(self, bucket: int, qs: np.ndarray, home: np.ndarray) -> _Bucket:
        rows = BucketRows.gather(self.view, [bucket])
        pruned = (self.lrsq is not None and len(qs) <= self.group_max and len(rows.ids) > 0
                  and rows.usable_codes(self.view.codes_digest))
        scored = qs[home] if pruned else qs if len(rows.ids) else qs[:0]
        return _Bucket(rows, qs, home, pruned, scored)

    def _score(self, buckets: list[_Bucket]) -> tuple[np.ndarray, np.ndarray | None]:
        """Pass 1: every bucket's scores in one buffer, and (an approximate kernel) a bound
        of each bucket's score errors per unit query error (its largest row norm)."""
        at = 0
        for b in buckets:
            b.at = at
            at += len(b.scored) * b.m
        out = np.empty(at, dtype=np.float32)
        err = np.zeros(len(buckets), dtype=np.float32) if self.kernel != "f32" else None

        def one(j: int) -> None:
            b = buckets[j]
            if b.m and len(b.scored):
                vn = score_into(self.kernel, self.queries[b.scored], b.rows.vectors(),
                                out[b.at : b.at + len(b.scored) * b.m].reshape(len(b.scored), b.m))
                if err is not None:
                    err[j] = vn

        self._map(one, list(range(len(buckets))))
        return out, err

    def _thresholds(self, pairs: _Pairs, scores: np.ndarray, err: np.ndarray | None) -> np.ndarray:
        """Pass 2: each query's k-th best score in its home bucket, or a lower bound of it
        (an approximate kernel); -inf where that bucket holds fewer than k rows."""
        nq, k = len(self.queries), self.k
        thr = np.full(nq, -np.inf, dtype=np.float32)
        hp = np.flatnonzero(pairs.home)
        width = int(pairs.length[hp].max(initial=0))
        if width < k:
            return thr
        col = np.arange(width)
        idx = np.minimum(pairs.start[hp, None] + col, len(scores) - 1)
        hs = np.where(col < pairs.length[hp, None], scores[idx], np.float32(-np.inf))
        if err is not None:
            hs -= (self.qerr[pairs.q[hp]] * err[pairs.bucket[hp]])[:, None]
        thr[pairs.q[hp]] = np.partition(hs, width - k, axis=1)[:, width - k]
        return thr

    def _above(self, pairs: _Pairs, scores: np.ndarray, err: np.ndarray | None, thr: np.ndarray,
               buckets: list[_Bucket]):
        """Pass 3: ``(query, score, id)`` of every scored row at or above its query's
        threshold (an approximate kernel: within its error of it, then rescored exactly)."""
        t = thr[pairs.q]
        if err is not None:
            t = t - self.qerr[pairs.q] * err[pairs.bucket]
        idx = np.flatnonzero(scores >= np.repeat(t, pairs.length))
        p = np.searchsorted(pairs.start, idx, side="right") - 1
        col = idx - pairs.start[p]
        q, s = pairs.q[p], scores[idx]
        bj = pairs.bucket[p]
        i = np.concatenate([b.rows.ids for b in buckets] or [_NONE_Q])[pairs.ids_at[bj] + col]
        if err is not None:  # exact scores of the candidates, bucket by bucket
            edges = np.flatnonzero(np.diff(bj, prepend=-1, append=-1)).tolist()
            s = np.concatenate([_NONE_S] + [
                np.einsum("ij,ij->i", self.queries[q[a:z]], buckets[bj[a]].rows.vectors()[col[a:z]])
                for a, z in itertools.pairwise(edges)])
            keep = s >= thr[q]
            q, s, i = q[keep], s[keep], i[keep]
        return q, s, i

    def _prune(self, b: _Bucket, thr: np.ndarray):
        """Pass 3 for a pruned bucket's later queries: LRSQ bounds first, then exact scores
        of the rows whose upper bound reaches the query's threshold; ``(q, s, i)`` of those
        at or above it. Sets what those queries read and how many rows were pruned."""
        rows, m = b.rows, b.m
        later = b.qs[~b.home]
        t = thr[later]
        codes, aux, code_bytes = rows.codes()
        _, lo, hi = self.lrsq.estimate(self.qy[later], codes, aux)
        if m >= self.k:  # k rows of this bucket score at least their k-th lower bound
            t = np.maximum(t, np.partition(lo, m - self.k, axis=1)[:, m - self.k])
        survive = hi >= t[:, None]
        keep = np.flatnonzero(survive.any(axis=0))
        own = survive.sum(axis=1)
        s = self.queries[later] @ rows.vectors(keep).T
        r, c = np.nonzero(survive[:, keep] & (s >= t[:, None]))
        b.cost = (own, code_bytes, len(keep))
        return later[r], s[r, c], rows.ids[keep[c]]

    @staticmethod
    def _count(buckets: list[_Bucket], stats: SearchStats, q0: int) -> None:
        """Add the block's rows scanned, bytes read and rows pruned to ``stats``."""
        n = np.array([len(b.qs) for b in buckets], dtype=np.int64)
        m = np.array([b.m for b in buckets], dtype=np.int64)
        whole = np.array([b.rows.stored_bytes + (b.m * b.rows.row_bytes if b.m else 0) for b in buckets],
                         dtype=np.int64)
        read, pruned = np.repeat(whole, n), np.zeros(int(n.sum()), dtype=np.int64)
        batch = whole.copy()
        starts = np.cumsum(n) - n
        for j in [j for j, b in enumerate(buckets) if b.cost is not None]:
            b = buckets[j]
            own, code_bytes, kept = b.cost
            at = starts[j] + np.flatnonzero(~b.home)
            read[at] = b.rows.stored_bytes + code_bytes + own * b.rows.row_bytes
            pruned[at] = b.m - own
            batch[j] = b.rows.stored_bytes + code_bytes + (b.m if b.home.any() else kept) * b.rows.row_bytes
        qs = np.concatenate([b.qs for b in buckets] or [_NONE_Q]) + q0
        size = len(stats.scanned)
        stats.scanned += np.bincount(qs, weights=np.repeat(m, n), minlength=size).astype(np.int64)
        stats.bytes_read += np.bincount(qs, weights=read, minlength=size).astype(np.int64)
        stats.pruned += np.bincount(qs, weights=pruned, minlength=size).astype(np.int64)
        stats.batch_bytes += int(batch.sum())


class _Pairs:
    """The (query, bucket) pairs scored in pass 1, in buffer order: query, bucket index,
    whether it is the query's home bucket, where its scores start and how many there are;
    and where each bucket's ids start in the block's concatenated ids."""

    def __init__(self, buckets: list[_Bucket]):
        n = [len(b.scored) for b in buckets]
        m = np.array([b.m for b in buckets], dtype=np.int64)
        self.q = np.concatenate([b.scored for b in buckets] or [_NONE_Q])
        self.bucket = np.repeat(np.arange(len(buckets)), n)
        self.home = np.concatenate([b.scored_home for b in buckets] or [np.zeros(0, bool)])
        self.length = m[self.bucket]
        self.start = np.repeat(np.array([b.at for b in buckets], dtype=np.int64), n) + (
            np.arange(len(self.q)) - np.repeat(np.cumsum(n) - n, n)) * self.length
        self.ids_at = np.cumsum(m) - m


_NONE_Q = np.empty(0, dtype=np.int64)
_NONE_S = np.empty(0, dtype=np.float32)


def top_per_query(q: np.ndarray, s: np.ndarray, i: np.ndarray, nq: int, k: int):
    """The k best (score desc, id asc) of each query's candidates ``(q, s, i)``, best
    first: (nq, k) ids and scores, padded with -1 / -inf."""
    key = (q.astype(np.uint64) << np.uint64(32)) | _descending(s).astype(np.uint64)
    order = np.argsort(key)
    if len(key) > 1 and (np.diff(key[order]) == 0).any():  # equal scores: by id
        order = np.lexsort((i, key))
    q, s, i = q[order], s[order], i[order]
    rank = np.arange(len(q)) - np.searchsorted(q, q)
    keep = rank < k
    out_s, out_i = _empty(nq, k)
    out_s[q[keep], rank[keep]] = s[keep]
    out_i[q[keep], rank[keep]] = i[keep]
    return out_i, out_s


def _descending(s: np.ndarray) -> np.ndarray:
    """uint32 keys of float32 scores, ascending as the scores descend (equal scores,
    -0.0 and 0.0 included, get equal keys)."""
    b = (np.asarray(s, dtype=np.float32) + np.float32(0)).view(np.uint32)
    up = np.where(b >> np.uint32(31), ~b, b | np.uint32(0x80000000))  # ascending with s
    return ~up


def _search_each(view: View, router, lrsq, queries: np.ndarray, k: int, probes: int,
                 candidates: int | None, threads: int, rerank: int | None = None):
    """Each query alone with LRSQ pruning over ALL its probed rows at once, in one compiled
    call (native.py): bounds of every probed row from its codes, one threshold (the k-th
    best lower bound), exact rescoring of the survivors and the top k. Same results as the
    batch passes (both lossless). Several queries run on ``threads`` threads (the compiled
    calls release the GIL); their routes and the bucket table are made first, on the
    calling thread, whose read transaction holds the extents. Returns ``(ids, scores,
    stats)``; None when a probed segment has no usable codes (the caller falls back).
    With ``rerank``, each query is :func:`_search_sketched` instead."""
    routes = [_route(router, q, probes) for q in queries]
    table = view.table(lrsq, router.n_buckets)
    nq = len(queries)
    pool = _pool(threads) if threads > 1 and nq >= _POOL_MIN_QUERIES else None
    if pool is not None:  # one query alone adds its buckets on a miss instead (no numpy check first)
        table.ready(view, np.concatenate([r[0] for r in routes]))

    def part(a: int, b: int) -> list:
        if rerank is not None:
            return _search_sketched(view, router, table, routes[a:b], queries[a:b], k, candidates, rerank)
        return [_search_routed(view, lrsq, table, *routes[i], queries[i], k, candidates) for i in range(a, b)]

    edges = np.linspace(0, nq, (8 * threads if pool else 1) + 1).astype(int).tolist()
    parts = pool.map(part, edges[:-1], edges[1:]) if pool else [part(0, nq)]
    outs = [o for p in parts for o in p]
    if any(o is None for o in outs):
        return None
    if nq == 1:
        return outs[0]
    ids, scores = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
    stats = SearchStats(*(np.concatenate([getattr(o[2], name) for o in outs])
                          for name in ("buckets", "scanned", "bytes_read")),
                        sum(o[2].batch_bytes for o in outs), np.concatenate([o[2].pruned for o in outs]))
    return ids, scores, stats


def _route(router, query: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's probe keys and rotation: compiled where the router allows it."""
    routing = router.compiled_routing()
    if routing is not None:
        return native.route(routing, query, probes)
    return (np.ascontiguousarray(probe_order(router, query[None, :], probes)[0]),
            router.rotate(query[None, :])[0])


def _search_routed(view: View, lrsq, table: BucketTable, keys: np.ndarray, qy: np.ndarray,
                   query: np.ndarray, k: int, candidates: int | None):
    """The compiled search of one routed query: ``(ids (1, k), scores (1, k), stats)``;
    None where a probed segment has no usable codes. Buckets not in ``table`` yet are
    added (reading extents: on the thread of ``view``'s read transaction only)."""
    terms = lrsq.query_terms(qy)
    ids, scores, st = _compiled_search(view, table, keys, CODE_ARRAYS,
                                       lambda: native.search_one(table, keys, candidates, terms, query, k))
    if st[native.UNUSABLE]:
        return None
    m, kept = int(st[native.ROWS]), int(st[native.KEPT])
    return ids[None, :], scores[None, :], _one_query_stats(st, m * (8 + lrsq.bytes_per_vector) + kept * _row_bytes(view))


def _compiled_search(view: View, table: BucketTable, keys: np.ndarray, arrays: tuple[str, ...], call):
    """Run ``call`` (a compiled search over the buckets ``keys`` of ``table``, returning its
    stats array last) after asking for ``arrays`` of those buckets (BucketTable.prefetch);
    where a bucket was not in the table yet, add it (on the thread of ``view``'s read
    transaction only) and run it again. Raises the error of a chunk it could not read."""
    table.prefetch(view, keys, arrays)
    out = call()
    if out[-1][native.MISSING]:  # buckets this view has not probed before
        table.ready(view, keys)
        table.prefetch(view, keys, arrays)
        out = call()
    _raise_unreadable(view, table, out[-1])
    return out


def _one_query_stats(st: np.ndarray, nbytes: int) -> SearchStats:
    """SearchStats of one compiled search from its stats array and the bytes it read."""
    m = int(st[native.ROWS])
    return SearchStats(np.array([st[native.VISITED]]), np.array([m]), np.array([nbytes]), nbytes,
                       np.array([m - int(st[native.KEPT])]))


def _search_sketched(view: View, router, table: BucketTable, routes: list, queries: np.ndarray, k: int,
                     candidates: int | None, rerank: int) -> list:
    """Routed queries, approximate, as :func:`_search_routed` returns each: every probed row
    scored from its sketch codes (model/sketch.py: ``m`` bytes a row, the only bytes read
    for most rows), the ``rerank`` best rescored exactly from their vectors, and the top k
    of those. The rows to rescore of :data:`RERANK_WINDOW` queries at a time are asked for
    together first, so that a store larger than RAM reads them in parallel, while the
    last window searched on this table read from storage (``table.rescore_reads``): asking
    costs ~2 us a page, more than the rescoring of a window whose pages are all cached.
    None for a query where a probed chunk has no sketch codes."""
    sketch = router.lrsq.sketch
    row_bytes = 8 + _row_bytes(view)
    out = []
    for w in range(0, len(queries), RERANK_WINDOW):
        reads = _device_reads()
        ask = table.rescore_reads or reads is None
        found = []
        for (keys, qy), query in zip(routes[w : w + RERANK_WINDOW], queries[w : w + RERANK_WINDOW]):
            centers = router.centers(keys)
            offsets = np.zeros(len(keys), np.float32) if centers is None else sketch.offsets(query, centers)
            slots, rows, st = _compiled_search(
                view, table, keys, SKETCH_ARRAYS,
                lambda: native.sketch_candidates(table, keys, candidates, sketch, qy, offsets, rerank))
            found.append(None if st[native.UNUSABLE] else (slots, rows, st))
            if found[-1] is not None and ask:
                table.will_need(view, slots, rows)
        for query, got in zip(queries[w : w + RERANK_WINDOW], found):
            if got is None:
                out.append(None)
                continue
            slots, rows, st = got
            ids, scores = native.rescore(table, slots, rows, query, k)
            nbytes = int(st[native.ROWS]) * sketch.m + len(rows) * row_bytes
            out.append((ids[None, :], scores[None, :], _one_query_stats(st, nbytes)))
        if reads is not None:
            table.rescore_reads = _device_reads() > reads
    return out


def _device_reads() -> int | None:
    """512-byte blocks this thread has read from storage (Linux: its I/O accounting, the
    ``read_bytes`` of ``/proc/thread-self/io``), in ~1 us; None where unknown."""
    if _RUSAGE_THREAD is None:
        return None
    return resource.getrusage(_RUSAGE_THREAD).ru_inblock


_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None) if resource is not None else None


def _raise_unreadable(view: View, table: BucketTable, st: np.ndarray) -> None:
    """Raise the read error of the chunk a compiled search found unreadable, if any."""
    if st[native.UNREADABLE]:
        seg, ch = table.chunk_of(int(st[native.UNREADABLE]) - 1)
        reader = view.segments[seg]
        for name in reader.arrays:
            reader.chunk(name, ch)  # raises the chunk's own error


def _row_bytes(view: View) -> int:
    """Bytes of one stored vector."""
    r = next(iter(view.segments.values()))
    return r.dim * r.dtype.itemsize
