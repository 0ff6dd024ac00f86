"""The batch path on a torch device (a GPU): ``Store.search(..., device="cuda")``.

Routing is the CPU path's: probe order is computed on the host, in the same chunks of
queries, so a query probes the same buckets. The probed buckets are then streamed to the
device in large groups (one host gather and one copy per group of up to
:data:`GROUP_ROWS` rows), and on the device each bucket is scored against the queries
that probe it with one float32 product. Every probed row is scored: LRSQ pruning saves
host CPU and reads, neither of which the device spends. Each bucket keeps the k best
rows of each of its queries (equal scores by id: a bucket's rows are ordered by id and
sorted stably), and each query's top k is selected from those, by (score, id) as well.

Scores are float32 products with float32 accumulation (TF32 is turned off for the
search), so results equal the CPU path's up to float rounding: rows whose scores differ
in the last bits may swap.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import InvalidArgumentError
from .engine import BucketRows, SearchStats, group_by_bucket, probe_order_chunked, top_per_query, visits

#: Rows of probed buckets gathered on the host and sent to the device at once
#: (float32 at dimension 384: 384 MiB).
GROUP_ROWS = 1 << 18

#: Candidates (query, score, id) held on the device per block of queries.
_BLOCK_CANDIDATES = 1 << 25


def check_device(device):
    """``None`` for the host engine (``device`` None or "cpu"), else the torch device,
    after checking that it exists."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgumentError(f"device must be a torch device such as 'cuda' or 'cuda:0', got {device!r}.") from e
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"device {device!r}: torch finds no CUDA device here "
                                       "(torch.cuda.is_available() is False).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices.")
    return dev


@contextlib.contextmanager
def _exact_float32():
    """float32 products in full precision (no TF32) for the duration."""
    cuda = torch.backends.cuda.matmul
    old = cuda.allow_tf32
    cuda.allow_tf32 = False
    try:
        yield
    finally:
        cuda.allow_tf32 = old


def search_batch_device(view, router, queries: np.ndarray, k: int, probes: int, candidates: int | None,
                        device, *, explain: bool = False, group_rows: int = GROUP_ROWS):
    """:func:`~asteria_store.query.engine.search_batch` with the scoring on ``device``
    (a torch device); same arguments and return value (``prune``, ``threads`` and
    ``kernel`` do not apply). Stats are those of an unpruned search."""
    nq = len(queries)
    stats = SearchStats.zeros(nq)
    best_i = np.empty((nq, k), dtype=np.int64)
    best_s = np.empty((nq, k), dtype=np.float32)
    n_buckets = router.n_buckets
    block = max(1, min(nq, _BLOCK_CANDIDATES // (min(probes, n_buckets) * k)))
    with _exact_float32():
        for q0 in range(0, nq, block):
            q1 = min(nq, q0 + block)
            best_i[q0:q1], best_s[q0:q1] = _block(view, router, queries[q0:q1], k, probes, candidates,
                                                  device, group_rows, stats, q0)
    return (best_i, best_s, stats) if explain else (best_i, best_s)


def _block(view, router, queries: np.ndarray, k: int, probes: int, candidates: int | None, device,
           group_rows: int, stats, q0: int):
    nq = len(queries)
    keys = probe_order_chunked(router, queries, probes)
    visit = visits(view, keys, candidates)
    stats.buckets[q0 : q0 + nq] = visit.sum(axis=1)
    groups = group_by_bucket(keys, visit)
    qd = _to(queries, np.float32, device)
    found_q, found_s, found_i = [], [], []
    scanned = np.zeros(nq, dtype=np.int64)
    read = np.zeros(nq, dtype=np.int64)
    for batch in _by_rows(view, groups, group_rows):
        rows = [BucketRows.gather(view, [bucket]) for bucket, _, _ in batch]
        m = [len(r.ids) for r in rows]
        order = [np.argsort(r.ids, kind="stable") for r in rows]  # each bucket's rows by id
        vecs = np.concatenate([r.vectors()[o] for r, o in zip(rows, order)])
        ids = np.concatenate([r.ids[o] for r, o in zip(rows, order)])
        vd, idd = _to(vecs, np.float32, device), _to(ids, np.int64, device)
        at = np.cumsum(m) - m
        for (_, qs, _), r, a, mb in zip(batch, rows, at.tolist(), m):
            nbytes = r.stored_bytes + (mb * r.row_bytes if mb else 0)
            scanned[qs] += mb
            read[qs] += nbytes
            stats.batch_bytes += nbytes
            if mb == 0:
                continue
            qsel = _to(qs, np.int64, device)
            s = qd[qsel] @ vd[a : a + mb].T  # (queries, rows)
            s, col = torch.sort(s, dim=1, descending=True, stable=True)  # equal scores: rows by id
            kk = min(k, mb)
            found_q.append(qsel[:, None].expand(-1, kk).reshape(-1))
            found_s.append(s[:, :kk].reshape(-1))
            found_i.append(idd[a + col[:, :kk]].reshape(-1))
    stats.scanned[q0 : q0 + nq] += scanned
    stats.bytes_read[q0 : q0 + nq] += read
    if not found_q:
        return np.full((nq, k), -1, dtype=np.int64), np.full((nq, k), -np.inf, dtype=np.float32)
    return top_per_query(*(torch.cat(f).cpu().numpy() for f in (found_q, found_s, found_i)), nq, k)


def _to(a: np.ndarray, dtype, device):
    """``a`` as a tensor on ``device`` (copied on the host first where it is read-only or
    not of ``dtype``, e.g. a memory-mapped chunk)."""
    return torch.from_numpy(np.require(a, dtype=dtype, requirements=["C", "W"])).to(device)


def _by_rows(view, groups: list, group_rows: int):
    """``groups`` in consecutive runs holding at most ``group_rows`` stored rows (a bucket
    larger than that alone)."""
    run, rows = [], 0
    for g in groups:
        n = sum(e[2] for e in view.extents(g[0]))
        if run and rows + n > group_rows:
            yield run
            run, rows = [], 0
        run.append(g)
        rows += n
    if run:
        yield run
