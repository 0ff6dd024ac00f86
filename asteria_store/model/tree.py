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

Local splits (:meth:`TreeRouter.split`): a trained child is a *node*; the buckets are the
*leaves* under it. A node starts as one leaf; an overfull leaf is split in two by
spherical 2-means on its rows, and the node routes between its leaves down a binary tree
of hyperplanes (``x . w >= 0``: left). A vector's key is the leaf it reaches from its best
node, so a split moves only the rows of the leaf it splits: every other row keeps its
leaf. Leaves are numbered cell by cell (the two halves of a split leaf are adjacent), so a
split renumbers the leaves after it monotonically (:meth:`TreeRouter.split` returns the
map) and a segment sorted by the old keys stays sorted by the new ones. Probes rank
leaves by ``q . leaf centroid``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from .ecvh import ECVHRouter
from .router import TreeRouting, top_order

#: Coarse cells each vector is compared against when assigned (its best children among
#: them win). 1 is a pure tree descent; more cells cost d x children each and place
#: vectors near a cell border in the right bucket (docs/model.md, "Routing tree").
ASSIGN_CELLS = 4

#: Coarse cells expanded per query, at least; more when the probe budget needs more
#: children (see :meth:`TreeRouter.cells_for`). 16 rather than 8: at 3M (128 cells) and
#: 10M (256 cells), 8 probes reached recall@10 0.951 / 0.970 instead of 0.936 / 0.957,
#: the same rows scanned, for ~0.05 ms more routing (docs/scale.md).
MIN_PROBE_CELLS = 16

#: Children of the expanded cells per probe: the probe budget is drawn from this many
#: times more candidate buckets than it visits.
PROBE_SPREAD = 4

#: Rows per block when keys are computed for many vectors.
_BLOCK = 8192


def _by_cell(cells: np.ndarray, offsets: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """For each distinct cell of ``cells`` (n, T): the rows that expand it, the slot
    (0 = their best cell) it has in each, and its range ``[lo, hi)`` in ``offsets``."""
    t = cells.shape[1]
    flat = cells.ravel()
    order = np.argsort(flat, kind="stable")
    uniq, start = np.unique(flat[order], return_index=True)
    bounds = np.append(start, len(flat)).tolist()
    for c, a, b in zip(uniq.tolist(), bounds[:-1], bounds[1:]):
        rows, slot = np.divmod(order[a:b], t)
        yield rows, slot, int(offsets[c]), int(offsets[c + 1])


def two_means(x: np.ndarray, *, iters: int = 8) -> tuple[np.ndarray, np.ndarray] | None:
    """Two unit centroids splitting the rows ``x`` (n, d) by spherical 2-means, started
    from the sides of their principal direction; None when they do not separate (fewer
    than two distinct directions)."""
    if len(x) < 2:
        return None
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(axis=0)
    v = centred[np.argmax(np.einsum("ij,ij->i", centred, centred))]  # power iteration from the farthest row
    for _ in range(8):
        v = centred.T @ (centred @ v)
        norm = np.linalg.norm(v)
        if norm < 1e-12:
            return None
        v /= norm
    left = centred @ v >= 0
    for _ in range(iters + 1):
        if left.all() or not left.any():
            return None
        c = np.stack([x64[left].sum(axis=0), x64[~left].sum(axis=0)])
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        now = x64 @ (c[0] - c[1]) >= 0
        if np.array_equal(now, left):
            return c[0].astype(np.float32), c[1].astype(np.float32)
        left = now
    return None if left.all() or not left.any() else (c[0].astype(np.float32), c[1].astype(np.float32))


def _check_offsets(offsets: np.ndarray, total: int, n_cells: int, what: str, item: str) -> None:
    if offsets.shape != (n_cells + 1,) or offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 1).any():
        raise ValueError(f"{what} must rise from 0 to {total} over {n_cells} cells, "
                         f"each cell holding at least one {item}")


class Splits(NamedTuple):
    """The leaves of a tree's nodes: leaf centroids ``leaves`` (B, d), numbered cell by cell
    (``leaf_offsets`` (C + 1,)), and the binary trees routing each node to its leaves.

    A reference ``r`` is a split when ``r >= 0`` and leaf ``-r - 1`` otherwise;
    ``node_root`` (M,) is each node's, and split ``s`` sends ``x`` to ``next[s, 0]`` when
    ``x . w[s] >= 0``, else to ``next[s, 1]``."""

    leaves: np.ndarray
    leaf_offsets: np.ndarray
    node_root: np.ndarray
    w: np.ndarray  # (S, d)
    next: np.ndarray  # (S, 2)

    @classmethod
    def none(cls, children: np.ndarray, offsets: np.ndarray) -> Splits:
        """Every node its own single leaf."""
        return cls(children, offsets, -np.arange(len(children), dtype=np.int64) - 1,
                   np.zeros((0, children.shape[1]), dtype=np.float32), np.zeros((0, 2), dtype=np.int64))


class TreeRouter:
    kind = "tree"

    def __init__(self, coarse: ECVHRouter, children: np.ndarray, offsets: np.ndarray, *,
                 assign_cells: int = ASSIGN_CELLS, info: dict | None = None, splits: Splits | None = None):
        if coarse.code is None:
            raise ValueError("the coarse level of a tree must be an ECVH router with a code")
        self.coarse = coarse
        self.children = np.array(children, dtype=np.float32, order="C", copy=True)  # nodes (M, d)
        self.offsets = np.asarray(offsets, dtype=np.int64).copy()  # nodes per cell (C + 1,)
        n_cells = 2**coarse.bits
        _check_offsets(self.offsets, len(self.children), n_cells, "offsets", "child")
        if self.children.shape[1] != coarse.dim:
            raise ValueError(f"children have dimension {self.children.shape[1]}, the coarse model {coarse.dim}")
        splits = splits or Splits.none(self.children, self.offsets)
        self.leaves = np.array(splits.leaves, dtype=np.float32, order="C", copy=True)  # (B, d)
        self.leaf_offsets = np.asarray(splits.leaf_offsets, dtype=np.int64).copy()
        self.node_root = np.asarray(splits.node_root, dtype=np.int64).copy()
        self.split_w = np.array(splits.w, dtype=np.float32, order="C", copy=True).reshape(-1, coarse.dim)
        self.split_next = np.asarray(splits.next, dtype=np.int64).reshape(-1, 2).copy()
        _check_offsets(self.leaf_offsets, len(self.leaves), n_cells, "leaf offsets", "leaf")
        self.assign_cells = int(min(max(1, assign_cells), n_cells))
        self.info = dict(info or {})
        self.dim = coarse.dim
        self.lrsq = coarse.lrsq
        self.n_cells = n_cells
        self.n_nodes = len(self.children)
        self.n_buckets = len(self.leaves)
        #: Buckets the model was trained with (its nodes); splits add leaves, not nodes.
        self.trained_buckets = self.n_nodes
        # bits: the smallest key width holding every bucket (what sizing code compares)
        self.bits = max(1, math.ceil(math.log2(self.n_buckets)))
        self._node_cell = np.repeat(np.arange(n_cells), np.diff(self.offsets))
        self._cell_of = np.repeat(np.arange(n_cells), np.diff(self.leaf_offsets))
        self._leaf_node, self._leaf_up, self._split_up = self._link_leaves()
        self._compiled: TreeRouting | None = None

    def _link_leaves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The node of every leaf, and the parent of every leaf and split as ``split * 2 +
        side`` (-1: a node's root), walking down from the nodes; checks that each leaf and
        split hangs under exactly one node, and each leaf is numbered in its node's cell."""
        b, s = self.n_buckets, len(self.split_w)
        if len(self.node_root) != self.n_nodes:
            raise ValueError(f"node roots: {len(self.node_root)} for {self.n_nodes} nodes")
        all_refs = np.concatenate([self.node_root, self.split_next.ravel()])
        if ((all_refs >= s) | (all_refs < -b)).any() or len(np.unique(all_refs)) != len(all_refs) \
                or len(all_refs) != b + s:
            raise ValueError("every leaf and split must hang under exactly one node")
        leaf_up = np.full(b, -2, dtype=np.int64)
        split_up = np.full(s, -2, dtype=np.int64)
        leaf_node = np.full(b, -1, dtype=np.int64)
        refs, owner, up = self.node_root, np.arange(self.n_nodes), np.full(self.n_nodes, -1)
        for _ in range(s + 1):
            leaf = refs < 0
            leaf_up[-refs[leaf] - 1], leaf_node[-refs[leaf] - 1] = up[leaf], owner[leaf]
            sp = refs[~leaf]
            if len(sp) == 0:
                break
            split_up[sp] = up[~leaf]
            refs, owner = self.split_next[sp].ravel(), np.repeat(owner[~leaf], 2)
            up = (sp[:, None] * 2 + np.arange(2)[None, :]).ravel()
        if (leaf_node < 0).any() or (split_up == -2).any():
            raise ValueError("every leaf and split must hang under exactly one node")
        if (self._node_cell[leaf_node] != self._cell_of).any():
            raise ValueError("a leaf is numbered outside its node's cell")
        return leaf_node, leaf_up, split_up

    def split(self, rows: dict[int, np.ndarray], *, iters: int = 8) -> tuple[TreeRouter, np.ndarray]:
        """This tree with each leaf of ``rows`` (leaf -> its rows (n, d)) split in two by
        spherical 2-means, and the new number of every old leaf (a split leaf: its left
        half; the right is the next). A leaf whose rows do not separate stays whole.
        No row moves out of its leaf's halves: :meth:`keys` of another leaf's rows are
        their old keys renumbered."""
        halves = {}
        for leaf in sorted(rows):
            pair = two_means(np.asarray(rows[leaf], dtype=np.float32), iters=iters)
            if pair is not None:
                halves[leaf] = pair
        split_leaves = np.array(sorted(halves), dtype=np.int64)
        old = np.arange(self.n_buckets)
        renumber = old + np.searchsorted(split_leaves, old, side="left")
        leaves = np.empty((self.n_buckets + len(split_leaves), self.dim), dtype=np.float32)
        leaves[renumber] = self.leaves
        leaf_offsets = self.leaf_offsets + np.searchsorted(split_leaves, self.leaf_offsets, side="left")

        def moved(refs: np.ndarray) -> np.ndarray:
            out = refs.copy()
            is_leaf = refs < 0
            out[is_leaf] = -renumber[-refs[is_leaf] - 1] - 1
            return out

        node_root, nxt = moved(self.node_root), moved(self.split_next)
        w, extra = [self.split_w], []
        s = len(self.split_w)
        for i, leaf in enumerate(split_leaves.tolist()):
            left, right = halves[leaf]
            at = int(renumber[leaf])
            leaves[at], leaves[at + 1] = left, right
            w.append((left - right)[None, :])
            extra.append([-at - 1, -at - 2])
            ref = -at - 1  # the leaf's old reference, renumbered, now this split
            for refs in (node_root, nxt):
                refs[refs == ref] = s + i
        if extra:
            nxt = np.concatenate([nxt, np.array(extra, dtype=np.int64)])
        splits = Splits(leaves, leaf_offsets, node_root, np.concatenate(w), nxt)
        tree = TreeRouter(self.coarse, self.children, self.offsets, assign_cells=self.assign_cells,
                          info=self.info, splits=splits)
        return tree, renumber

    def refined(self, x: np.ndarray) -> TreeRouter:
        """One Lloyd step over the tree's own assignment: each child moves to the normalised
        mean of the rows ``x`` it is assigned (a child assigned none stays). Cells and
        offsets do not change, so no row moves between coarse cells. (A trained tree's:
        its nodes are its leaves.)"""
        if self.n_buckets != self.n_nodes:
            raise ValueError("only an unsplit tree is refined")
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

    def expand(self, x: np.ndarray, cells: np.ndarray, *, nodes: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``x . leaf`` and keys of every leaf of the given cells (n, T) (``nodes``:
        of every node, and node numbers): two (n, T x widest cell) arrays, -inf / -1 where
        a cell has fewer. One product per distinct cell, with the rows that expand it."""
        centroids, offsets = (self.children, self.offsets) if nodes else (self.leaves, self.leaf_offsets)
        n, t = cells.shape
        width = int(np.diff(offsets).max())
        scores = np.full((n, t * width), -np.inf, dtype=np.float32)
        keys = np.full((n, t * width), -1, dtype=np.int64)
        for rows, slot, lo, hi in _by_cell(cells, offsets):
            cols = slot[:, None] * width + np.arange(hi - lo)[None, :]
            scores[rows[:, None], cols] = x[rows] @ centroids[lo:hi].T
            keys[rows[:, None], cols] = np.arange(lo, hi)
        return scores, keys

    def _top_cells(self, x: np.ndarray, t: int) -> np.ndarray:
        """The ``t`` best coarse cells of each row (n, t), best first, ties by index."""
        return top_order(self.cell_scores(x), t)

    def keys(self, x: np.ndarray) -> np.ndarray:
        """Each row's leaf: down the split tree of its best node among the nodes of its
        ``assign_cells`` best cells (equal scores: the better cell, then the lower node)."""
        out = np.empty(len(x), dtype=np.uint64)
        for s in range(0, len(x), _BLOCK):
            xb = x[s : s + _BLOCK]
            out[s : s + len(xb)] = self._leaf_of(xb, self._top_cells(xb, self.assign_cells))
        return out

    def _leaf_of(self, x: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """The leaf of each row of ``x`` given its ``assign_cells`` best cells (n, a)."""
        n, t = cells.shape
        best = np.full(n, -np.inf, dtype=np.float32)
        best_slot = np.full(n, t, dtype=np.int64)
        node = np.zeros(n, dtype=np.int64)
        for rows, slot, lo, hi in _by_cell(cells, self.offsets):
            sc = x[rows] @ self.children[lo:hi].T
            j = sc.argmax(axis=1)
            v = sc[np.arange(len(rows)), j]
            win = (v > best[rows]) | ((v == best[rows]) & (slot < best_slot[rows]))
            rows, v, j, slot = rows[win], v[win], j[win], slot[win]
            best[rows], best_slot[rows], node[rows] = v, slot, lo + j
        return self.descend(x, node)

    def centers(self, keys: np.ndarray) -> np.ndarray | None:
        """The node centroid of each leaf of ``keys`` (n, d): what a residual sketch codes
        the rows against. A split moves rows between the leaves of one node, never across
        nodes, so a row's centre and its sketch codes stay valid as its leaf splits."""
        if self.lrsq is None or not self.lrsq.residual_sketch:
            return None
        return self.children[self.node_of(np.asarray(keys, dtype=np.int64))]

    def node_of(self, leaves: np.ndarray) -> np.ndarray:
        """The node each leaf hangs under."""
        return self._leaf_node[np.asarray(leaves, dtype=np.int64)]

    def descend(self, x: np.ndarray, node: np.ndarray) -> np.ndarray:
        """The leaf each row of ``x`` reaches down the split tree of its ``node``."""
        ref = self.node_root[node]
        at = np.flatnonzero(ref >= 0)
        while len(at):
            s = ref[at]
            side = (np.einsum("ij,ij->i", x[at], self.split_w[s]) < 0).astype(np.int64)
            ref[at] = self.split_next[s, side]
            at = at[ref[at] >= 0]
        return -ref - 1

    def consistent(self, x: np.ndarray, keys: np.ndarray, *, tol: float = 1e-4) -> np.ndarray:
        """Whether each key is x's key up to float rounding: its cell is among x's
        ``assign_cells`` best (within ``tol``), its node scores within ``tol`` of the best
        node of those cells, and each split on its way sends x its way (within ``tol``)."""
        keys = np.asarray(keys, dtype=np.int64)
        ok = (keys >= 0) & (keys < self.n_buckets)
        k = np.where(ok, keys, 0)
        node = self._leaf_node[k]
        cs = self.cell_scores(x)
        a = self.assign_cells
        kth = np.partition(cs, cs.shape[1] - a, axis=1)[:, cs.shape[1] - a]
        in_cells = cs[np.arange(len(x)), self._cell_of[k]] >= kth - tol
        scores, _ = self.expand(x, self._top_cells(x, a), nodes=True)
        mine = np.einsum("ij,ij->i", x, self.children[node])
        ok &= in_cells & (mine >= scores.max(axis=1) - tol)
        up = self._leaf_up[k]
        at = np.flatnonzero(up >= 0)
        while len(at):
            s, side = np.divmod(up[at], 2)
            v = np.einsum("ij,ij->i", x[at], self.split_w[s])
            ok[at] &= np.where(side == 0, v >= -tol, v <= tol)
            up[at] = self._split_up[s]
            at = at[up[at] >= 0]
        return ok

    def _ranked(self, queries: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`expand` of each query's ``t`` best cells, its own bucket (its leaf, as
        :meth:`keys` finds it) scored +inf."""
        cells = self._top_cells(queries, t)
        scores, keys = self.expand(queries, cells)
        own = self._leaf_of(queries, cells[:, : self.assign_cells]).astype(np.int64)
        scores[keys == own[:, None]] = np.inf
        return scores, keys

    def compiled_routing(self) -> TreeRouting | None:
        """This tree as arrays for compiled one-query routing (router.TreeRouting); None
        where the coarse level has no full code (its cell scores are no product)."""
        cells = self.coarse.score_rows()
        if cells is None:
            return None
        if self._compiled is None:
            self._compiled = TreeRouting(np.ascontiguousarray(self.coarse.rotation.T), *cells, self.children,
                                         self.offsets, self.leaves, self.leaf_offsets, self.node_root,
                                         self.split_w, self.split_next, self.assign_cells, self.cells_for)
        return self._compiled

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
        out = {"kind": self.kind, "bits": self.bits, "dim": self.dim, "buckets": self.n_buckets,
               "cells": self.n_cells, "assign_cells": self.assign_cells, "info": self.info,
               "coarse": self.coarse.config()}
        if self.n_buckets != self.n_nodes:  # format 2: a reader of format 1 would misroute
            out.update(format_version=2, nodes=self.n_nodes, splits=len(self.split_w))
        if "format_version" in out["coarse"]:  # the coarse model's format, where newer (a sketch)
            out["format_version"] = max(out.get("format_version", 1), out["coarse"]["format_version"])
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"children": self.children, "offsets": self.offsets}
        if self.n_buckets != self.n_nodes:  # an unsplit tree saves as it always has
            out.update({"leaves": self.leaves, "leaf_offsets": self.leaf_offsets, "node_root": self.node_root,
                        "split_w": self.split_w, "split_next": self.split_next})
        out.update({f"coarse.{k}": v for k, v in self.coarse.arrays().items()})
        return out

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray]) -> TreeRouter:
        coarse = ECVHRouter.from_saved(config["coarse"], {k[len("coarse."):]: v for k, v in arrays.items()
                                                          if k.startswith("coarse.")})
        splits = None
        if "leaves" in arrays:
            splits = Splits(arrays["leaves"], arrays["leaf_offsets"], arrays["node_root"], arrays["split_w"],
                            arrays["split_next"])
        return cls(coarse, arrays["children"], arrays["offsets"], assign_cells=config["assign_cells"],
                   info=config.get("info"), splits=splits)


__all__ = ["ASSIGN_CELLS", "MIN_PROBE_CELLS", "Splits", "TreeRouter", "two_means"]
