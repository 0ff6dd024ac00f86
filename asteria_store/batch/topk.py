"""Exact merges of top-k lists: the per-shard results of one query block, and a kNN
graph's own-id removal. Order everywhere: score descending, then id ascending (the
store's own tie rule), with ``-1`` / ``-inf`` ("no result") last."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of several ``(ids, scores)`` lists of the same queries, each (Q, k_i)
    and sorted or not; ids must not repeat across parts (shards hold disjoint ids)."""
    if len(parts) == 1 and parts[0][0].shape[1] == k:
        return parts[0]
    ids = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1)
    # lexsort: the last key is the primary one. -inf ("no result") sorts last by -score.
    order = np.lexsort((ids, -scores.astype(np.float64)), axis=1)[:, :k]
    ids = np.take_along_axis(ids, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    if ids.shape[1] < k:  # fewer candidates than k in all: pad with "no result"
        pad = k - ids.shape[1]
        ids = np.concatenate([ids, np.full((len(ids), pad), -1, dtype=ids.dtype)], axis=1)
        scores = np.concatenate([scores, np.full((len(ids), pad), -np.inf, dtype=scores.dtype)], axis=1)
    return np.ascontiguousarray(ids), np.ascontiguousarray(scores)


def drop_self(ids: np.ndarray, scores: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From results of ``k + 1`` per query, each query's own id removed (or, where it is not
    among them, the last result dropped): the k nearest *other* vectors."""
    own = ids == query_ids.astype(np.int64)[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]  # own id to the end, ranks kept
    return (np.ascontiguousarray(np.take_along_axis(ids, order, axis=1)),
            np.ascontiguousarray(np.take_along_axis(scores, order, axis=1)))


__all__ = ["drop_self", "merge_topk"]
