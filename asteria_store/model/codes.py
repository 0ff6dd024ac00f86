"""Linear block codes for ECVH, with soft-decision maximum-likelihood decoding.

ECVH turns m margins ``z`` into a bucket: the message ``u`` (k bits) of the codeword ``c``
nearest to the hard bits ``b = z > 0`` under the soft cost ``sum(|z_i| : c_i != b_i)``.
Writing ``s(c) = 2c - 1`` (+1 where the bit is set, i.e. agrees with z > 0), that cost
equals ``(sum|z| - <s(c), z>) / 2``, so the
nearest codeword is the one of largest correlation ``<s(c), z>``, and ranking all messages
by correlation IS the probe sequence "next-best codewords in increasing soft cost".

The family used here is the first-order Reed-Muller / Hadamard code and its puncturings:
message u (k bits) -> codeword bits ``c_j = <u, j> mod 2`` for the code's positions j
(distinct k-bit column labels, m of them). Its correlations for all 2**k messages are ONE
(negated) fast Walsh-Hadamard transform of ``z`` scattered onto those positions: exact ML decoding in
O(2**k k), no syndrome table needed. The full code (m = 2**k) has minimum distance 2**(k-1)
and its 2**k sign vectors are orthogonal, so the code can place its 2**k bucket centroids
``V^T s(c)`` anywhere: ECVH with the full code is as expressive as k-means (and learned on
top). Punctured codes (m < 2**k) cost less and constrain the centroids to rank m.

Bit order of messages and keys: message bit i has weight 2**i (little-endian), the same
packing as :func:`asteria_store.model.router.bits_to_keys`.
"""

from __future__ import annotations


import numpy as np


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised fast Walsh-Hadamard transform along the last axis (length 2**k).

    ``fwht(x)[..., u] = sum_j (-1)**popcount(u & j) * x[..., j]`` (Sylvester order).
    """
    x = np.array(x, dtype=np.float32, copy=True)
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a = y[..., 0, :].copy()
        b = y[..., 1, :]
        y[..., 0, :] += b
        y[..., 1, :] = a - b
        h *= 2
    return x


def popcount_parity(a: np.ndarray) -> np.ndarray:
    """Parity of the number of set bits of each (non-negative) integer."""
    a = np.asarray(a, dtype=np.uint64).copy()
    parity = np.zeros(a.shape, dtype=np.uint8)
    while a.any():
        parity ^= (a & np.uint64(1)).astype(np.uint8)
        a >>= np.uint64(1)
    return parity


class HadamardCode:
    """A (possibly punctured) first-order Reed-Muller code of length m, dimension k.

    Args:
        k: message bits (2**k buckets).
        positions: the m distinct k-bit column labels that form the codeword's positions.
            ``None`` means all 2**k (the full Hadamard code).
    """

    def __init__(self, k: int, positions: np.ndarray | None = None):
        if not 1 <= k <= 24:
            raise ValueError(f"k must be in [1, 24], got {k}")
        self.k = k
        full = np.arange(2**k, dtype=np.int64)
        self.positions = full if positions is None else np.asarray(positions, dtype=np.int64)
        if len(np.unique(self.positions)) != len(self.positions) or self.positions.min() < 0 \
                or self.positions.max() >= 2**k:
            raise ValueError("positions must be distinct integers in [0, 2**k)")
        self.m = len(self.positions)

    @classmethod
    def punctured(cls, k: int, m: int, *, seed: int = 0) -> HadamardCode:
        """Keep ``m`` positions: every unit vector (so the message is readable from the
        codeword) plus random others; checked to have minimum distance >= 3."""
        if m >= 2**k:
            return cls(k)
        if m < k + 2:
            raise ValueError(f"a punctured code needs m >= k + 2 for distance 3, got m={m}, k={k}")
        rng = np.random.default_rng(seed)
        units = 1 << np.arange(k)
        rest = np.setdiff1d(np.arange(1, 2**k), units)
        for _ in range(100):
            extra = rng.choice(rest, m - k, replace=False)
            code = cls(k, np.sort(np.concatenate([units, extra])))
            if k > 16 or code.minimum_distance() >= 3:
                return code
        raise ValueError(f"no punctured code with distance >= 3 found for m={m}, k={k}")

    # -- matrices ------------------------------------------------------------------------

    @property
    def generator(self) -> np.ndarray:
        """G (k x m) over GF(2): column j is the k-bit label of position j."""
        return ((self.positions[None, :] >> np.arange(self.k)[:, None]) & 1).astype(np.uint8)

    @property
    def parity_check(self) -> np.ndarray:
        """H ((m - k) x m) over GF(2) with G H^T = 0, from G's systematic form."""
        return parity_check_from_generator(self.generator)

    def encode(self, messages: np.ndarray) -> np.ndarray:
        """Codeword bits (n, m) of integer messages (n,)."""
        msgs = np.asarray(messages, dtype=np.int64)
        return popcount_parity(msgs[:, None] & self.positions[None, :])

    def minimum_distance(self) -> int:
        """Smallest weight of a non-zero codeword (exhaustive over 2**k messages)."""
        weights = self.encode(np.arange(1, 2**self.k)).sum(axis=1)
        return int(weights.min())

    # -- decoding ------------------------------------------------------------------------

    def correlations(self, z: np.ndarray) -> np.ndarray:
        """``<s(c(u)), z>`` for every message u: (n, 2**k), via one FWHT.

        ``s_j(c(u)) = 2 c_j - 1 = -(-1)**<u, j>``, hence the minus sign.
        """
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if self.m == 2**self.k and np.array_equal(self.positions, np.arange(self.m)):
            return -fwht(z)
        full = np.zeros((z.shape[0], 2**self.k), dtype=np.float32)
        full[:, self.positions] = z
        return -fwht(full)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Soft-decision ML decoding: the message (int64) of the least-cost codeword."""
        return self.correlations(z).argmax(axis=1).astype(np.int64)

    def soft_cost(self, z: np.ndarray, messages: np.ndarray) -> np.ndarray:
        """``sum(|z_i| : c_i != (z_i > 0))`` of each row's given message (the definition)."""
        z = np.atleast_2d(z)
        bits = self.encode(messages)
        return (np.abs(z) * (bits != (z > 0))).sum(axis=1)

    def config(self) -> dict:
        return {"family": "hadamard", "k": self.k, "m": self.m}


def parity_check_from_generator(g: np.ndarray) -> np.ndarray:
    """A parity-check matrix of the binary code generated by the rows of ``g`` (full rank)."""
    g = g.copy() % 2
    k, n = g.shape
    pivots = []
    row = 0
    for col in range(n):
        hit = next((r for r in range(row, k) if g[r, col]), None)
        if hit is None:
            continue
        g[[row, hit]] = g[[hit, row]]
        for r in range(k):
            if r != row and g[r, col]:
                g[r] ^= g[row]
        pivots.append(col)
        row += 1
        if row == k:
            break
    if row != k:
        raise ValueError("generator matrix is not of full rank")
    free = [c for c in range(n) if c not in pivots]
    h = np.zeros((n - k, n), dtype=np.uint8)
    for i, c in enumerate(free):
        h[i, c] = 1
        for r, p in enumerate(pivots):
            h[i, p] = g[r, c]
    return h


def exhaustive_decode(code: HadamardCode, z: np.ndarray) -> np.ndarray:
    """Reference decoder: the least soft cost over every codeword (for tests)."""
    z = np.atleast_2d(z)
    msgs = np.arange(2**code.k)
    costs = np.stack([code.soft_cost(z, np.full(len(z), u)) for u in msgs], axis=1)
    return costs.argmin(axis=1)


__all__ = ["HadamardCode", "exhaustive_decode", "fwht", "parity_check_from_generator"]
