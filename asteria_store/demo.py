"""A self-contained demo: build a store from seeded clustered data, search it, report figures.

    from asteria_store.demo import run_demo
    figures = run_demo(n=20_000, dim=64, queries=100, k=10)

The dataset comes from :func:`asteria_store.testing.clustered_vectors`: ``n + queries``
points are generated from one seed and split, so the queries are held-out points of the
same clusters. Recall@k is measured against exact brute force
(:func:`asteria_store.testing.brute_force_topk`), for the default probe budget and for
``probes="all"`` (exact search through the store). ``asteria-store demo`` is a thin wrapper.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .progress import ProgressLike
from .query.engine import DEFAULT_PROBES, Probes
from .store import Store, create
from .testing import brute_force_topk, clustered_vectors, recall_at_k

#: Queries whose neighbours are printed.
_SHOWN_QUERIES = 3
#: Neighbours printed per shown query.
_SHOWN_NEIGHBOURS = 5


def run_demo(
    *,
    n: int = 20_000,
    dim: int = 64,
    queries: int = 100,
    k: int = 10,
    keep: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: ProgressLike = None,
    print_fn: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Create a store of ``n`` clustered vectors, search it, and report what it costs.

    Args:
        n: vectors ingested.
        dim: their dimension.
        queries: held-out query points (same generator, same clusters).
        k: neighbours per query; recall is recall@k.
        keep: create the store at this path and leave it there; ``None``: a temporary
            directory, removed when the demo ends.
        seed: seed of the dataset and of the store's router.
        progress: ingest progress, as for :meth:`Store.ingest`.
        print_fn: called with each line of the report (``print`` by default).

    Returns:
        ``{"n", "dim", "queries", "k", "path", "ingest_seconds", "ingest_rate", "runs"}``,
        where ``path`` is ``None`` for a temporary store and ``runs`` holds one
        ``{"probes", "recall", "qps", "latency_ms"}`` per probe budget (the default, then
        ``"all"``). ``qps`` is batch throughput; ``latency_ms`` the mean of one-query calls.
    """
    for name, value in (("n", n), ("dim", dim), ("queries", queries), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}.")
    if k > n:
        raise InvalidArgumentError(f"k must be at most n ({n}), got {k}.")

    data = clustered_vectors(n + queries, dim, seed=seed)
    base, qs = data[:n], data[n:]
    print_fn(f"Dataset: {n:,} clustered vectors of dimension {dim} and {queries:,} held-out "
             f"queries (seed {seed}).")

    with _store_path(keep) as path:
        with create(path, dim=dim, expected_size=n, seed=seed) as store:
            where = str(path) if keep is not None else f"{path} (temporary)"
            print_fn(f"Store: {where}.")
            start = time.perf_counter()
            added = store.ingest(base, progress=progress)
            ingest_s = time.perf_counter() - start
            trained = (f", of which {added.train_seconds:.2f} s training the model on a sample "
                       f"({2 ** store.router.bits} buckets)") if added.trained else ""
            print_fn(f"Ingested {added.rows:,} vectors in {ingest_s:.2f} s{trained} "
                     f"({added.rows / (ingest_s - added.train_seconds):,.0f} vectors/s stored).")

            truth_rows, _ = brute_force_topk(base, qs, k)
            truth = added.ids.astype(np.int64)[truth_rows]
            runs = []
            for probes in (DEFAULT_PROBES, "all"):
                figures, ids, scores = _measure(store, qs, k, probes, truth)
                if probes == DEFAULT_PROBES:
                    _print_examples(print_fn, ids, scores, truth, k)
                runs.append(figures)
            _print_table(print_fn, runs, k)

    return {
        "n": n,
        "dim": dim,
        "queries": queries,
        "k": k,
        "path": str(keep) if keep is not None else None,
        "ingest_seconds": ingest_s,
        "ingest_rate": added.rows / ingest_s,
        "runs": runs,
    }


@contextlib.contextmanager
def _store_path(keep: str | os.PathLike[str] | None) -> Iterator[Path]:
    if keep is not None:
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="asteria-demo-") as tmp:
        yield Path(tmp) / "store"


def _measure(store: Store, qs: np.ndarray, k: int, probes: Probes,
             truth: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Recall, batch QPS and mean one-query latency of one probe budget (after a warm-up),
    with the batch's ``(ids, scores)``."""
    store.search(qs[:1], k, probes=probes)  # open chunks and build the view once
    start = time.perf_counter()
    ids, scores = store.search(qs, k, probes=probes)
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(len(qs)):
        store.search(qs[i : i + 1], k, probes=probes)
    single_s = time.perf_counter() - start
    figures = {
        "probes": probes,
        "recall": recall_at_k(ids, truth, k),
        "qps": len(qs) / batch_s,
        "latency_ms": 1000 * single_s / len(qs),
    }
    return figures, ids, scores


def _print_examples(print_fn: Callable[[str], Any], ids: np.ndarray, scores: np.ndarray,
                    truth: np.ndarray, k: int) -> None:
    print_fn(f"First results (probes={DEFAULT_PROBES}), id (cosine):")
    for q in range(min(_SHOWN_QUERIES, len(ids))):
        shown = ", ".join(f"{i} ({s:.4f})" for i, s in
                          zip(ids[q, :_SHOWN_NEIGHBOURS].tolist(), scores[q, :_SHOWN_NEIGHBOURS].tolist())
                          if i >= 0)
        hits = len(np.intersect1d(ids[q], truth[q]))
        print_fn(f"  query {q}: {shown}, ...  [{hits}/{k} of the exact top-{k}]")


def _print_table(print_fn: Callable[[str], Any], runs: list[dict[str, Any]], k: int) -> None:
    header = f"{'probes':>8}  {f'recall@{k}':>10}  {'batch QPS':>10}  {'latency/query':>13}"
    print_fn(header)
    for run in runs:
        print_fn(f"{run['probes']!s:>8}  {run['recall']:>10.3f}  {run['qps']:>10,.0f}  "
                 f"{run['latency_ms']:>10.2f} ms")


__all__ = ["run_demo"]
