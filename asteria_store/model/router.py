"""The routing interface: vectors -> bucket keys, and a query's probe sequence.

Every router (the baseline sign hasher here, the learned ECVH model later) maps L2-normalised
float32 vectors to integer bucket keys (< 2**63), and gives, for a query, the buckets to
visit in order of increasing soft cost. Routers persist as a JSON description plus
little-endian ``.npy`` arrays (never pickle) in the store's ``model/`` directory
(persist.py).
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from .lrsq import LRSQ

#: The newest model format this version reads. A model is saved with the oldest format
#: that holds it (``format_version`` of its config, else BASE_MODEL_FORMAT), so older
#: readers refuse only what they would misread: 2 = a tree with split leaves, 3 = LRSQ
#: with a sketch (model/sketch.py; its segments hold a ``sketch`` array), 4 = a residual
#: sketch (its codes are of each row minus its bucket centre).
MODEL_FORMAT_VERSION = 4
BASE_MODEL_FORMAT = 1
SKETCH_MODEL_FORMAT = 3
RESIDUAL_SKETCH_MODEL_FORMAT = 4


class Router(Protocol):
    """What the store needs from a routing model."""

    kind: str
    #: Key width: every bucket key is below 2**bits.
    bits: int
    #: Buckets the router routes to (keys are 0 .. n_buckets - 1 for learned routers).
    n_buckets: int
    #: Buckets the model was trained with: n_buckets, less any a tree's splits added.
    trained_buckets: int

    def keys(self, x: np.ndarray) -> np.ndarray:
        """Bucket key (uint64) of each row of ``x`` (n, d), L2-normalised float32."""
        ...

    def margins(self, x: np.ndarray) -> np.ndarray:
        """Signed margins (n, bits): bit i is ``margins[:, i] > 0``."""
        ...

    def probe_input(self, queries: np.ndarray) -> np.ndarray:
        """What :meth:`probe_keys` needs per query, one row each (for batches, computed once)."""
        ...

    def probe_keys(self, row: np.ndarray) -> Iterator[int]:
        """Bucket keys of one query (its row of :meth:`probe_input`) in probe order."""
        ...

    def consistent(self, x: np.ndarray, keys: np.ndarray, *, tol: float = 1e-4) -> np.ndarray:
        """Whether each ``keys[i]`` is ``x[i]``'s key up to float rounding (a tie within
        ``tol``): what ``verify`` accepts, since BLAS may sum in another order per batch."""
        ...

    def probe_order(self, queries: np.ndarray, probes: int) -> np.ndarray:
        """The first ``probes`` keys (Q, P) int64 of each query's probe sequence."""
        ...

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """Vectors in the space LRSQ codes were made in (the model's rotation)."""
        ...

    #: The quantizer whose codes the segments hold (None: no codes, no pruning).
    lrsq: LRSQ | None

    def compiled_routing(self) -> LinearRouting | TreeRouting | None:
        """The rotation and probe order as arrays that compiled one-query search routes
        with (query/native.py); None where it cannot."""
        ...

    def centers(self, keys: np.ndarray) -> np.ndarray | None:
        """The unit centre (n, d), not rotated, that a residual sketch codes the rows of
        each bucket of ``keys`` against (model/sketch.py); None where the router's sketch
        codes the rows themselves, or it has none."""
        ...

    def config(self) -> dict: ...

    def arrays(self) -> dict[str, np.ndarray]: ...


class LinearRouting(NamedTuple):
    """A router whose probe order is one product: a query ``x``'s buckets by descending
    ``probe @ x + probe_bias`` (equal scores by key), except that the bucket of highest
    ``home @ x + home_bias`` (the first of equals), where given, comes first.
    ``rotation``: the rows of the model's rotation, ``rotate(x) = rotation @ x``."""

    rotation: np.ndarray  # (D, d) float32, C order
    probe: np.ndarray  # (n_buckets, d) float32, C order
    probe_bias: np.ndarray  # (n_buckets,) float32
    home: np.ndarray  # (n_buckets, d) float32, C order; (0, d) where there is none
    home_bias: np.ndarray  # (n_buckets,) float32; (0,) where there is none


class TreeRouting(NamedTuple):
    """A routing tree (model/tree.py) for compiled one-query routing. A query's cells rank
    by ``cell @ x + cell_bias``; its own bucket is the leaf reached down the split tree
    (``node_root``, ``split_w``, ``split_next``) of its best node among its ``assign`` best
    cells' nodes; it probes that leaf, then the leaves of its ``cells_for(probes)`` best
    cells by ``leaf @ x``, in cell order, then leaf order, for equal scores."""

    rotation: np.ndarray  # (D, d) float32
    cell: np.ndarray  # (cells, d) float32
    cell_bias: np.ndarray  # (cells,) float32
    nodes: np.ndarray  # (M, d) float32
    node_offsets: np.ndarray  # (cells + 1,) int64
    leaves: np.ndarray  # (B, d) float32
    leaf_offsets: np.ndarray  # (cells + 1,) int64
    node_root: np.ndarray  # (M,) int64
    split_w: np.ndarray  # (S, d) float32
    split_next: np.ndarray  # (S, 2) int64
    assign: int
    cells_for: Callable[[int], int]


def bits_to_keys(bits: np.ndarray) -> np.ndarray:
    """Pack boolean bits (n, m), m <= 63, into uint64 keys; bit i has weight 2**i."""
    weights = np.left_shift(np.uint64(1), np.arange(bits.shape[1], dtype=np.uint64))
    return (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def lazy_probe_order(router: Router, queries: np.ndarray, probes: int) -> np.ndarray:
    """The first ``probes`` keys (Q, P) int64 of each query's :meth:`Router.probe_keys`
    sequence, one query at a time: for probe orders not computed from bucket scores."""
    rows = router.probe_input(queries)
    return np.array([list(islice(router.probe_keys(r), probes)) for r in rows],
                    dtype=np.int64).reshape(len(queries), -1)


def top_order(scores: np.ndarray, p: int) -> np.ndarray:
    """Column indices (Q, p) of the p highest scores of each row, highest first, equal
    scores by index: the first p of a stable descending argsort, without sorting it all
    (one compiled pass per row, :func:`top_into`)."""
    n = scores.shape[1]
    p = min(p, n)
    if 4 * p >= n:  # insertion costs up to p per column: sort instead
        return np.argsort(-scores, axis=1, kind="stable")[:, :p].astype(np.int64, copy=False)
    out = np.empty((len(scores), p), dtype=np.int64)
    compiled_top()(np.ascontiguousarray(scores, dtype=np.float32), out)
    return out


def top_into(scores, out):
    """The p = ``out.shape[1]`` best columns of each row of ``scores`` into ``out``,
    highest first, equal scores by column: each row is read once, a column entering the
    kept list by insertion (p is a few dozen). Plain loops, compiled by numba
    (:func:`compiled_top`); the one-query search calls it too (query/native.py)."""
    p = out.shape[1]
    top = np.empty(p, dtype=np.float32)
    for r in range(scores.shape[0]):
        row = scores[r]
        keys = out[r]
        filled = 0
        for i in range(row.shape[0]):
            v = row[i]
            if filled == p and not v > top[p - 1]:
                continue
            at = filled if filled < p else p - 1
            while at > 0 and top[at - 1] < v:
                top[at], keys[at] = top[at - 1], keys[at - 1]
                at -= 1
            top[at], keys[at] = v, i
            if filled < p:
                filled += 1


@functools.cache
def compiled_top():
    import numba

    return numba.njit(cache=True, nogil=True)(top_into)


def flip_sets(cost: np.ndarray) -> Iterator[tuple[float, tuple[int, ...]]]:
    """All subsets of bit positions in increasing total cost (multi-probe LSH order).

    ``cost[i] >= 0`` is what flipping bit i costs (its |margin|). Yields ``(total, subset)``
    starting with the empty set. Lazy: the caller stops when its budget is spent, so a
    probe budget P costs O(P log P) work whatever the number of bits.
    """
    order = np.argsort(cost, kind="stable")
    c = cost[order]
    m = len(c)
    yield 0.0, ()
    if m == 0:
        return
    heap: list[tuple[float, tuple[int, ...]]] = [(float(c[0]), (0,))]
    while heap:
        total, subset = heapq.heappop(heap)
        yield total, tuple(int(order[j]) for j in subset)
        last = subset[-1]
        if last + 1 < m:
            # shift: replace the last element by the next one
            heapq.heappush(heap, (total - float(c[last]) + float(c[last + 1]), subset[:-1] + (last + 1,)))
            # expand: add the next element
            heapq.heappush(heap, (total + float(c[last + 1]), subset + (last + 1,)))


def sign_probe_keys(margins: np.ndarray) -> Iterator[int]:
    """Sign-bit bucket keys of one query in probe order: its own bucket (the signs of
    ``margins``), then the cheapest bit flips (multi-probe LSH)."""
    home = int(bits_to_keys((margins > 0)[None, :])[0])
    for _, subset in flip_sets(np.abs(margins)):
        key = home
        for i in subset:
            key ^= 1 << i
        yield key


def sign_soft_cost_scores(z: np.ndarray) -> np.ndarray:
    """Minus the soft cost of every sign bucket (Q, 2**bits): ``-sum |z_i|`` over the bits
    where the bucket's key differs from ``z > 0`` (higher = probed earlier)."""
    bits = z.shape[1]
    codes = ((np.arange(2**bits)[:, None] >> np.arange(bits)[None, :]) & 1).astype(np.float32)
    h = (z > 0).astype(np.float32)
    a = np.abs(z).astype(np.float32)
    return -((a * h).sum(1, keepdims=True) + (a * (1 - 2 * h)) @ codes.T)


def sign_consistent(z: np.ndarray, keys: np.ndarray, *, tol: float) -> np.ndarray:
    """Whether each key's bits equal ``z > 0`` wherever ``|z| > tol`` (float rounding)."""
    bits = ((np.asarray(keys, dtype=np.uint64)[:, None] >> np.arange(z.shape[1], dtype=np.uint64)) & 1).astype(bool)
    return ((bits == (z > 0)) | (np.abs(z) <= tol)).all(axis=1)


class SignHasher:
    """Baseline router: a seeded random orthogonal projection and sign bits (plain LSH).

    Kept after the learned model lands as the ablation baseline. ``bits`` sets the number
    of buckets (2**bits): more bits mean smaller buckets (fewer candidates per probe, lower
    recall per probe); fewer bits mean the opposite.
    """

    kind = "sign"
    #: No LRSQ codes: every probed row is scored exactly.
    lrsq = None

    def __init__(self, projection: np.ndarray, *, seed: int | None = None):
        self.projection = np.ascontiguousarray(projection, dtype=np.float32)  # (bits, d)
        self.bits = int(self.projection.shape[0])
        self.dim = int(self.projection.shape[1])
        self.seed = seed

    @classmethod
    def random(cls, dim: int, bits: int, *, seed: int = 0) -> SignHasher:
        """The first ``bits`` rows of a Haar-random orthogonal matrix (QR of a Gaussian)."""
        rng = np.random.default_rng(seed)
        g = rng.standard_normal((dim, dim))
        q, r = np.linalg.qr(g)
        q = q * np.sign(np.diag(r))  # make the distribution Haar
        rows = min(bits, dim)
        proj = q[:rows]
        if bits > dim:  # more bits than dimensions: extra random (non-orthogonal) directions
            extra = rng.standard_normal((bits - dim, dim))
            proj = np.vstack([proj, extra / np.linalg.norm(extra, axis=1, keepdims=True)])
        return cls(proj, seed=seed)

    @property
    def n_buckets(self) -> int:
        return 2**self.bits

    @property
    def trained_buckets(self) -> int:
        return self.n_buckets

    def margins(self, x: np.ndarray) -> np.ndarray:
        return x @ self.projection.T

    def keys(self, x: np.ndarray) -> np.ndarray:
        return bits_to_keys(self.margins(x) > 0)

    def consistent(self, x: np.ndarray, keys: np.ndarray, *, tol: float = 1e-4) -> np.ndarray:
        return sign_consistent(self.margins(x), keys, tol=tol)

    def probe_input(self, queries: np.ndarray) -> np.ndarray:
        return self.margins(queries)

    def probe_keys(self, margins: np.ndarray) -> Iterator[int]:
        """Bucket keys of one query in probe order: home bucket, then cheapest bit flips."""
        return sign_probe_keys(margins)

    def compiled_routing(self) -> None:
        """Sign bits probe by bit flips: no compiled routing."""
        return None

    def centers(self, keys: np.ndarray) -> None:
        """No codes, no sketch."""
        return None

    def probe_order(self, queries: np.ndarray, probes: int) -> np.ndarray:
        return lazy_probe_order(self, queries, probes)

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """The identity: a sign store keeps no LRSQ codes to rotate queries for."""
        return x

    def config(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "dim": self.dim, "seed": self.seed}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"projection": self.projection}

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray]) -> SignHasher:
        return cls(arrays["projection"], seed=config.get("seed"))


def bits_for_size(expected_size: int, *, bucket_rows: int = 256, max_bits: int = 24) -> int:
    """Number of sign bits so that ``expected_size`` vectors fill buckets of ~bucket_rows."""
    return int(np.clip(round(np.log2(max(expected_size, 1) / bucket_rows)), 1, max_bits))
