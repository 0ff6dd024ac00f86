"""Seeded synthetic data with real neighbour structure, and exact references.

Random Gaussian vectors have no neighbours worth finding (in high dimension every point is
about equally far from every other), so generated data here is clustered: points scattered
around random unit centres, which gives a search index something to find.
"""

from __future__ import annotations

import numpy as np


def clustered_vectors(n: int, dim: int, *, clusters: int = 100, spread: float = 0.6,
                      seed: int = 0, dtype=np.float32) -> np.ndarray:
    """``n`` L2-normalised vectors around ``clusters`` random unit centres.

    ``spread`` is the norm of each point's Gaussian offset from its (unit) centre: with the
    default 0.6, members of one cluster have cosine ~0.73 to each other and ~0 to members
    of other clusters.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=dtype)
    step = 65536
    for start in range(0, n, step):
        m = min(step, n - start)
        which = rng.integers(0, clusters, size=m)
        noise = rng.standard_normal((m, dim)).astype(np.float32) * np.float32(spread / np.sqrt(dim))
        x = centres[which] + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def brute_force_topk(base: np.ndarray, queries: np.ndarray, k: int, *, block: int = 65536):
    """Exact top-k by inner product: ``(indices (Q, k) int64, scores (Q, k) float32)``."""
    queries = np.asarray(queries, dtype=np.float32)
    nq = len(queries)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    for start in range(0, len(base), block):
        b = np.asarray(base[start : start + block], dtype=np.float32)
        s = queries @ b.T
        idx = np.broadcast_to(np.arange(start, start + len(b)), s.shape)
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, idx], axis=1)
        kk = min(k, all_s.shape[1])
        part = np.argpartition(-all_s, kk - 1, axis=1)[:, :kk]
        best_s = np.take_along_axis(all_s, part, axis=1)
        best_i = np.take_along_axis(all_i, part, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:, :k] ∩ truth[:, :k]| / k (set overlap of ids)."""
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        hits += len(np.intersect1d(f, t))
    return hits / (k * len(found))
