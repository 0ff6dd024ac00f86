"""Routing quality: recall of true neighbours against the fraction of the base scanned.

A router sends every base vector to one bucket and ranks, for a query, all buckets in probe
order. Probing buckets in that order until ``B`` rows are read finds a true neighbour iff
its bucket comes within the prefix of the order whose cumulative size is <= B (the first
bucket is always read). :func:`rows_to_reach` computes, for each (query, neighbour), the
rows read up to and including the neighbour's bucket; every recall-vs-scan figure follows.
"""

from __future__ import annotations

import numpy as np


def rows_to_reach(probe_scores: np.ndarray, base_buckets: np.ndarray, truth: np.ndarray,
                  n_buckets: int) -> np.ndarray:
    """Rows read before each true neighbour is found: (Q, k) int64.

    Args:
        probe_scores: (Q, n_buckets) bucket scores per query; higher is probed first.
        base_buckets: (N,) bucket index of every base row.
        truth: (Q, k) indices of true neighbours into the base.
        n_buckets: number of buckets.
    """
    sizes = np.bincount(base_buckets, minlength=n_buckets).astype(np.int64)
    order = np.argsort(-probe_scores, axis=1, kind="stable")
    cum = np.cumsum(sizes[order], axis=1)
    pos = np.empty_like(order)
    rows = np.arange(len(order))[:, None]
    pos[rows, order] = np.arange(n_buckets)[None, :]
    nb = base_buckets[truth]  # (Q, k) bucket of each neighbour
    return np.take_along_axis(cum, np.take_along_axis(pos, nb, axis=1), axis=1)


def recall_at_fractions(reach: np.ndarray, n_base: int, fractions=(0.01, 0.02, 0.05, 0.10)) -> dict[float, float]:
    """Recall (mean over queries and neighbours) when scanning each fraction of the base."""
    return {f: float((reach <= budget_rows(f, n_base)).mean()) for f in fractions}


def budget_rows(fraction: float, n_base: int) -> float:
    """Rows a scan budget of ``fraction`` of the base allows (robust to float rounding:
    ``fraction_for_recall``'s ``a / n`` gives back exactly ``a`` rows)."""
    return float(np.floor(fraction * n_base * (1 + 1e-9) + 1e-9))


def fraction_for_recall(reach: np.ndarray, n_base: int, target: float = 0.95) -> float:
    """Smallest scanned fraction (a fixed budget for all queries) reaching ``target`` recall."""
    flat = np.sort(reach.ravel())
    idx = int(np.ceil(target * len(flat))) - 1
    return float(flat[max(idx, 0)] / n_base)


def occupancy(base_buckets: np.ndarray, n_buckets: int) -> dict[str, float]:
    """Bucket balance: max/mean size, normalised entropy (1 = perfectly even), empty count."""
    sizes = np.bincount(base_buckets, minlength=n_buckets).astype(np.float64)
    p = sizes / sizes.sum()
    nz = p[p > 0]
    return {
        "max_over_mean": float(sizes.max() / sizes.mean()),
        "entropy": float(-(nz * np.log(nz)).sum() / np.log(n_buckets)),
        "empty": int((sizes == 0).sum()),
    }
