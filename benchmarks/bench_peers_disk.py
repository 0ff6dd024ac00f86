"""Disk-backed peers on the growth data, served under the same memory cap as asteria.

    python benchmarks/bench_peers_disk.py --data /tmp/asteria-bench/growth-10m --n 10000000 \\
        --workdir /tmp/asteria-bench/peers --cap-mib 2048 --nprobe 8,16,32,64 --threads 2 \\
        --out docs/results/peers_disk.jsonl

System: **FAISS IVF with its lists on disk** (``faiss-ivf-disk``): ``IndexIVFScalarQuantizer``
with float16 lists (the bytes per row of an asteria float16 store), an HNSW coarse quantizer
(assigning 10M rows to ~12k lists by brute force would take most of an hour on 2 cores), and
``nlist = --nlist-factor x sqrt(N)`` (FAISS's guideline: 4-16 sqrt(N)), trained on
``--train-per-list`` sample rows per list (default 32). Built in RAM (uncapped: its build RSS is reported), written once, then
served from ``read_index(path, IO_FLAG_MMAP_IFC)``: the lists stay a shared read-only map
of the file, paged in on demand like asteria's chunks.

Phases, each in its own process (``--child``) so that its RSS and reads are its own:

* **build** (skipped when the index file exists): seconds, peak RSS, file bytes.
* **serve**, inside a memory cgroup of ``--cap-mib`` (page cache included; harness.py): for
  each nprobe, the index file is evicted from the page cache and ``--cold`` single queries
  are timed with the bytes this process read from storage (``/proc/self/io``); then, warm,
  one batch of all queries (QPS, recall@10 against ``gt_{N}_ids.npy``) and ``--single``
  queries one at a time (p50, p99), and the anonymous memory held.

Prints and appends one JSON line per phase and setting to ``--out``.
"""

from __future__ import annotations

import sys

from harness import (anon_mib, join_memory_cap, peak_mib, pin_threads_from_argv,
                     remove_memory_cap)

pin_threads_from_argv()  # before numpy is imported

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np

from asteria_store.testing.pagecache import evict, read_bytes

CAP_GROUP = "asteria-bench-peers"
BLOCK = 200_000  # rows added per call (float32 copies of this many rows at a time)


def index_path(a) -> Path:
    return Path(a.workdir) / f"faiss-ivf-sqfp16-{a.n}-x{a.nlist_factor}.index"


def nlist_for(a) -> int:
    return int(round(a.nlist_factor * math.sqrt(a.n)))


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def child_build(a) -> None:
    import faiss

    faiss.omp_set_num_threads(int(a.threads))
    base = np.load(Path(a.data) / "base.f16.npy", mmap_mode="r")[: a.n]
    d, nlist = base.shape[1], nlist_for(a)
    t0 = time.perf_counter()
    quantizer = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(a.n, size=min(a.n, a.train_per_list * nlist), replace=False))
    index.cp.max_points_per_centroid = a.train_per_list
    index.train(np.asarray(base[sample], dtype=np.float32))
    train_s = time.perf_counter() - t0
    for start in range(0, a.n, BLOCK):
        index.add(np.asarray(base[start : start + BLOCK], dtype=np.float32))
        print(f"faiss add {start + BLOCK:,} / {a.n:,} rows, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    path = index_path(a)
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    emit({"system": "faiss-ivf-disk", "phase": "build", "n": a.n, "nlist": nlist, "train_rows": len(sample),
          "train_s": train_s,
          "build_s": time.perf_counter() - t0, "peak_rss_mib": peak_mib(), "disk_bytes": path.stat().st_size},
         a.out)


def child_serve(a) -> None:
    import faiss

    faiss.omp_set_num_threads(int(a.threads))
    q = np.load(Path(a.data) / "queries.f16.npy").astype(np.float32)
    truth = np.load(Path(a.data) / f"gt_{a.n}_ids.npy")[:, :10]
    memory = join_memory_cap(CAP_GROUP, a.cap_mib) if a.cap_mib else "uncapped"
    path = index_path(a)
    head = {"system": "faiss-ivf-disk", "n": a.n, "nlist": nlist_for(a), "memory": memory,
            "disk_bytes": path.stat().st_size}
    for nprobe in [int(x) for x in a.nprobe.split(",")]:
        evict(path)
        r0, t = read_bytes(), time.perf_counter()
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        open_s, open_read = time.perf_counter() - t, read_bytes() - r0
        index.nprobe = nprobe
        lat, io = [], []
        for v in q[: a.cold]:
            r0, t = read_bytes(), time.perf_counter()
            index.search(v[None], 10)
            lat.append(time.perf_counter() - t)
            io.append(read_bytes() - r0)
        emit({**head, "phase": "cold", "nprobe": nprobe, "open_ms": open_s * 1000, "open_kib_read": open_read / 1024,
              "first_ms": lat[0] * 1000, "p50_ms": float(np.median(lat)) * 1000,
              "first_kib_read": io[0] / 1024, "mean_kib_read": float(np.mean(io)) / 1024, "queries": len(lat)},
             a.out)
        index.search(q, 10)  # warm-up
        t = time.perf_counter()
        _, ids = index.search(q, 10)
        batch_s = time.perf_counter() - t
        lat = []
        for v in q[: a.single]:
            t = time.perf_counter()
            index.search(v[None], 10)
            lat.append(time.perf_counter() - t)
        recall = float(np.mean([len(set(r.tolist()) & set(g.tolist())) / 10 for r, g in zip(ids, truth)]))
        emit({**head, "phase": "serve", "nprobe": nprobe, "recall@10": recall, "batch_qps": len(q) / batch_s,
              "p50_ms": float(np.percentile(lat, 50)) * 1000, "p99_ms": float(np.percentile(lat, 99)) * 1000,
              "anon_mib": anon_mib(), "peak_rss_mib": peak_mib()}, a.out)
        del index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder written by growth_data.py")
    ap.add_argument("--n", type=int, required=True, help="rows of the base (a prefix), with gt_{N}_ids.npy")
    ap.add_argument("--workdir", required=True, help="where the index file is built and kept")
    ap.add_argument("--nlist-factor", type=float, default=4.0, help="nlist = factor x sqrt(N)")
    ap.add_argument("--train-per-list", type=int, default=32, help="k-means sample rows per list")
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--cap-mib", type=int, default=0, help="serve inside a memory cgroup of this many MiB")
    ap.add_argument("--cold", type=int, default=20)
    ap.add_argument("--single", type=int, default=200)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--child", choices=("build", "serve"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "build":
        return child_build(a)
    if a.child == "serve":
        return child_serve(a)
    for child in (["build"] if not index_path(a).exists() else []) + ["serve"]:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", child], check=True)
        if child == "serve":
            remove_memory_cap(CAP_GROUP)


if __name__ == "__main__":
    main()
