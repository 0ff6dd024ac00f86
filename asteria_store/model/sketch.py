"""The sketch: a product-quantization code of a few bytes per row, for reads that must stay small.

LRSQ codes (lrsq.py) certify score bounds but cost a byte per coordinate (~400 B a row at
384-d). A store larger than RAM reads them from the device for every probed row. The
sketch is the compact alternative that approximate search reads instead: the rotated
vector's first ``m * dsub`` coordinates are split into ``m`` subspaces of ``dsub``
coordinates, and each is replaced by the index of its nearest of 256 centroids (k-means of
the training sample): ``m`` bytes a row (48 at 384-d, 1/8 of LRSQ's).

Subspace ``s`` holds coordinates ``s, s + m, s + 2m, ...``: interleaved, so that each
subspace gets a share of the leading (high-energy) PCA coordinates and the trailing ones,
instead of the first subspaces holding most of the energy.

A query's approximate score of a row is ``sum_s lut[s, code[s]]`` with ``lut[s, c] =
<q_s, centroid_{s,c}>`` (asymmetric distance computation: the query is not quantized).
It is not certified: search with a sketch keeps the best ``rerank`` rows by it and
rescores them exactly (query/compiled.py ``sketch_candidates``).

A *residual* sketch (``residual`` = a > 0, what training makes wherever the model has
bucket centres) codes each row minus ``a`` times the unit centre of its bucket (the
router's ``centers``: a flat model's probe centroid, or a tree's node centroid, which a
split of its leaves does not move), the way IVF-PQ codes residuals. The centres take out
much of the rows' energy (~40% on real-like data), so the same bytes
quantize what is left finer: at 1M rows, the recall lost to the sketch at a given rerank
halves (docs/scale.md). A query then scores a row ``a <q, centre> + sum_s lut[s, code[s]]``:
one offset per probed bucket (:meth:`Sketch.offsets`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

#: Centroids per subspace: one byte per subspace.
CENTROIDS = 256
#: Coordinates per subspace where the dimension allows it (else the largest of 4, 2, 1).
SUBSPACE_DIM = 8
#: Training rows at most (a uniform subset of what the model trains on) and Lloyd steps.
TRAIN_ROWS = 65536
TRAIN_ITERS = 10


def subspace_dim(dim: int) -> int:
    """Coordinates per subspace for a model of dimension ``dim``."""
    return next(s for s in (SUBSPACE_DIM, 4, 2, 1) if dim % s == 0)


@dataclass(frozen=True, eq=False)
class Sketch:
    """``codebook`` (m, dsub, 256) float32: centroid ``c`` of subspace ``s`` is
    ``codebook[s, :, c]``, over coordinates ``s, s + m, ...`` of the rotated vector;
    ``residual``: the scale of the bucket centre each row is coded against (0: the rows
    themselves)."""

    codebook: np.ndarray
    residual: float = 0.0

    def __post_init__(self) -> None:
        cb = np.ascontiguousarray(self.codebook, dtype=np.float32)
        if cb.ndim != 3 or cb.shape[2] != CENTROIDS or not np.isfinite(cb).all():
            raise ValueError(f"a sketch codebook is (m, dsub, {CENTROIDS}) finite float32, got {cb.shape}")
        residual = float(self.residual)
        if not (np.isfinite(residual) and residual >= 0):
            raise ValueError(f"a sketch's residual scale is finite and >= 0, got {self.residual!r}")
        object.__setattr__(self, "codebook", cb)
        object.__setattr__(self, "residual", residual)

    @property
    def m(self) -> int:
        """Bytes per row (subspaces)."""
        return self.codebook.shape[0]

    @property
    def dsub(self) -> int:
        return self.codebook.shape[1]

    @property
    def dim(self) -> int:
        """Leading rotated coordinates the sketch covers."""
        return self.m * self.dsub

    @classmethod
    def train(cls, y: np.ndarray, *, centers: np.ndarray | None = None, seed: int = 0, iters: int = TRAIN_ITERS,
              rows: int = TRAIN_ROWS) -> Sketch:
        """k-means (``iters`` Lloyd steps) of each subspace of rotated rows ``y`` (n, dim),
        on at most ``rows`` of them. Centroids start at sample rows (where a subspace has
        fewer than 256 distinct values, those values, repeated), and a centroid left
        empty restarts at the row its subspace serves worst.

        With ``centers`` (n, dim: each row's rotated unit bucket centre), a residual
        sketch: the scale is the least-squares one, the mean of ``<y_i, centre_i>``, and
        the codebook is trained on ``y - scale * centers``."""
        y = np.asarray(y, dtype=np.float32)
        residual = 0.0
        if centers is not None:
            centers = np.asarray(centers, dtype=np.float32)[:, : y.shape[1]]
            residual = max(0.0, float(np.einsum("ij,ij->i", y, centers).mean())) if len(y) else 0.0
            y = y - np.float32(residual) * centers
        dim = y.shape[1]
        dsub = subspace_dim(dim)
        m = dim // dsub
        rng = np.random.default_rng(seed)
        if len(y) > rows:
            y = y[np.sort(rng.choice(len(y), rows, replace=False))]
        y = np.ascontiguousarray(y)
        n = len(y)
        sub = y.reshape(n, dsub, m)  # sub[:, j, s]: coordinate s + m*j
        codebook = np.empty((m, dsub, CENTROIDS), dtype=np.float32)
        for s in range(m):
            codebook[s] = _start(sub[:, :, s], rng).T
        for _ in range(iters):
            sketch = cls(codebook)
            assign = sketch.encode(y)
            for s in range(m):
                a = assign[:, s].astype(np.int64)
                counts = np.bincount(a, minlength=CENTROIDS)
                filled = counts > 0
                for j in range(dsub):
                    sums = np.bincount(a, weights=sub[:, j, s], minlength=CENTROIDS)
                    codebook[s, j, filled] = (sums[filled] / counts[filled]).astype(np.float32)
                if not filled.all() and n > CENTROIDS:
                    err = ((sub[:, :, s] - codebook[s][:, a].T) ** 2).sum(axis=1)
                    far = np.argsort(-err, kind="stable")[: int((~filled).sum())]
                    codebook[s][:, ~filled] = sub[far, :, s].T
        return cls(codebook, residual)

    def encode(self, y: np.ndarray, centers: np.ndarray | None = None) -> np.ndarray:
        """Codes (n, m) uint8 of rotated rows ``y`` (n, >= dim): the nearest centroid of each
        subspace (squared L2) of the row, or, for a residual sketch, of the row minus its
        scaled ``centers`` row (rotated unit bucket centres, (n, >= dim))."""
        y = np.asarray(y, dtype=np.float32)[:, : self.dim]
        if self.residual:
            if centers is None:
                raise ValueError("a residual sketch codes rows against their bucket centres: pass centers")
            y = y - np.float32(self.residual) * np.asarray(centers, dtype=np.float32)[:, : self.dim]
        y = np.ascontiguousarray(y)
        out = np.empty((len(y), self.m), dtype=np.uint8)
        if len(y):
            _compiled()(y, self.codebook, _half_norms(self.codebook), out)
        return out

    def lut(self, qy: np.ndarray) -> np.ndarray:
        """(m, 256) float32: ``<q_s, centroid_{s,c}>`` for rotated query ``qy`` (>= dim,)."""
        q = np.asarray(qy, dtype=np.float32)[: self.dim].reshape(self.dsub, self.m).T  # (m, dsub)
        return np.einsum("sj,sjc->sc", q, self.codebook)

    def offsets(self, q: np.ndarray, centers: np.ndarray) -> np.ndarray:
        """(n,) float32: what a residual sketch adds to the scores of the rows of the
        buckets whose unit centres are ``centers`` (n, d), ``residual * <q, centre>`` (query
        and centres both rotated, or both not: the rotation keeps inner products)."""
        d = min(len(q), centers.shape[1])
        return (np.float32(self.residual) * (centers[:, :d] @ np.asarray(q, dtype=np.float32)[:d])).astype(np.float32)

    def scores(self, qy: np.ndarray, codes: np.ndarray, centers: np.ndarray | None = None) -> np.ndarray:
        """Approximate scores (n,) of coded rows ``codes`` (n, m) for rotated query ``qy``
        (and, for a residual sketch, the rows' rotated unit bucket centres ``centers``)."""
        lut = self.lut(qy)
        approx = lut[np.arange(self.m), np.asarray(codes, dtype=np.int64)].sum(axis=1, dtype=np.float32)
        if not self.residual:
            return approx
        if centers is None:
            raise ValueError("a residual sketch scores rows against their bucket centres: pass centers")
        return approx + self.offsets(qy, centers)


def _half_norms(codebook: np.ndarray) -> np.ndarray:
    """(m, 256) float32: half the squared norm of every centroid."""
    return 0.5 * np.einsum("sjc,sjc->sc", codebook, codebook)


def _start(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(256, dsub) starting centroids of one subspace's rows ``x`` (n, dsub)."""
    distinct = np.unique(x, axis=0)
    if len(distinct) <= CENTROIDS:
        return np.concatenate([distinct, np.repeat(distinct[:1], CENTROIDS - len(distinct), axis=0)])
    return x[np.sort(rng.choice(len(x), CENTROIDS, replace=False))]


def _encode_loop(y, codebook, half, out):
    """Nearest centroid per subspace of every row: the largest ``<y_s, c> - |c|^2 / 2``
    over the 256 centroids, accumulated contiguously (it vectorises). The largest is
    found as an integer maximum (also vectorised, ~4x faster than a float arg-max): the
    score's order-preserving int32 key with its low 8 bits replaced by ``255 - c``, so
    scores within 2**-15 of each other go to the lower centroid."""
    m, dsub, nc = codebook.shape
    acc = np.empty(nc, dtype=np.float32)
    bits = acc.view(np.int32)
    for i in range(y.shape[0]):
        for s in range(m):
            for c in range(nc):
                acc[c] = -half[s, c]
            for j in range(dsub):
                v = y[i, s + m * j]
                for c in range(nc):
                    acc[c] += v * codebook[s, j, c]
            best = np.int32(-2147483647 - 1)
            for c in range(nc):
                b = bits[c]
                key = b if b >= 0 else b ^ np.int32(0x7FFFFFFF)
                key = (key & np.int32(-256)) | np.int32(255 - c)
                best = key if key > best else best
            out[i, s] = 255 - (best & 255)


@functools.cache
def _compiled():
    import numba

    return numba.njit(cache=True, nogil=True, fastmath={"contract", "reassoc", "nnan", "ninf"})(_encode_loop)


__all__ = ["CENTROIDS", "Sketch", "subspace_dim"]
