"""ECVH router: the learned model at inference (numpy only, no torch, no autograd).

Pipeline for a (normalised) vector x of dimension d:

    y = x @ rotation                 rotation (d x D): PCA basis then the learned BOR,
                                     orthogonal; y also feeds LRSQ
    z = y @ vantages.T + offsets     m margins (vantages: m x D)
    key = code.decode(z)             soft-decision ML decoding (ecc=True), or
    key = bits(z > 0)                plain learned sign hashing (ecc=False, m = bits)

Probe order for a query: with ``probe_centroids`` (2**bits x d, unit rows: the mean
direction of each bucket's training vectors, fitted after training), every bucket ranked by
``q . probe_centroid``; on wordnet-minilm this order needs 10-20% fewer rows scanned for the
same recall than the soft-cost order (docs/model.md). Without them: with a code, every
message ranked by its correlation with z (increasing soft cost); without a code, the
cheapest bit-flip sets of z (multi-probe LSH). With the full Hadamard code the correlations
equal ``x @ centroids`` for the implied bucket centroids, which is how they are computed
(one matmul, no FWHT).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .codes import HadamardCode
from .lrsq import LRSQ
from .sketch import Sketch
from .router import (
    RESIDUAL_SKETCH_MODEL_FORMAT,
    SKETCH_MODEL_FORMAT,
    LinearRouting,
    bits_to_keys,
    lazy_probe_order,
    sign_consistent,
    sign_probe_keys,
    sign_soft_cost_scores,
    top_order,
)


class ECVHRouter:
    kind = "ecvh"

    def __init__(self, rotation: np.ndarray, vantages: np.ndarray, offsets: np.ndarray, *,
                 bits: int, ecc: bool, positions: np.ndarray | None = None,
                 lrsq: LRSQ | None = None, info: dict | None = None,
                 probe_centroids: np.ndarray | None = None):
        # Own copies: arrays exported from torch share memory with parameters that training
        # goes on updating after a snapshot is taken.
        self.rotation = np.array(rotation, dtype=np.float32, order="C", copy=True)  # (d, D)
        self.vantages = np.array(vantages, dtype=np.float32, order="C", copy=True)  # (m, D)
        self.offsets = np.array(offsets, dtype=np.float32, order="C", copy=True)  # (m,)
        self.bits = int(bits)
        self.ecc = bool(ecc)
        self.dim = int(self.rotation.shape[0])
        self.m = int(self.vantages.shape[0])
        self.lrsq = lrsq
        self.info = dict(info or {})
        self.probe_centroids = None
        if probe_centroids is not None:
            self.probe_centroids = np.array(probe_centroids, dtype=np.float32, order="C", copy=True)
            if self.probe_centroids.shape != (2**self.bits, self.dim):
                raise ValueError(f"probe_centroids must be (2**bits, dim) = {(2**self.bits, self.dim)}, "
                                 f"got {self.probe_centroids.shape}")
        if self.ecc:
            self.code = HadamardCode(self.bits, positions)
            if self.code.m != self.m:
                raise ValueError(f"code length {self.code.m} != number of vantages {self.m}")
        else:
            self.code = None
            if self.m != self.bits:
                raise ValueError("without a code, the number of vantages must equal bits")
        # Folded matrices for inference.
        self._w = np.ascontiguousarray(self.rotation @ self.vantages.T)  # (d, m)
        if self.code is not None and np.array_equal(self.code.positions, np.arange(2**self.bits)):
            # correlations = -(z @ H) with H the Sylvester Hadamard matrix (symmetric)
            from .codes import fwht

            h = fwht(np.eye(self.m, dtype=np.float32))
            self._centroids = np.ascontiguousarray(-(self._w @ h))  # (d, 2**bits)
            self._centroid_bias = -(self.offsets @ h)
        else:
            self._centroids = None
        self._linear: LinearRouting | None = None
        self._score_rows: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_buckets(self) -> int:
        return 2**self.bits

    @property
    def trained_buckets(self) -> int:
        return self.n_buckets

    def cell_directions(self) -> np.ndarray:
        """Unit direction of every bucket (2**bits, d): its probe centroid, else the full
        code's centroid."""
        if self.probe_centroids is not None:
            return self.probe_centroids
        if self._centroids is None:
            raise ValueError("a router without probe centroids or a full code has no bucket directions")
        c = self._centroids.T
        return np.ascontiguousarray(c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12))

    # -- routing -------------------------------------------------------------------------

    def rotate(self, x: np.ndarray) -> np.ndarray:
        return x @ self.rotation

    def score_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`scores` as a product: ``(rows (2**bits, d), bias)`` with ``scores(x) =
        rows @ x + bias``; None without the full code (scores are then decoded)."""
        if self._centroids is None:
            return None
        if self._score_rows is None:
            self._score_rows = np.ascontiguousarray(self._centroids.T), self._centroid_bias.astype(np.float32)
        return self._score_rows

    def compiled_routing(self) -> LinearRouting | None:
        """:meth:`probe_order` as products (router.LinearRouting): by probe centroid with
        the own bucket (the full code's best centroid) first, or by the full code's
        centroids alone; None for sign bits or a shortened code."""
        code = self.score_rows()
        if code is None:
            return None
        if self._linear is None:
            rows = np.ascontiguousarray(self.rotation.T)
            nobias = np.zeros(self.n_buckets, dtype=np.float32)
            if self.probe_centroids is not None:
                self._linear = LinearRouting(rows, self.probe_centroids, nobias, *code)
            else:
                self._linear = LinearRouting(rows, *code, np.zeros((0, self.dim), np.float32),
                                             np.zeros(0, np.float32))
        return self._linear

    def centers(self, keys: np.ndarray) -> np.ndarray | None:
        """The probe centroid of each bucket of ``keys``, where the sketch is residual.
        (As the coarse level of a tree, this model holds the tree's residual sketch, whose
        centres are the tree's: the tree routes and answers this.)"""
        if self.lrsq is None or not self.lrsq.residual_sketch:
            return None
        if self.probe_centroids is None:
            raise ValueError("a residual sketch codes rows against bucket centres, and this model has none")
        return self.probe_centroids[np.asarray(keys, dtype=np.int64)]

    def with_lrsq(self, lrsq: LRSQ | None) -> ECVHRouter:
        """This model with quantizer ``lrsq`` instead (a tree gives its coarse model the
        residual sketch it trains)."""
        return ECVHRouter(self.rotation, self.vantages, self.offsets, bits=self.bits, ecc=self.ecc,
                          positions=None if self.code is None else self.code.positions, lrsq=lrsq,
                          info=self.info, probe_centroids=self.probe_centroids)

    def margins(self, x: np.ndarray) -> np.ndarray:
        return x @ self._w + self.offsets

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Probe score of every bucket (n, 2**bits): higher = lower soft cost (ecc only)."""
        if self._centroids is not None:
            return x @ self._centroids + self._centroid_bias
        return self.code.correlations(self.margins(x))

    def keys(self, x: np.ndarray) -> np.ndarray:
        if self.code is None:
            return bits_to_keys(self.margins(x) > 0)
        out = np.empty(len(x), dtype=np.uint64)
        for start in range(0, len(x), 8192):
            out[start : start + 8192] = self.scores(x[start : start + 8192]).argmax(axis=1)
        return out

    def consistent(self, x: np.ndarray, keys: np.ndarray, *, tol: float = 1e-4) -> np.ndarray:
        """Whether each key is x's key up to float rounding (its score within ``tol`` of the best)."""
        if self.code is None:
            return sign_consistent(self.margins(x), keys, tol=tol)
        s = self.scores(x)
        mine = np.take_along_axis(s, np.asarray(keys, dtype=np.int64)[:, None], axis=1)[:, 0]
        return mine >= s.max(axis=1) - tol

    def probe_input(self, queries: np.ndarray) -> np.ndarray:
        """Per query: bucket scores (probe centroids), else its margins."""
        if self.probe_centroids is not None:
            return self.probe_scores(queries)
        return self.margins(queries)

    def probe_scores(self, queries: np.ndarray) -> np.ndarray:
        """Probe priority of every bucket (Q, 2**bits), higher first, as :meth:`probe_keys` orders them."""
        if self.probe_centroids is not None:
            # The query's own bucket first (a stored vector finds itself with one probe;
            # measured no worse), then by mean direction.
            s = queries @ self.probe_centroids.T
            s[np.arange(len(s)), self.keys(queries).astype(np.int64)] = np.inf
            return s
        if self.code is not None:
            return self.scores(queries)
        return sign_soft_cost_scores(self.margins(queries))

    def with_probe_centroids(self, x: np.ndarray) -> ECVHRouter:
        """A copy probing by the mean direction of each bucket's rows of ``x`` (normalised
        vectors); buckets ``x`` leaves empty keep their soft-cost direction."""
        keys = self.keys(x).astype(np.int64)
        nb = 2**self.bits
        sums = np.zeros((nb, self.dim), dtype=np.float64)
        np.add.at(sums, keys, x)
        empty = np.bincount(keys, minlength=nb) == 0
        if empty.any() and self._centroids is not None:  # the code's own centroid direction
            sums[empty] = self._centroids.T[empty]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        cents = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
        return ECVHRouter(self.rotation, self.vantages, self.offsets, bits=self.bits, ecc=self.ecc,
                          positions=None if self.code is None else self.code.positions,
                          lrsq=self.lrsq, info=self.info, probe_centroids=cents)

    def probe_order(self, queries: np.ndarray, probes: int) -> np.ndarray:
        """The first ``probes`` keys of each query's probe sequence (Q, P) int64, as
        :meth:`probe_keys` yields them, for a whole batch at once."""
        if self.probe_centroids is None and self.code is None:  # learned sign bits
            return lazy_probe_order(self, queries, probes)
        return top_order(self.probe_scores(queries), probes)

    def probe_keys(self, margins: np.ndarray) -> Iterator[int]:
        """Bucket keys of one query (its row of :meth:`probe_input`) in probe order."""
        if self.probe_centroids is not None:  # the row holds bucket scores
            yield from np.argsort(-margins, kind="stable").tolist()
            return
        if self.code is None:
            yield from sign_probe_keys(margins)
            return
        corr = self.code.correlations(margins[None, :])[0]
        yield from np.argsort(-corr, kind="stable").tolist()

    # -- persistence ---------------------------------------------------------------------

    def config(self) -> dict:
        cfg = {"kind": self.kind, "bits": self.bits, "ecc": self.ecc, "dim": self.dim,
               "m": self.m, "info": self.info}
        if self.lrsq is not None:
            cfg["lrsq"] = {"rank": self.lrsq.rank, "block": self.lrsq.block}
            if self.lrsq.sketch is not None:
                cfg["format_version"] = SKETCH_MODEL_FORMAT
                if self.lrsq.sketch.residual:
                    cfg["sketch_residual"] = self.lrsq.sketch.residual
                    cfg["format_version"] = RESIDUAL_SKETCH_MODEL_FORMAT
        return cfg

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"rotation": self.rotation, "vantages": self.vantages, "offsets": self.offsets}
        if self.code is not None:
            out["positions"] = self.code.positions.astype(np.int64)
        if self.probe_centroids is not None:
            out["probe_centroids"] = self.probe_centroids
        if self.lrsq is not None and self.lrsq.sketch is not None:
            out["sketch"] = self.lrsq.sketch.codebook
        return out

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray]) -> ECVHRouter:
        sketch = Sketch(arrays["sketch"], config.get("sketch_residual", 0.0)) if "sketch" in arrays else None
        lrsq = LRSQ(**config["lrsq"], sketch=sketch) if "lrsq" in config else None
        return cls(arrays["rotation"], arrays["vantages"], arrays["offsets"], bits=config["bits"],
                   ecc=config["ecc"], positions=arrays.get("positions"), lrsq=lrsq,
                   info=config.get("info"), probe_centroids=arrays.get("probe_centroids"))
