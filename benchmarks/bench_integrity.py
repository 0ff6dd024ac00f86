"""What integrity costs: checksums at ingest, a full ``verify``, and snapshot reads.

    # build (model trained on a 20k sample), ingest, checksum and verify timings:
    python benchmarks/bench_integrity.py --build ../shared/datasets/wordnet-minilm/base.f16.npy \\
        --store /tmp/asteria-bench/integrity-store
    # read costs only, on an existing store (runs against older checkouts too: it uses
    # nothing but the public API, so PYTHONPATH=<old checkout> gives the before figure):
    python benchmarks/bench_integrity.py --store /tmp/asteria-bench/integrity-store \\
        --queries ../shared/datasets/wordnet-minilm/queries_heldout.f16.npy --reads-only

Prints one JSON object per measurement. torch and BLAS run on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import timeit
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def build(base: Path, store_path: Path, sample_rows: int) -> None:
    import torch

    import asteria_store
    from asteria_store.storage import segments as seglib

    torch.set_num_threads(1)
    x = np.load(base, mmap_mode="r")
    if store_path.exists():
        shutil.rmtree(store_path)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    sample = np.asarray(x[np.random.default_rng(0).choice(len(x), sample_rows, replace=False)], dtype=np.float32)
    model = store_path.parent / "integrity-model.pt"
    t0 = time.perf_counter()
    asteria_store.train_model(sample, save=model, epochs=1, expected_size=len(x))
    emit(step="train_model", rows=sample_rows, seconds=round(time.perf_counter() - t0, 2))

    crc_seconds = [0.0]
    crc_bytes = [0]
    original = seglib.file_crc32c

    def timed_crc(path):
        t = time.perf_counter()
        out = original(path)
        crc_seconds[0] += time.perf_counter() - t
        crc_bytes[0] += os.path.getsize(path)
        return out

    seglib.file_crc32c = timed_crc
    with asteria_store.create(store_path, dim=x.shape[1], model=model) as store:
        t0 = time.perf_counter()
        store.ingest(base)
        ingest_s = time.perf_counter() - t0
        seglib.file_crc32c = original
        emit(step="ingest", rows=len(x), seconds=round(ingest_s, 2),
             checksum_seconds=round(crc_seconds[0], 3), checksum_mib=round(crc_bytes[0] / 2**20, 1),
             checksum_share=round(crc_seconds[0] / ingest_s, 4))
        for quick in (True, False):
            t0 = time.perf_counter()
            report = store.verify(quick=quick)
            emit(step="verify", quick=quick, ok=report.ok, chunks=report.checked_chunks,
                 seconds=round(time.perf_counter() - t0, 2))


def reads(store_path: Path, queries: Path, n_queries: int) -> None:
    import asteria_store

    q = np.asarray(np.load(queries, mmap_mode="r")[:n_queries], dtype=np.float32)
    with asteria_store.open(store_path, readonly=True) as store:
        per_len = min(timeit.repeat(lambda: len(store), number=2000, repeat=7)) / 2000
        emit(step="len", microseconds=round(per_len * 1e6, 2))
        for v in q[:50]:
            store.query(v, 10)  # warm the page cache and the view
        lat = []
        for v in q:
            t = time.perf_counter()
            store.query(v, 10)
            lat.append(time.perf_counter() - t)
        emit(step="query", probes=32, n=len(q), p50_ms=round(float(np.median(lat)) * 1e3, 3),
             p90_ms=round(float(np.percentile(lat, 90)) * 1e3, 3))
        store.search(q, 10)
        best = min(timeit.repeat(lambda: store.search(q, 10), number=1, repeat=3))
        emit(step="batch", probes=32, n=len(q), qps=round(len(q) / best, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, help="base vectors (.npy) to build the store from")
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--queries", type=Path)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--sample", type=int, default=20_000, help="rows the model is trained on")
    ap.add_argument("--reads-only", action="store_true")
    args = ap.parse_args()
    if args.build and not args.reads_only:
        build(args.build, args.store, args.sample)
    if args.queries:
        reads(args.store, args.queries, args.nq)


if __name__ == "__main__":
    main()
