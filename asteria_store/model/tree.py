"""BEC-Tree router: ECVH coarse cells, each split into child buckets (no bucket cap).

A flat ECVH model decodes a vector against every bucket: ``d x buckets`` multiply-adds
per vector, which is why one level stops at a few thousand buckets. The tree routes in
two steps:

    cells = the ``assign_cells`` best coarse cells of x     coarse: a full-code ECVH router
                                                             (soft-decoded Hadamard code)
    key   = the best child centroid of x within those cells (children: unit centroids of
                                                             the cell's rows, k-means)

so assigning a vector costs ``d x (cells + assign_cells x children per cell)``. Keys are
dense: the children of cell c are buckets ``offsets[c] .. offsets[c+1]-1``, so a bucket's
key is its path (the cell is ``searchsorted(offsets, key)``) and a segment sorted by key
holds each cell's buckets together.

Probe order for a query: its ``probe_cells`` best coarse cells are expanded and ALL their
children are ranked together by ``q . child`` (one global order across cells), the
query's own bucket first. The rotation and LRSQ are the coarse model's: LRSQ bounds work
the same in every bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from .ecvh import ECVHRouter
from .router import top_order

#: Coarse cells each vector is compared against when assigned (its best children among
#: them win). 1 is a pure tree descent; more cells cost d x children each and place
#: vectors near a cell border in the right bucket (docs/model.md, "Routing tree").
ASSIGN_CELLS = 4

#: Coarse cells expanded per query, at least; more when the probe budget needs more
#: children (see :meth:`TreeRouter.cells_for`).
MIN_PROBE_CELLS = 8

#: Children of the expanded cells per probe: the probe budget is drawn from this many
#: times more candidate buckets than it visits.
PROBE_SPREAD = 4

#: Rows per block when keys are computed for many vectors.
_BLOCK = 8192


class TreeRouter:
    kind = "tree"

    def __init__(self, coarse: ECVHRouter, children: np.ndarray, offsets: np.ndarray, *,
                 assign_cells: int = ASSIGN_CELLS, info: dict | None = None):
        if coarse.code is None:
            raise ValueError("the coarse level of a tree must be an ECVH router with a code")
        self.coarse = coarse
        self.children = np.array(children, dtype=np.float32, order="C", copy=True)  # (B, d)
        self.offsets = np.asarray(offsets, dtype=np.int64).copy()  # (C + 1,)
        n_cells = 2**coarse.bits
        if self.offsets.shape != (n_cells + 1,) or self.offsets[0] != 0 or \
                self.offsets[-1] != len(self.children) or (np.diff(self.offsets) < 1).any():
            raise ValueError(f"offsets must rise from 0 to {len(self.children)} over {n_cells} cells, "
                             "each cell holding at least one child")
        if self.children.shape[1] != coarse.dim:
            raise ValueError(f"children have dimension {self.children.shape[1]}, the coarse model {coarse.dim}")
        self.assign_cells = int(min(max(1, assign_cells), n_cells))
        self.info = dict(info or {})
        self.dim = coarse.dim
        self.lrsq = coarse.lrsq
        self.n_cells = n_cells
        self.n_buckets = len(self.children)
        # bits: the smallest key width holding every bucket (what sizing code compares)
        self.bits = max(1, math.ceil(math.log2(self.n_buckets)))
        self._sizes = np.diff(self.offsets)
        self._cell_of = np.repeat(np.arange(n_cells), self._sizes)

    def refined(self, x: np.ndarray) -> TreeRouter:
        """One Lloyd step over the tree's own assignment: each child moves to the normalised
        mean of the rows ``x`` it is assigned (a child assigned none stays). Cells and
        offsets do not change, so no row moves between coarse cells."""
        x = np.asarray(x, dtype=np.float32)
        keys = self.keys(x).astype(np.int64)
        sums = np.zeros(self.children.shape, dtype=np.float64)
        np.add.at(sums, keys, x)
        empty = np.bincount(keys, minlength=self.n_buckets) == 0
        sums[empty] = self.children[empty]
        children = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        return TreeRouter(self.coarse, children, self.offsets, assign_cells=self.assign_cells, info=self.info)

    # -- routing -------------------------------------------------------------------------

    def rotate(self, x: np.ndarray) -> np.ndarray:
        return self.coarse.rotate(x)

    def cell_scores(self, x: np.ndarray) -> np.ndarray:
        """Soft-decoding score of every coarse cell (n, cells): higher is nearer."""
        return self.coarse.scores(x)

    def cells_for(self, probes: int) -> int:
        """Coarse cells expanded for a budget of ``probes`` buckets: enough that their
        children outnumber the probes ``PROBE_SPREAD``-fold, at least MIN_PROBE_CELLS."""
        per_cell = self.n_buckets / self.n_cells
        want = max(MIN_PROBE_CELLS, math.ceil(PROBE_SPREAD * probes / per_cell))
        return int(min(self.n_cells, want))

    def expand(self, x: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``x . child`` and keys of every child of the given cells (n, T): two
        (n, T x widest cell) arrays, -inf / -1 where a cell has fewer children. One
        product per distinct cell, with the rows that expand it."""
        n, t = cells.shape
        width = int(self._sizes.max())
        scores = np.full((n, t * width), -np.inf, dtype=np.float32)
        keys = np.full((n, t * width), -1, dtype=np.int64)
        for rows, slot, lo, hi in self._by_cell(cells):
            cols = slot[:, None] * width + np.arange(hi - lo)[None, :]
            scores[rows[:, None], cols] = x[rows] @ self.children[lo:hi].T
            keys[rows[:, None], cols] = np.arange(lo, hi)
        return scores, keys

    def _by_cell(self, cells: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
        """For each distinct cell of ``cells`` (n, T): the rows that expand it, the slot
        (0 = their best cell) it has in each, and its children's range ``[lo, hi)``."""
        t = cells.shape[1]
        flat = cells.ravel()
        order = np.argsort(flat, kind="stable")
        uniq, start = np.unique(flat[order], return_index=True)
        bounds = np.append(start, len(flat)).tolist()
        for c, a, b in zip(uniq.tolist(), bounds[:-1], bounds[1:]):
            rows, slot = np.divmod(order[a:b], t)
            yield rows, slot, int(self.offsets[c]), int(self.offsets[c + 1])

    def _top_cells(self, x: np.ndarray, t: int) -> np.ndarray:
        """The ``t`` best coarse cells of each row (n, t), best first, ties by index."""
        return top_order(self.cell_scores(x), t)

    def keys(self, x: np.ndarray) -> np.ndarray:
        """Each row's best child among the children of its ``assign_cells`` best cells
        (equal scores: the better cell, then the lower child). One product per distinct
        cell, reduced to each row's best child of that cell at once."""
        out = np.empty(len(x), dtype=np.uint64)
        for s in range(0, len(x), _BLOCK):
            xb = x[s : s + _BLOCK]
            cells = self._top_cells(xb, self.assign_cells)
            n, t = cells.shape
            best = np.full(n, -np.inf, dtype=np.float32)
            best_slot = np.full(n, t, dtype=np.int64)
            key = np.zeros(n, dtype=np.int64)
            for rows, slot, lo, hi in self._by_cell(cells):
                sc = xb[rows] @ self.children[lo:hi].T
                j = sc.argmax(axis=1)
                v = sc[np.arange(len(rows)), j]
                win = (v > best[rows]) | ((v == best[rows]) & (slot < best_slot[rows]))
                rows, v, j, slot = rows[win], v[win], j[win], slot[win]
                best[rows], best_slot[rows], key[rows] = v, slot, lo + j
            out[s : s + n] = key
        return out

    def consistent(self, x: np.ndarray, keys: np.ndarray, *, tol: float = 1e-4) -> np.ndarray:
        """Whether each key is x's key up to float rounding: its cell is among x's
        ``assign_cells`` best (within ``tol``) and its child scores within ``tol`` of the
        best child of those cells."""
        keys = np.asarray(keys, dtype=np.int64)
        ok = (keys >= 0) & (keys < self.n_buckets)
        k = np.where(ok, keys, 0)
        cs = self.cell_scores(x)
        a = self.assign_cells
        kth = np.partition(cs, cs.shape[1] - a, axis=1)[:, cs.shape[1] - a]
        in_cells = cs[np.arange(len(x)), self._cell_of[k]] >= kth - tol
        scores, _ = self.expand(x, self._top_cells(x, a))
        mine = np.einsum("ij,ij->i", x, self.children[k])
        return ok & in_cells & (mine >= scores.max(axis=1) - tol)

    def _ranked(self, queries: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`expand` of each query's ``t`` best cells, its own bucket (the best child
        of its ``assign_cells`` best cells, as :meth:`keys` finds it) scored +inf."""
        scores, keys = self.expand(queries, self._top_cells(queries, t))
        width = scores.shape[1] // t
        own = scores[:, : self.assign_cells * width].argmax(axis=1)
        scores[np.arange(len(queries)), own] = np.inf
        return scores, keys

    def probe_order(self, queries: np.ndarray, probes: int) -> np.ndarray:
        """The first ``probes`` bucket keys (Q, P) of each query: its own bucket, then the
        children of its :meth:`cells_for` best cells by ``q . child``, across cells."""
        scores, keys = self._ranked(queries, self.cells_for(probes))
        p = min(probes, int((keys >= 0).sum(axis=1).min()))
        return np.take_along_axis(keys, top_order(scores, p), axis=1)

    def probe_scores(self, queries: np.ndarray, probes: int | None = None) -> np.ndarray:
        """Probe priority of every bucket (Q, buckets), as :meth:`probe_order` ranks them;
        -inf for buckets outside the expanded cells (for routing metrics: dense)."""
        scores, keys = self._ranked(queries, self.n_cells if probes is None else self.cells_for(probes))
        out = np.full((len(queries), self.n_buckets), -np.inf, dtype=np.float32)
        valid = keys >= 0
        rows = np.nonzero(valid)[0]
        out[rows, keys[valid]] = scores[valid]
        return out

    def probe_input(self, queries: np.ndarray) -> np.ndarray:
        return self.probe_scores(queries)

    def probe_keys(self, row: np.ndarray) -> Iterator[int]:
        """Bucket keys of one query (its row of :meth:`probe_input`) in probe order."""
        order = np.argsort(-row, kind="stable")
        yield from order[row[order] > -np.inf].tolist()

    # -- persistence ---------------------------------------------------------------------

    def config(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "dim": self.dim, "buckets": self.n_buckets,
                "cells": self.n_cells, "assign_cells": self.assign_cells, "info": self.info,
                "coarse": self.coarse.config()}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"children": self.children, "offsets": self.offsets}
        out.update({f"coarse.{k}": v for k, v in self.coarse.arrays().items()})
        return out

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray]) -> TreeRouter:
        coarse = ECVHRouter.from_saved(config["coarse"], {k[len("coarse."):]: v for k, v in arrays.items()
                                                          if k.startswith("coarse.")})
        return cls(coarse, arrays["children"], arrays["offsets"], assign_cells=config["assign_cells"],
                   info=config.get("info"))


__all__ = ["ASSIGN_CELLS", "MIN_PROBE_CELLS", "TreeRouter"]
