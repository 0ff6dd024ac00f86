"""Speed of the scoring kernels (query/kernels.py) on this CPU, one thread.

    python benchmarks/bench_kernels.py

GFLOP/s of ``score_into`` in float32 and bfloat16 for a bucket-sized product (62 queries
x 104 rows: 2,000 queries at 32 probes of 1,024 buckets of the wordnet store) and two
larger ones. bfloat16 pays off on large products only with bfloat16 units (AMX tiles, AVX-512 BF16);
``kernels.cpu_flags()`` is printed to say which this is.
"""

from __future__ import annotations

from harness import pin_threads_from_argv

pin_threads_from_argv()  # one thread, before numpy is imported

import time

import numpy as np
import torch

from asteria_store.query import kernels

SHAPES = ((62, 104), (256, 1024), (2000, 4096))


def gflops(kernel: str, q: np.ndarray, v: np.ndarray) -> float:
    out = np.empty((len(q), len(v)), dtype=np.float32)
    n = max(3, int(2e8 / out.size / q.shape[1]))
    kernels.score_into(kernel, q, v, out)
    best = min(_time(kernel, q, v, out, n) for _ in range(3))
    return 2 * out.size * q.shape[1] / best / 1e9


def _time(kernel, q, v, out, n) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        kernels.score_into(kernel, q, v, out)
    return (time.perf_counter() - t0) / n


def main() -> None:
    torch.set_num_threads(1)
    flags = kernels.cpu_flags()
    units = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    print(f"CPU flags: {', '.join(units) or 'none of amx_bf16, avx512_bf16, avx512f, avx2'}; "
          f"default kernel: {kernels.default_kernel()}")
    rng = np.random.default_rng(0)
    for nq, m in SHAPES:
        q = rng.standard_normal((nq, 384)).astype(np.float32)
        v = rng.standard_normal((m, 384)).astype(np.float32)
        f32, bf16 = gflops("f32", q, v), gflops("bf16", q, v)
        print(f"({nq} x 384) @ (384 x {m}): f32 {f32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s, "
              f"bf16 / f32 = {bf16 / f32:.2f}")


if __name__ == "__main__":
    main()
