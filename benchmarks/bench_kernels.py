"""Speed of the scoring kernels (query/kernels.py) on this CPU, one thread.

    python benchmarks/bench_kernels.py

GFLOP/s of ``score_into`` in float32 and bfloat16 for a bucket-sized product (62 queries
x 104 rows: 2,000 queries at 32 probes of 1,024 buckets of the wordnet store) and two
larger ones. bfloat16 pays off on large products only with bfloat16 units (AMX tiles, AVX-512 BF16);
``kernels.cpu_flags()`` is printed to say which this is. Batch products in int8 (torch's
``_int_mm``, int8 x int8 -> int32) are timed against float32 where torch has it.

Then one query's scan, compiled (numba), over 3,500 rows (32 probes of the wordnet store),
in rows scored per microsecond, each loop form as written in numba:

* ``f32 rows``: full float32 vectors (384-d), one dot product per row;
* ``f16 rows by lookup``: full float16 vectors decoded through a 65,536-entry table;
* ``lrsq 8-bit``: the LRSQ codes (rank 288, blocks of 32, a scale per block), each
  block's products added lane by lane into one block-wide accumulator, and with one
  reduction per block (query/compiled.py's form: with the block width known only at run
  time the compiler vectorises it);
* ``int8 x int16``: the same codes against an int16 query, int32 sums per block;
* ``one block of 384``: LRSQ's default since issue 20, every dimension under one scale: one
  dot product per row, as float32 and as int16 x 8-bit with int32 sums;
* ``4-bit LUT``: 192 4-bit codes per row (two per byte), each looked up in a 16-entry
  table per sub-space (product quantization's asymmetric distance, as FAISS and ScaNN
  score; they run it with in-register shuffles, which numba cannot express).
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
    for nq, m in SHAPES:
        r = int8_gemm(nq, m)
        if r is None:
            print(f"({nq} x 384) @ (384 x {m}): torch has no int8 product here")
        else:
            print(f"({nq} x 384) @ (384 x {m}): f32 {r[0]:.1f} GOP/s, int8 {r[1]:.1f} GOP/s, int8 / f32 = {r[1] / r[0]:.2f}")
    print("one query's scan of 3,500 rows, compiled (rows per us, higher is faster):")
    for name, rate in scan_rates().items():
        print(f"  {name}: {rate:.1f}")


def int8_gemm(nq: int, m: int, d: int = 384) -> tuple[float, float] | None:
    """GOP/s of a float32 product and of torch's int8 one, (nq x d) @ (d x m)."""
    if not hasattr(torch, "_int_mm"):
        return None
    rng = np.random.default_rng(0)
    a, b = (torch.from_numpy(rng.integers(-127, 128, s, dtype=np.int8)) for s in ((nq, d), (d, m)))
    af, bf = a.float(), b.float()
    try:
        torch._int_mm(a, b)
    except RuntimeError:  # shapes or CPU it does not take
        return None
    out = []
    for fn in (lambda: af @ bf, lambda: torch._int_mm(a, b)):
        n = max(3, int(2e8 / (nq * m * d)))
        best = min(_loop(fn, n) for _ in range(3))
        out.append(2 * nq * m * d / best / 1e9)
    return out[0], out[1]


def _loop(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def scan_kernels():
    """The one-query scan loops (module docstring), compiled."""
    import numba

    fast = {"reassoc", "contract"}

    @numba.njit(fastmath=fast)
    def float_rows(v, q, out):  # float32 rows, or 8-bit codes of one block (compiled per dtype)
        for r in range(v.shape[0]):
            s = np.float32(0)
            for j in range(v.shape[1]):
                s += np.float32(v[r, j]) * q[j]
            out[r] = s

    @numba.njit(fastmath=fast)
    def u8_i16_rows(c, q, out):
        for r in range(c.shape[0]):
            s = np.int32(0)
            for j in range(c.shape[1]):
                s += np.int32(c[r, j]) * np.int32(q[j])
            out[r] = s

    @numba.njit(fastmath=fast)
    def f16_rows(v, q, half, out):
        for r in range(v.shape[0]):
            s = np.float32(0)
            for j in range(v.shape[1]):
                s += half[v[r, j]] * q[j]
            out[r] = s

    @numba.njit(fastmath=fast)
    def lrsq_lanes(codes, q, scale, out):
        nb = scale.shape[1]
        bl = codes.shape[1] // nb
        acc = np.empty(bl, np.float32)
        for r in range(codes.shape[0]):
            for j in range(bl):
                acc[j] = 0.0
            for b in range(nb):
                sc = scale[r, b]
                for j in range(bl):
                    acc[j] += sc * (np.float32(codes[r, b * bl + j]) * q[b * bl + j])
            s = np.float32(0)
            for j in range(bl):
                s += acc[j]
            out[r] = s

    @numba.njit(fastmath=fast)
    def lrsq_blocks(codes, q, scale, out):
        nb = scale.shape[1]
        bl = codes.shape[1] // nb
        for r in range(codes.shape[0]):
            s = np.float32(0)
            for b in range(nb):
                d = np.float32(0)
                for j in range(bl):
                    d += np.float32(codes[r, b * bl + j]) * q[b * bl + j]
                s += d * scale[r, b]
            out[r] = s

    @numba.njit(fastmath=fast)
    def int8_int16(codes, qi, scale, out):
        nb = scale.shape[1]
        bl = codes.shape[1] // nb
        acc = np.empty(bl, np.int32)
        for r in range(codes.shape[0]):
            s = np.float32(0)
            for b in range(nb):
                for j in range(bl):
                    acc[j] = np.int32(codes[r, b * bl + j]) * np.int32(qi[b * bl + j])
                d = np.int32(0)
                for j in range(bl):
                    d += acc[j]
                s += np.float32(d) * scale[r, b]
            out[r] = s

    @numba.njit(fastmath=fast)
    def lut4(codes, lut, out):
        for r in range(codes.shape[0]):
            s = np.float32(0)
            for j in range(codes.shape[1]):
                c = codes[r, j]
                s += lut[2 * j, c & 15] + lut[2 * j + 1, c >> 4]
            out[r] = s

    return float_rows, f16_rows, lrsq_lanes, lrsq_blocks, int8_int16, lut4, u8_i16_rows


def scan_rates(n: int = 3500) -> dict[str, float]:
    """Rows per microsecond of each one-query scan (best of 3 medians of 200 calls)."""
    half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    float_rows, f16_rows, lanes, blocks, i8, lut4, u8_i16 = scan_kernels()
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, 384)).astype(np.float32)
    q = rng.standard_normal(384).astype(np.float32)
    codes = rng.integers(0, 256, (n, 288), dtype=np.uint8)
    scale = rng.random((n, 9)).astype(np.float32)
    qi = np.round(q[:288] / np.abs(q[:288]).max() * 32767).astype(np.int16)
    c4 = rng.integers(0, 256, (n, 96), dtype=np.uint8)
    lut = rng.standard_normal((192, 16)).astype(np.float32)
    out = np.empty(n, dtype=np.float32)
    out32 = np.empty(n, dtype=np.int32)
    c384 = rng.integers(0, 256, (n, 384), dtype=np.uint8)
    q16 = np.round(q / np.abs(q).max() * 32767).astype(np.int16)
    f16 = v.astype(np.float16).view(np.uint16)
    cases = {"f32 rows (384 x 4 B)": lambda: float_rows(v, q, out),
             "f16 rows by lookup (384 x 2 B)": lambda: f16_rows(f16, q, half, out),
             "lrsq 8-bit, lanes (288 B)": lambda: lanes(codes, q[:288], scale, out),
             "lrsq 8-bit, per-block sums (288 B)": lambda: blocks(codes, q[:288], scale, out),
             "int8 x int16 (288 B)": lambda: i8(codes, qi, scale, out),
             "4-bit LUT (96 B)": lambda: lut4(c4, lut, out),
             "lrsq 8-bit, one block of 384 (384 B)": lambda: float_rows(c384, q, out),
             "8-bit x int16, one block of 384 (384 B)": lambda: u8_i16(c384, q16, out32)}
    rates = {}
    for name, fn in cases.items():
        fn()
        best = min(float(np.median([_loop(fn, 1) for _ in range(200)])) for _ in range(3))
        rates[name] = n / best / 1e6
    return rates


if __name__ == "__main__":
    main()
