"""Scoring kernels of the batch path, the CPU features that choose one, and its threads.

The batch path asks one question of a probed bucket: which of its rows score at least a
query's threshold, and exactly what. Two kernels answer it with the same result:

* ``"f32"``: one float32 matrix product (BLAS). The default, and the only kernel worth
  running on a CPU without bfloat16 matrix units (AVX2 machines run a bfloat16 product
  ~8x slower than float32: docs/benchmarks.md).
* ``"bf16"``: a bfloat16 product with float32 accumulation, a certified bound on its
  error, then exact float32 rescoring of the rows whose approximate score is within that
  bound of the threshold. Chosen by default where the CPU has AMX or AVX-512 BF16 units.

Both return exact float32 scores of exactly the rows at or above the threshold, so the
search results do not depend on the kernel.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

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
    """``ASTERIA_KERNEL`` if set, else ``"bf16"`` on CPUs with bfloat16 matrix units
    (AMX-BF16 or AVX-512 BF16), else ``"f32"``."""
    env = os.environ.get("ASTERIA_KERNEL")
    if env:
        return check_kernel(env)
    return "bf16" if {"amx_bf16", "avx512_bf16"} & cpu_flags() else "f32"


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory map: only read
        approx = torch.from_numpy(q).bfloat16() @ torch.from_numpy(np.ascontiguousarray(v)).bfloat16().T
    out[...] = approx.float().numpy()
    return float(np.sqrt(np.einsum("ij,ij->i", v, v).max()))


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
