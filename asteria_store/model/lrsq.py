"""LRSQ: low-rank 8-bit quantization with certified score intervals.

A vector ``x`` is rotated by the model (``y = x @ rotation``, orthogonal), and its first
``rank`` coordinates (the projection ``P``: after the model's PCA rotation they carry most
of the energy) are quantized blockwise: each block of ``block`` coordinates gets its own
affine map ``v ~ lo + code * scale`` with 8-bit codes. Stored per vector:

* ``codes``  (rank,) uint8
* ``aux``    (3 * n_blocks + 1,) float16: per block ``lo``, ``scale``, ``err`` (the block's
  largest absolute reconstruction error, measured at encode time and rounded UP), then
  ``rho = ||x - P^T P x||`` (the energy outside the projection, rounded UP).

For a query q (rotated the same way), the estimate is ``<q_P, dequant(code)>`` and

    |<q, x> - estimate| <= sum_b ||q_b||_1 * err_b + ||q_tail|| * rho + slack

where ``slack`` covers float32 rounding of the rotation. The interval is certified: the
errors it uses are measured on the stored values, not modelled.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .sketch import Sketch

_F16 = np.float16
#: Relative allowance for float32 rounding in the rotation and the dot products.
_SLACK_REL = 1e-4
_SLACK_ABS = 1e-6
#: Rows of codes converted to float32 at a time in :meth:`LRSQ.estimate` (~1 MiB).
_TILE_ROWS = 1024


def _round_up_f16(x: np.ndarray) -> np.ndarray:
    """float16 values >= x (elementwise)."""
    h = x.astype(_F16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], _F16(np.inf))
    return h


class QueryTerms(NamedTuple):
    """One rotated query's terms of the LRSQ interval, per stored row with codes ``c`` and
    aux ``a`` (lo | scale | err | rho):
    ``estimate = sum_b a[scale_b] <c_b, head_b> + a[lo_b] block_sums[b]`` and
    ``half-width = slack + |a| @ width_weights``."""

    head: np.ndarray  # (rank,) float32: the query's leading coordinates
    block_sums: np.ndarray  # (n_blocks,) float32
    width_weights: np.ndarray  # (aux_width,) float32
    slack: np.float32


@dataclass(frozen=True)
class LRSQ:
    """Quantizer of rotated vectors: ``rank`` leading coordinates in blocks of ``block``;
    with ``sketch``, each row also gets a few-byte product-quantization code (sketch.py)
    that approximate search reads instead of the LRSQ codes."""

    rank: int
    block: int = 32
    sketch: Sketch | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.block < 1 or self.rank % self.block:
            raise ValueError(f"rank ({self.rank}) must be a positive multiple of block ({self.block})")

    @property
    def n_blocks(self) -> int:
        return self.rank // self.block

    @property
    def residual_sketch(self) -> bool:
        """Whether the sketch codes each row minus its bucket's centre (the router's
        ``centers``), rather than the row itself or nothing."""
        return self.sketch is not None and self.sketch.residual > 0

    @property
    def aux_width(self) -> int:
        return 3 * self.n_blocks + 1

    @property
    def bytes_per_vector(self) -> int:
        return self.rank + 2 * self.aux_width

    def encode(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes (n, rank) uint8 and aux (n, aux_width) float16 of rotated vectors y (n, D)."""
        # float32 throughout: err is measured on the float32 reconstruction that
        # estimate() computes, and rounded up to float16; what float32 rounding of the
        # measurement itself may hide (a relative 2**-24) is far inside _SLACK_REL.
        y = np.asarray(y, dtype=np.float32)
        n = len(y)
        head = y[:, : self.rank].reshape(n, self.n_blocks, self.block)
        lo = head.min(axis=2).astype(_F16)
        lo32 = lo.astype(np.float32)
        span = head.max(axis=2) - lo32
        scale = _round_up_f16(np.maximum(span, 0.0) / np.float32(255.0))
        scale = np.where(scale > 0, scale, _F16(1e-7))  # constant blocks
        sc32 = scale.astype(np.float32)
        q = (head - lo32[..., None]) / sc32[..., None]
        np.rint(q, out=q)
        codes = np.clip(q, 0, 255, out=q).astype(np.uint8)
        recon = self._dequant(codes, lo, scale)
        err = _round_up_f16(np.abs(head - recon).max(axis=2))
        tail = y[:, self.rank :]
        rho = _round_up_f16(np.sqrt(np.einsum("ij,ij->i", tail, tail)))
        aux = np.concatenate([lo, scale, err, rho[:, None]], axis=1).astype(_F16)
        return codes.reshape(n, self.rank), aux

    def _dequant(self, codes: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """float32 reconstruction, exactly as :meth:`estimate` computes it."""
        return lo.astype(np.float32)[..., None] + codes.astype(np.float32) * scale.astype(np.float32)[..., None]

    def decode(self, codes: np.ndarray, aux: np.ndarray) -> np.ndarray:
        """Reconstructed leading coordinates (n, rank) float32."""
        nb = self.n_blocks
        c = codes.reshape(len(codes), nb, self.block)
        return self._dequant(c, aux[:, :nb], aux[:, nb : 2 * nb]).reshape(len(codes), self.rank)

    def estimate(self, qy: np.ndarray, codes: np.ndarray, aux: np.ndarray):
        """Estimated scores and certified intervals of rotated queries vs coded vectors.

        Args:
            qy: (Q, D) rotated queries; codes (n, rank) and aux (n, aux_width) of n vectors.

        Returns:
            ``(est, lower, upper)``, each (Q, n) float32, with ``lower <= <q, x> <= upper``.
        """
        qy = np.atleast_2d(np.asarray(qy, dtype=np.float32))
        nb, bl = self.n_blocks, self.block
        a = _to_f32(aux)  # (n, aux_width): lo | scale | err | rho
        qh = qy[:, : self.rank].reshape(len(qy), nb, bl)
        # <q_b, lo_b + scale_b * c_b> summed over blocks, without materialising the
        # reconstruction: one (rows x bl) @ (bl x Q) product per block on the raw codes,
        # computed as (n, Q) (BLAS is several times faster this way round), over tiles of
        # rows whose float32 codes stay in cache.
        sums, w = self._terms(qy)
        est = a[:, :nb] @ sums.T
        for t in range(0, len(codes), _TILE_ROWS):
            c = _to_f32(codes[t : t + _TILE_ROWS])
            e, sc = est[t : t + _TILE_ROWS], a[t : t + _TILE_ROWS, nb : 2 * nb]
            for b in range(nb):
                e += (c[:, b * bl : (b + 1) * bl] @ qh[:, b, :].T) * sc[:, b, None]
        width = np.abs(a) @ w.T + _SLACK_ABS  # (n, Q)
        est, width = est.T, width.T
        return est, est - width, est + width

    def query_terms(self, qy: np.ndarray) -> QueryTerms:
        """What the bounds of one rotated query ``qy`` (D,) need, for compiled kernels that
        compute :meth:`estimate`'s interval row by row (query/native.py)."""
        qy = np.ascontiguousarray(qy, dtype=np.float32)
        sums, w = self._terms(qy[None, :])
        return QueryTerms(qy[: self.rank], sums[0], w[0], np.float32(_SLACK_ABS))

    def _terms(self, qy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block sums (Q, n_blocks) and width weights (Q, aux_width) of rotated queries."""
        qy = np.ascontiguousarray(qy, dtype=np.float32)
        sums = np.empty((len(qy), self.n_blocks), dtype=np.float32)
        w = np.empty((len(qy), self.aux_width), dtype=np.float32)
        _compiled_terms()(qy, self.rank, self.block, np.float32(_SLACK_REL), sums, w)
        return sums, w


def _terms_loop(qy, rank, block, slack_rel, sums, w):
    """Per rotated query q (rows of ``qy``): its block sums ``sum(q_b)`` over the ``rank``
    leading coordinates, and weights ``w`` with half-width = |aux| @ w (+ a constant):

        sum_b ||q_b||_1 * err_b + ||q_tail|| * rho + SLACK_REL * ||q|| * ||x||max

    where ``||x||max = sqrt(block) * sum_b (|lo_b| + 255 scale_b + err_b) + rho`` bounds
    the stored vector's norm (each coordinate of block b lies within err_b of
    [lo_b, lo_b + 255 scale_b]); scale, err and rho are non-negative, so every term is
    linear in |aux| (lo | scale | err | rho): one product for the whole interval.
    Plain loops, compiled by numba (:func:`_compiled_terms`): one query's terms cost
    ~1 us, where numpy's calls cost ~30.
    """
    nb = rank // block
    root = np.float32(np.sqrt(np.float32(block)))
    for i in range(qy.shape[0]):
        q = qy[i]
        total = np.float32(0.0)
        for j in range(q.shape[0]):
            total += q[j] * q[j]
        tail = np.float32(0.0)
        for j in range(rank, q.shape[0]):
            tail += q[j] * q[j]
        slack = slack_rel * np.sqrt(total)
        for b in range(nb):
            s, l1 = np.float32(0.0), np.float32(0.0)
            for j in range(b * block, (b + 1) * block):
                s += q[j]
                l1 += abs(q[j])
            sums[i, b] = s
            w[i, b] = slack * root
            w[i, nb + b] = slack * np.float32(255.0) * root
            w[i, 2 * nb + b] = l1 + slack * root
        w[i, 3 * nb] = np.sqrt(tail) + slack


@functools.cache
def _compiled_terms():
    import numba

    return numba.njit(cache=True, nogil=True)(_terms_loop)


def _to_f32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32: uint8 codes or float16 aux are converted by torch (~15x faster
    than numpy for float16). Read-only input (memory-mapped chunks) is only read."""
    if x.dtype == np.float32:
        return x
    import torch  # here, not at module level: serving starts without torch (~1.5 s to import)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write it
        return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
