"""Scoring kernels of the batch path, the CPU features that choose one, and its threads.

The batch path asks one question of a probed bucket: which of its rows score at least a
query's threshold, and exactly what. Two kernels answer it with the same result:

* ``"f32"``: one float32 matrix product (BLAS). The default, and the only kernel worth
  running on a CPU without bfloat16 matrix tiles (AVX2 machines run a bfloat16 product
  ~8x slower than float32: docs/benchmarks.md; AVX-512 BF16 ones run large products 1.6x
  faster, but the batch search's many small ones 1.5x slower end to end: docs/scale.md).
* ``"bf16"``: a bfloat16 product with float32 accumulation, a certified bound on its
  error, then exact float32 rescoring of the rows whose approximate score is within that
  bound of the threshold. Chosen by default where the CPU has AMX (bfloat16 tiles).

Both return exact float32 scores of exactly the rows at or above the threshold, so the
search results do not depend on the kernel.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError

KERNELS = ("f32", "bf16")

#: Unit roundoff of bfloat16 (8 significant bits).
_BF16_U = 2.0**-8


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise InvalidArgumentError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}.")
    return kernel


def default_kernel() -> str:
    """``ASTERIA_KERNEL`` if set, else ``"bf16"`` on CPUs with AMX-BF16 matrix tiles, else
    ``"f32"`` (AVX-512 BF16 alone measured slower than f32 end to end: docs/scale.md)."""
    env = os.environ.get("ASTERIA_KERNEL")
    if env:
        return check_kernel(env)
    return "bf16" if "amx_bf16" in cpu_flags() else "f32"


def default_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def check_threads(threads) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InvalidArgumentError(f"threads must be a positive integer or None, got {threads!r}.")
    return int(threads)


@functools.cache
def _blas_libs() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas").lib_controllers


class _OneBlasThread:
    """Holds numpy's BLAS at one thread while any search runs (nested and concurrent
    searches included): the first to enter saves the thread counts and sets 1, the last
    to leave restores them. A few microseconds (threadpoolctl's ``limit`` takes ~30)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved: list[int] = []

    @contextmanager
    def __call__(self) -> Iterator[None]:
        libs = _blas_libs()
        with self._lock:
            if self._users == 0:
                self._saved = [lib.get_num_threads() for lib in libs]
                for lib in libs:
                    lib.set_num_threads(1)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for lib, n in zip(libs, self._saved):
                        lib.set_num_threads(n)


#: numpy's BLAS on one thread while a search runs: the batch path runs its own threads (one
#: matrix product per thread; BLAS threads on top would oversubscribe the cores), and one
#: query's products are too small to split (and slow down when another job holds a core).
one_blas_thread = _OneBlasThread()


def score_into(kernel: str, q: np.ndarray, v: np.ndarray, out: np.ndarray) -> float:
    """Scores of ``q`` (Q, d) against ``v`` (n, d), both float32, into ``out`` (Q, n):
    exact (``"f32"``), or approximate within ``error_scale(q) * (the returned largest row
    norm of v)`` (``"bf16"``; 0.0 is returned for an exact kernel)."""
    if kernel == "f32":
        np.matmul(q, v.T, out=out)
        return 0.0
    import torch  # the bf16 kernel only: importing torch costs ~1.5 s, which CLI calls must not pay

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory map: only read
        qt, vt = torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(v))
    for (q0, q1, qpad), (r0, r1, rpad) in itertools.product(_query_tiles(len(q)), _row_tiles(len(v))):
        a = torch.zeros((qpad, q.shape[1]), dtype=torch.bfloat16)
        b = torch.zeros((rpad, v.shape[1]), dtype=torch.bfloat16)
        a[: q1 - q0], b[: r1 - r0] = qt[q0:q1], vt[r0:r1]
        out[q0:q1, r0:r1] = (a @ b.T)[: q1 - q0, : r1 - r0].float().numpy()
    return float(np.sqrt(np.einsum("ij,ij->i", v, v).max())) if len(v) else 0.0


#: The bf16 product runs on tiles of a few fixed shapes only. oneDNN builds and caches one
#: kernel per matrix shape (~0.5 MB each, up to 1,024 of them): free shapes grew a serving
#: process by ~700 MB over 1,000 queries (docs/scale.md). Queries are tiled by 256 and
#: padded to a power of two; rows by 512, padded to a multiple of 64: at most 9 x 8 shapes.
_BF16_QUERY_TILE = 256
_BF16_ROW_TILE = 512
_BF16_ROW_STEP = 64


def _tiles(n: int, tile: int, padded) -> Iterator[tuple[int, int, int]]:
    """``(start, stop, padded(stop - start))`` of each tile of ``n`` items."""
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        yield start, stop, padded(stop - start)


def _query_tiles(n: int) -> Iterator[tuple[int, int, int]]:
    return _tiles(n, _BF16_QUERY_TILE, lambda m: 1 << (m - 1).bit_length())


def _row_tiles(n: int) -> Iterator[tuple[int, int, int]]:
    return _tiles(n, _BF16_ROW_TILE, lambda m: -(-m // _BF16_ROW_STEP) * _BF16_ROW_STEP)


def bf16_shapes(nq: int, n: int) -> set[tuple[int, int]]:
    """The (queries, rows) shapes the bf16 kernel multiplies for a (nq x d) @ (d x n) product."""
    return {(qp, rp) for (_, _, qp), (_, _, rp) in itertools.product(_query_tiles(nq), _row_tiles(n))}


def error_scale(kernel: str, q: np.ndarray) -> np.ndarray:
    """Per query (Q, d), the kernel's score error per unit row norm: 0 for ``"f32"``.

    ``"bf16"``: with u = 2**-8, rounding q and v to bfloat16 changes each product q_i v_i
    by at most (2u + u^2)|q_i v_i|; accumulating d of them in float32 adds at most
    d * 2**-24 times their absolute sum, and rounding the result to bfloat16 adds u of it.
    The absolute sum is at most ||q|| ||v|| (Cauchy-Schwarz), so
    ``|exact - approx| <= eps ||q|| ||v||`` with eps below, rounded well up.
    """
    if kernel == "f32":
        return np.zeros(len(q), dtype=np.float32)
    eps = np.float32(4 * _BF16_U + q.shape[1] * 2.0**-22)
    return np.sqrt(np.einsum("ij,ij->i", q, q)) * eps
