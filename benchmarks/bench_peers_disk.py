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

``--system`` picks the peer (default ``faiss-ivf-disk``); the others:

* **DiskANN** (``diskann``): ``diskannpy.build_disk_index`` (Vamana graph of degree
  ``--graph-degree``, build list ``--build-complexity``, L2 on the normalised rows, which ranks
  as cosine; full float32 rows in the 4 KiB sectors of the disk index, ``--pq-bytes`` PQ codes
  per row in RAM), served from ``StaticDiskIndex`` (O_DIRECT + libaio reads, so its graph
  never enters the page cache) with ``--cache-nodes`` nodes cached at open (``--cache-mechanism
  2``: the BFS levels around the medoid). The sweep is the search list size ``--complexity`` at
  ``--beam-width``. diskannpy 0.7.0 pins numpy 1.25, so its children run under ``--python``
  (another venv) while this parent stays in the main environment. The index opens with 2 I/O
  contexts (``num_threads=2``: with 1, diskannpy 0.7.0 deadlocks in
  ``use_medoids_data_as_centroids``, which borrows a second context while it holds the only
  one); queries run on the calling thread and ``batch_search(num_threads=--threads)``.
* **LanceDB IVF_PQ** (``lancedb``): a Lance table of float16 rows and an int64 ``id``, an
  ``IVF_PQ`` index (``metric="dot"``, ``num_partitions = --nlist-factor x sqrt(N)``,
  ``--pq-bytes`` sub-vectors of 8 bits), served from a fresh connection and ``Session`` (its
  caches) per setting. The sweep is ``--nprobe`` with ``--refine-factor`` (re-ranks ``refine x
  k`` rows read from the table). ``LANCE_CPU_THREADS`` is set to ``--threads``; its I/O threads
  keep their default (with ``LANCE_IO_THREADS=1`` a 20k-row index build ran > 2.5x longer),
  pinned with the rest.

Rows of the new peers carry ``threads``. ``--timeout-s`` kills a child that runs too long.
"""

from __future__ import annotations

import sys

from harness import (anon_mib, join_memory_cap, peak_mib, pin_threads_from_argv,
                     remove_memory_cap)

THREADS = pin_threads_from_argv()  # before numpy is imported
import os  # noqa: E402

os.environ.setdefault("LANCE_CPU_THREADS", THREADS)

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np


def _load_pagecache():
    """asteria_store/testing/pagecache.py by path: a child under another interpreter (the
    DiskANN venv) cannot import the asteria_store package (torch, zarr, ...)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "asteria_store" / "testing" / "pagecache.py"
    spec = importlib.util.spec_from_file_location("asteria_pagecache", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.evict, mod.read_bytes


evict, read_bytes = _load_pagecache()

CAP_GROUP = "asteria-bench-peers"
BLOCK = 200_000  # rows added per call (float32 copies of this many rows at a time)


def index_path(a) -> Path:
    if a.system == "diskann":
        return Path(a.workdir) / f"diskann-{a.n}-R{a.graph_degree}-L{a.build_complexity}-pq{a.pq_bytes}"
    if a.system == "lancedb":
        return Path(a.workdir) / f"lancedb-{a.n}-x{a.nlist_factor}-pq{a.pq_bytes}"
    return Path(a.workdir) / f"faiss-ivf-sqfp16-{a.n}-x{a.nlist_factor}.index"


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def recall_at_10(ids, truth) -> float:
    return float(np.mean([len(set(np.asarray(r).tolist()) & set(g.tolist())) / 10 for r, g in zip(ids, truth)]))


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


def serve_sweep(a, head: dict, path: Path, settings, open_index, one, batch) -> None:
    """The cold / warm phases of :func:`child_serve` for a peer given as functions:
    ``open_index(setting)`` (after the eviction), ``one(index, setting, vector) -> ids`` and
    ``batch(index, setting, queries) -> ids`` (k = 10). ``head`` names the peer."""
    q = np.load(Path(a.data) / "queries.f16.npy").astype(np.float32)
    truth = np.load(Path(a.data) / f"gt_{a.n}_ids.npy")[:, :10]
    memory = join_memory_cap(CAP_GROUP, a.cap_mib) if a.cap_mib else "uncapped"
    head = {**head, "n": a.n, "memory": memory, "threads": int(a.threads), "disk_bytes": disk_bytes(path)}
    for setting in settings:
        evict(path)
        r0, t = read_bytes(), time.perf_counter()
        index = open_index(setting)
        open_s, open_read = time.perf_counter() - t, read_bytes() - r0
        lat, io = [], []
        for v in q[: a.cold]:
            r0, t = read_bytes(), time.perf_counter()
            one(index, setting, v)
            lat.append(time.perf_counter() - t)
            io.append(read_bytes() - r0)
        emit({**head, "phase": "cold", **setting, "open_ms": open_s * 1000, "open_kib_read": open_read / 1024,
              "first_ms": lat[0] * 1000, "p50_ms": float(np.median(lat)) * 1000,
              "first_kib_read": io[0] / 1024, "mean_kib_read": float(np.mean(io)) / 1024, "queries": len(lat)},
             a.out)
        batch(index, setting, q)  # warm-up
        t = time.perf_counter()
        ids = batch(index, setting, q)
        batch_s = time.perf_counter() - t
        lat = []
        for v in q[: a.single]:
            t = time.perf_counter()
            one(index, setting, v)
            lat.append(time.perf_counter() - t)
        emit({**head, "phase": "serve", **setting, "recall@10": recall_at_10(ids, truth),
              "batch_qps": len(q) / batch_s,
              "p50_ms": float(np.percentile(lat, 50)) * 1000, "p99_ms": float(np.percentile(lat, 99)) * 1000,
              "anon_mib": anon_mib(), "peak_rss_mib": peak_mib()}, a.out)
        del index


def diskann_params(a) -> dict:
    return {"graph_degree": a.graph_degree, "build_complexity": a.build_complexity, "pq_bytes": a.pq_bytes,
            "metric": "l2"}


def child_build_diskann(a) -> None:
    import diskannpy

    base = np.load(Path(a.data) / "base.f16.npy", mmap_mode="r")[: a.n]
    d = base.shape[1]
    path = index_path(a)
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # DiskANN's input: a .bin file (uint32 n, uint32 d, float32 rows), written in blocks
    vectors = path / "input_vectors.bin"
    with open(vectors, "wb") as f:
        np.array([a.n, d], dtype=np.uint32).tofile(f)
        for start in range(0, a.n, BLOCK):
            np.asarray(base[start : start + BLOCK], dtype=np.float32).tofile(f)
    write_s = time.perf_counter() - t0
    diskannpy.build_disk_index(
        data=str(vectors), vector_dtype=np.float32, distance_metric="l2", index_directory=str(path),
        complexity=a.build_complexity, graph_degree=a.graph_degree,
        # diskann sizes the in-RAM PQ codes as floor(budget bytes / N) per row
        search_memory_maximum=(a.pq_bytes + 0.5) * a.n / 2**30, build_memory_maximum=a.build_memory_gib,
        num_threads=int(a.threads), pq_disk_bytes=0)
    build_s = time.perf_counter() - t0
    for leftover in (vectors, path / "ann_mem.index.data"):  # the input and an intermediate
        leftover.unlink(missing_ok=True)
    emit({"system": "diskann", "phase": "build", "n": a.n, **diskann_params(a), "threads": int(a.threads),
          "write_input_s": write_s, "build_s": build_s, "peak_rss_mib": peak_mib(), "disk_bytes": disk_bytes(path),
          "files": sorted(f.name for f in path.iterdir())}, a.out)


def child_serve_diskann(a) -> None:
    import diskannpy

    path = index_path(a)
    nt = int(a.threads)

    def open_index(setting):
        # num_threads=2: two I/O contexts; with 1 the open deadlocks (module docstring)
        return diskannpy.StaticDiskIndex(index_directory=str(path), num_threads=max(2, nt),
                                         num_nodes_to_cache=a.cache_nodes,
                                         cache_mechanism=a.cache_mechanism)

    def one(index, setting, v):
        return index.search(v, 10, setting["complexity"], a.beam_width).identifiers

    def batch(index, setting, q):
        return index.batch_search(q, 10, setting["complexity"], nt, a.beam_width).identifiers

    settings = [{"complexity": int(c), "beam_width": a.beam_width} for c in a.complexity.split(",")]
    head = {"system": "diskann", **diskann_params(a), "cache_nodes": a.cache_nodes,
            "cache_mechanism": a.cache_mechanism, "open_io_contexts": max(2, nt)}
    serve_sweep(a, head, path, settings, open_index, one, batch)


def lance_partitions(a) -> int:
    return int(round(a.nlist_factor * math.sqrt(a.n)))


def child_build_lancedb(a) -> None:
    import lancedb
    import pyarrow as pa

    base = np.load(Path(a.data) / "base.f16.npy", mmap_mode="r")[: a.n]
    d = base.shape[1]
    path = index_path(a)
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float16(), d))])

    def batches():
        for start in range(0, a.n, BLOCK):
            block = np.ascontiguousarray(base[start : start + BLOCK])
            vec = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), d)
            ids = pa.array(np.arange(start, start + len(block), dtype=np.int64))
            yield pa.RecordBatch.from_arrays([ids, vec], schema=schema)

    t0 = time.perf_counter()
    db = lancedb.connect(str(path))
    table = db.create_table("rows", data=pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite")
    write_s = time.perf_counter() - t0
    table.create_index(metric="dot", vector_column_name="vector", index_type="IVF_PQ",
                       num_partitions=lance_partitions(a), num_sub_vectors=a.pq_bytes, num_bits=8)
    emit({"system": "lancedb", "phase": "build", "n": a.n, "num_partitions": lance_partitions(a),
          "num_sub_vectors": a.pq_bytes, "metric": "dot", "vector_dtype": "float16", "threads": int(a.threads),
          "lancedb_version": lancedb.__version__, "write_table_s": write_s,
          "build_s": time.perf_counter() - t0, "peak_rss_mib": peak_mib(), "disk_bytes": disk_bytes(path)}, a.out)


def child_serve_lancedb(a) -> None:
    import lancedb

    path = index_path(a)

    def open_index(setting):
        # a fresh Session: no index or metadata cached from the last setting's connection
        return lancedb.connect(str(path), session=lancedb.Session()).open_table("rows")

    def one(table, setting, v):
        query = (table.search(v, vector_column_name="vector").distance_type("dot").nprobes(setting["nprobe"])
                 .limit(10).select(["id"]))
        if setting["refine_factor"]:
            query = query.refine_factor(setting["refine_factor"])
        return query.to_arrow()["id"].to_numpy()

    def batch(table, setting, q):  # lancedb answers one vector per search: a loop
        return [one(table, setting, v) for v in q]

    settings = [{"nprobe": int(x), "refine_factor": a.refine_factor} for x in a.nprobe.split(",")]
    head = {"system": "lancedb", "num_partitions": lance_partitions(a), "num_sub_vectors": a.pq_bytes,
            "lancedb_version": lancedb.__version__}
    serve_sweep(a, head, path, settings, open_index, one, batch)


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
    ap.add_argument("--system", choices=("faiss-ivf-disk", "diskann", "lancedb"), default="faiss-ivf-disk")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter of the build/serve children (diskann: a venv with diskannpy)")
    ap.add_argument("--timeout-s", type=float, default=None, help="kill a child that runs longer than this")
    g = ap.add_argument_group("diskann")
    g.add_argument("--graph-degree", type=int, default=64, help="Vamana R")
    g.add_argument("--build-complexity", type=int, default=100, help="Vamana build list size L")
    g.add_argument("--build-memory-gib", type=float, default=8.0)
    g.add_argument("--complexity", default="20,30,50,80", help="search list sizes L (>= 10)")
    g.add_argument("--beam-width", type=int, default=4)
    g.add_argument("--cache-nodes", type=int, default=10000, help="nodes cached in RAM at open")
    g.add_argument("--cache-mechanism", type=int, default=2,
                   help="1: the nodes sample queries visit (runs them at open), 2: BFS levels from the medoid")
    g = ap.add_argument_group("diskann and lancedb")
    g.add_argument("--pq-bytes", type=int, default=96, help="PQ bytes (8-bit sub-vectors) per row in the index")
    g = ap.add_argument_group("lancedb")
    g.add_argument("--refine-factor", type=int, default=10, help="0: no refine")
    ap.add_argument("--child", choices=("build", "serve"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    children = {("faiss-ivf-disk", "build"): child_build, ("faiss-ivf-disk", "serve"): child_serve,
                ("diskann", "build"): child_build_diskann, ("diskann", "serve"): child_serve_diskann,
                ("lancedb", "build"): child_build_lancedb, ("lancedb", "serve"): child_serve_lancedb}
    if a.child:
        return children[a.system, a.child](a)
    for child in (["build"] if not index_path(a).exists() else []) + ["serve"]:
        try:
            subprocess.run([a.python, __file__, *sys.argv[1:], "--child", child], check=True, timeout=a.timeout_s)
        finally:
            if child == "serve":
                remove_memory_cap(CAP_GROUP)


if __name__ == "__main__":
    main()
