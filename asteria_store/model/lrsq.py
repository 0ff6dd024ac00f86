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

import warnings
from dataclasses import dataclass

import numpy as np
import torch

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


@dataclass(frozen=True)
class LRSQ:
    """Quantizer of rotated vectors: ``rank`` leading coordinates in blocks of ``block``."""

    rank: int
    block: int = 32

    def __post_init__(self) -> None:
        if self.rank < 1 or self.block < 1 or self.rank % self.block:
            raise ValueError(f"rank ({self.rank}) must be a positive multiple of block ({self.block})")

    @property
    def n_blocks(self) -> int:
        return self.rank // self.block

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
        est = a[:, :nb] @ qh.sum(axis=2).T
        for t in range(0, len(codes), _TILE_ROWS):
            c = _to_f32(codes[t : t + _TILE_ROWS])
            e, sc = est[t : t + _TILE_ROWS], a[t : t + _TILE_ROWS, nb : 2 * nb]
            for b in range(nb):
                e += (c[:, b * bl : (b + 1) * bl] @ qh[:, b, :].T) * sc[:, b, None]
        width = np.abs(a) @ self._width_weights(qy).T + _SLACK_ABS  # (n, Q)
        est, width = est.T, width.T
        return est, est - width, est + width

    def _width_weights(self, qy: np.ndarray) -> np.ndarray:
        """Per query, weights w (Q, aux_width) with half-width = |aux| @ w (+ a constant):

            sum_b ||q_b||_1 * err_b + ||q_tail|| * rho + SLACK_REL * ||q|| * ||x||max

        where ``||x||max = sqrt(block) * sum_b (|lo_b| + 255 scale_b + err_b) + rho`` bounds
        the stored vector's norm (each coordinate of block b lies within err_b of
        [lo_b, lo_b + 255 scale_b]); scale, err and rho are non-negative, so every term is
        linear in |aux|: one product for the whole interval.
        """
        nb, bl = self.n_blocks, self.block
        qh = qy[:, : self.rank].reshape(len(qy), nb, bl)
        q_l1 = np.abs(qh).sum(axis=2)  # (Q, nb)
        q_tail = np.sqrt((qy[:, self.rank :] ** 2).sum(axis=1))
        slack = _SLACK_REL * np.sqrt((qy * qy).sum(axis=1))  # (Q,)
        root = np.float32(np.sqrt(bl))
        w = np.empty((len(qy), self.aux_width), dtype=np.float32)
        w[:, :nb] = (slack * root)[:, None]
        w[:, nb : 2 * nb] = (slack * 255 * root)[:, None]
        w[:, 2 * nb : 3 * nb] = q_l1 + (slack * root)[:, None]
        w[:, 3 * nb] = q_tail + slack
        return w


def _to_f32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32: uint8 codes or float16 aux are converted by torch (~15x faster
    than numpy for float16). Read-only input (memory-mapped chunks) is only read."""
    if x.dtype == np.float32:
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write it
        return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
