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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np

from ..storage.segments import SegmentReader

Probes = Union[int, Literal["all"]]

#: Default probe budget: the home bucket and its cheapest Hamming neighbours.
DEFAULT_PROBES = 32

#: Queries scored together against one window of rows in exact (probes="all") mode.
_QUERY_BLOCK = 256


@dataclass
class View:
    """One consistent state of the store, as of catalog ``generation``."""

    generation: int
    count: int
    segments: dict[int, SegmentReader]
    deleted: dict[int, np.ndarray]
    lookup_extents: Callable[[int], list[tuple[int, int, int]]]
    #: Digest of the router that routed this state: LRSQ codes encoded by it are usable.
    router_digest: str = ""
    _extent_cache: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)

    def extents(self, bucket: int) -> list[tuple[int, int, int]]:
        ext = self._extent_cache.get(bucket)
        if ext is None:
            ext = self._extent_cache[bucket] = self.lookup_extents(bucket)
        return ext

    def live_mask(self, seg: int, first: int, n: int) -> np.ndarray | None:
        """Boolean mask of live rows in ``[first, first + n)`` of ``seg``; None if all live."""
        dead = self.deleted.get(seg)
        if dead is None or len(dead) == 0:
            return None
        lo, hi = np.searchsorted(dead, [first, first + n])
        if lo == hi:
            return None
        mask = np.ones(n, dtype=bool)
        mask[dead[lo:hi] - first] = False
        return mask


def _merge(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int):
    """Merge candidate scores/ids (Q, m) into the running top-k (Q, k), best first.

    Equal scores are ordered by id (``-1``, "no result", last), so the result does not
    depend on the order in which rows arrive: batch and one-query searches agree.
    """
    all_s = np.concatenate([best_s, s], axis=1)
    all_i = np.concatenate([best_i, i], axis=1)
    if all_s.shape[1] > k:
        part = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(all_s, part, axis=1).min(axis=1)
        ties = np.flatnonzero((all_s >= kth[:, None]).sum(axis=1) > k)
        sel_s = np.take_along_axis(all_s, part, axis=1)
        sel_i = np.take_along_axis(all_i, part, axis=1)
        for r in ties:  # more rows tie with the k-th score than fit: the smallest ids win
            o = np.lexsort((_id_key(all_i[r]), -all_s[r]))[:k]
            sel_s[r], sel_i[r] = all_s[r, o], all_i[r, o]
        all_s, all_i = sel_s, sel_i
    order = np.lexsort((_id_key(all_i), -all_s), axis=-1)
    return np.take_along_axis(all_s, order, axis=1), np.take_along_axis(all_i, order, axis=1)


def _id_key(ids: np.ndarray) -> np.ndarray:
    """Sort key of ids: ascending, with -1 ("no result") after every real id."""
    return np.where(ids < 0, np.iinfo(np.int64).max, ids)


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def search_exact(view: View, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over every live row (probes="all"): the reference result."""
    nq = len(queries)
    best_s, best_i = _empty(nq, k)
    for seg, reader in view.segments.items():
        step = reader.chunk_rows
        for start in range(0, reader.n, step):
            stop = min(reader.n, start + step)
            vecs = np.asarray(reader.vectors(start, stop), dtype=np.float32)
            ids = reader.ids(start, stop).astype(np.int64)
            mask = view.live_mask(seg, start, stop - start)
            if mask is not None:
                vecs, ids = vecs[mask], ids[mask]
            if len(ids) == 0:
                continue
            for q0 in range(0, nq, _QUERY_BLOCK):
                q = queries[q0 : q0 + _QUERY_BLOCK]
                s = q @ vecs.T
                tile_i = np.broadcast_to(ids, s.shape)
                best_s[q0 : q0 + len(q)], best_i[q0 : q0 + len(q)] = _merge(
                    best_s[q0 : q0 + len(q)], best_i[q0 : q0 + len(q)], s, tile_i, k
                )
    return best_i, best_s


def probed_buckets(view: View, probe_keys, probes: int, candidates: int | None) -> list[int]:
    """The first ``probes`` bucket keys of ``probe_keys``, stopping once ``candidates``
    rows (stored, deleted ones included) have been gathered."""
    out: list[int] = []
    total = 0
    for visited, key in enumerate(probe_keys):
        if visited >= probes or (candidates is not None and total >= candidates):
            break
        out.append(key)
        if candidates is not None:
            total += sum(ext[2] for ext in view.extents(key))
    return out


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

    def rows(self) -> list[dict]:
        pruned = self.pruned if self.pruned is not None else np.zeros(len(self.buckets), dtype=np.int64)
        return [{"buckets": int(b), "scanned": int(c), "pruned": int(p), "bytes_read": int(r)}
                for b, c, p, r in zip(self.buckets, self.scanned, pruned, self.bytes_read)]


def search_batch(view: View, router, queries: np.ndarray, k: int, probes: int,
                 candidates: int | None, *, explain: bool = False, prune: bool = True):
    """Probed search of a batch, bucket by bucket: each probed bucket is read ONCE and
    scored against all the queries that probe it with one matrix product; per-query top-k
    are merged as buckets arrive (in order of first probe, so thresholds tighten early).
    Same candidates, hence the same results, as searching each query alone.

    With ``prune`` and LRSQ codes encoded by the view's router, a bucket's codes are read
    first: candidates whose certified upper bound is below the query's threshold (its
    current k-th best exact score, or the bucket's k-th best lower bound) are dropped
    without reading their full vector; the others are rescored exactly. Lossless: the
    result equals exact scoring of every probed candidate.

    Returns ``(ids, scores)``, plus :class:`SearchStats` with ``explain``.
    """
    nq = len(queries)
    lrsq = getattr(router, "lrsq", None) if prune else None
    if nq == 1 and lrsq is not None:
        fast = _search_one_pruned(view, router, lrsq, queries[0], k, probes, candidates)
        if fast is not None:
            ids, scores, stats = fast
            return (ids, scores, stats) if explain else (ids, scores)
    best_s, best_i = _empty(nq, k)
    probe_rows = router.probe_input(queries)
    groups: dict[int, list[int]] = {}
    first_probe: dict[int, int] = {}
    n_buckets = np.zeros(nq, dtype=np.int64)
    for qi in range(nq):
        keys = probed_buckets(view, router.probe_keys(probe_rows[qi]), probes, candidates)
        n_buckets[qi] = len(keys)
        for pos, key in enumerate(keys):
            groups.setdefault(key, []).append(qi)
            first_probe[key] = min(pos, first_probe.get(key, pos))
    qy = router.rotate(queries) if lrsq is not None else None
    scanned = np.zeros(nq, dtype=np.int64)
    pruned = np.zeros(nq, dtype=np.int64)
    bytes_read = np.zeros(nq, dtype=np.int64)
    batch_bytes = 0
    for key in sorted(groups, key=first_probe.__getitem__):
        qs = np.asarray(groups[key])
        for seg, first, n in view.extents(key):
            reader = view.segments[seg]
            ids = np.asarray(reader.ids(first, first + n)).astype(np.int64)
            nbytes = ids.nbytes
            live = view.live_mask(seg, first, n)
            local = np.arange(n) if live is None else np.flatnonzero(live)
            if len(local) == 0:
                continue
            meta = reader.lrsq_meta
            usable = lrsq is not None and meta is not None and meta["model"] == view.router_digest
            row_bytes = reader.dim * reader.dtype.itemsize
            if usable:
                codes, aux = reader.lrsq(first, first + n)
                nbytes += codes.nbytes + aux.nbytes
                _, lo, hi = lrsq.estimate(qy[qs], np.asarray(codes)[local], np.asarray(aux)[local])
                thr = best_s[qs, k - 1]
                if len(local) >= k:
                    thr = np.maximum(thr, np.partition(lo, len(local) - k, axis=1)[:, len(local) - k])
                survive = hi >= thr[:, None]
                keep = survive.any(axis=0)
                pruned[qs] += (~survive).sum(axis=1)
                rows = local[keep]
                survive = survive[:, keep]
            else:
                rows, survive = local, None
            vecs = np.asarray(reader.vectors(first, first + n)[rows], dtype=np.float32)
            # the batch reads the union of the group's survivors; one query, its own
            batch_bytes += nbytes + len(rows) * row_bytes
            own = len(rows) if survive is None else survive.sum(axis=1)
            bytes_read[qs] += nbytes + own * row_bytes
            scanned[qs] += len(local)
            if len(rows) == 0:
                continue
            s = queries[qs] @ vecs.T
            cand = np.broadcast_to(ids[rows], s.shape)
            if survive is not None:  # a query's pruned candidates cannot be in its top k
                s = np.where(survive, s, -np.inf).astype(np.float32)
                cand = np.where(survive, cand, -1)
            best_s[qs], best_i[qs] = _merge(best_s[qs], best_i[qs], s, cand, k)
    if explain:
        return best_i, best_s, SearchStats(n_buckets, scanned, bytes_read, batch_bytes, pruned)
    return best_i, best_s


def _search_one_pruned(view: View, router, lrsq, query: np.ndarray, k: int, probes: int,
                       candidates: int | None):
    """One query with LRSQ pruning over ALL its probed rows at once: one bound estimate,
    one threshold (the k-th best lower bound), one exact rescoring of the survivors.
    Same result as the bucket-by-bucket path (both lossless), far fewer numpy calls.
    None when a probed segment has no usable codes (the caller falls back)."""
    keys = probed_buckets(view, router.probe_keys(router.probe_input(query[None, :])[0]), probes, candidates)
    parts, codes, aux, ids = [], [], [], []
    nbytes = 0
    for key in keys:
        for seg, first, n in view.extents(key):
            reader = view.segments[seg]
            meta = reader.lrsq_meta
            if meta is None or meta["model"] != view.router_digest:
                return None
            live = view.live_mask(seg, first, n)
            local = np.arange(n) if live is None else np.flatnonzero(live)
            c, a = reader.lrsq(first, first + n)
            i = reader.ids(first, first + n)
            nbytes += c.nbytes + a.nbytes + i.nbytes
            if len(local) == 0:
                continue
            parts.append((reader, first, n, local))
            codes.append(np.asarray(c)[local])
            aux.append(np.asarray(a)[local])
            ids.append(np.asarray(i)[local].astype(np.int64))
    best_s, best_i = _empty(1, k)
    total = sum(len(p[3]) for p in parts)
    if total == 0:
        return best_i, best_s, SearchStats(np.array([len(keys)]), np.array([0]), np.array([nbytes]),
                                           nbytes, np.array([0]))
    _, lo, hi = lrsq.estimate(router.rotate(query[None, :]), np.concatenate(codes), np.concatenate(aux))
    thr = np.partition(lo[0], total - k)[total - k] if total >= k else -np.inf
    survive = hi[0] >= thr
    vec_parts, start = [], 0
    for reader, first, n, local in parts:
        mine = local[survive[start : start + len(local)]]
        start += len(local)
        if len(mine):
            vec_parts.append(np.asarray(reader.vectors(first, first + n)[mine], dtype=np.float32))
            nbytes += len(mine) * reader.dim * reader.dtype.itemsize
    vecs = np.concatenate(vec_parts)
    s = (vecs @ query)[None, :]
    best_s, best_i = _merge(best_s, best_i, s, np.concatenate(ids)[survive][None, :], k)
    stats = SearchStats(np.array([len(keys)]), np.array([total]), np.array([nbytes]), nbytes,
                        np.array([int((~survive).sum())]))
    return best_i, best_s, stats
