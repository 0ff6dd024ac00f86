"""asteria-store against peer ANN systems on the same vectors, one subprocess per system.

WordNet (MiniLM, 106,697 x 384), example-sentence queries and held-out queries:

    python benchmarks/compare.py --base ../shared/datasets/wordnet-minilm/base.f16.npy \\
        --queries ../shared/datasets/wordnet-minilm/queries_examples.f16.npy \\
        --gt ../shared/datasets/wordnet-minilm/gt_examples_ids.npy \\
        --store /tmp/asteria-bench/wordnet-store --nq 2000 --k 10 --threads 1 \\
        --systems asteria,faiss-flat,faiss-ivf,faiss-ivfpq,faiss-hnsw,hnswlib,lancedb \\
        --out benchmarks/results/compare_wordnet_examples.jsonl \\
        --plot docs/img/compare_wordnet_examples.png --workdir /tmp/asteria-bench/compare

    python benchmarks/compare.py ... --queries .../queries_heldout.f16.npy \\
        --gt .../gt_heldout_ids.npy --out benchmarks/results/compare_wordnet_heldout.jsonl \\
        --plot docs/img/compare_wordnet_heldout.png   (other flags as above)

Peers need the ``peers`` extra (faiss-cpu, hnswlib, lancedb, scann); one that is not installed
is reported as skipped. Without ``--gt`` the exact top-k (inner product of L2-normalised float32
vectors, numpy) is computed here and saved in ``--workdir``. ``--threads 1,2`` runs every
system at each thread count.

Each system runs in its own ``python compare.py --child SYSTEM`` process, so ``peak_rss_mib``
(the child's VmHWM) is its own; ``rss_mib`` is the resident size once the index is
built and the input array dropped. Per setting: ``batch_qps`` (one search call over all nq
queries, after the same batch once untimed as a warm-up), ``single_qps`` and p50/p99 latency of k=10 queries issued
one at a time (``--single`` of them), recall@1/10(/100 if k >= 100) as top-k id set overlap.

Fairness: every system gets the same float32 L2-normalised vectors and queries and the same
thread count (OMP/OpenBLAS/MKL/LANCE_CPU_THREADS set before import, plus faiss/torch/hnswlib
thread setters). The faiss and hnswlib peers hold the base in RAM ("(RAM)"); asteria and
lancedb serve from disk (warm page cache after the warm-up; drop caches for cold numbers).
Disk indexes are built once (asteria at ``--store``, lancedb in ``--workdir``; with the
largest ``--threads``) and reused; their build time is kept in ``workdir/builds.json``.
faiss HNSW's graph is saved in ``--workdir`` after its first build (one per thread count)
and read back by later runs, which report the first build's ``build_s``. ``--rounds N``
runs every system N times, taking turns, and reports each timing's median (this machine's
speed drifts by 1.5-2x over minutes: one round can favour whichever system ran first). IVF
indexes (faiss, lancedb) get ``--nlist`` lists, by default the asteria store's bucket count.
``kib_read_per_query`` for RAM indexes counts vectors/codes touched x their size (centroids,
graph links not counted); lancedb does not expose it. lancedb's batch is one multi-vector
query (rows tagged ``query_index``); its sample_rate is lowered so it trains all nlist lists.

Two 4-bit quantised peers (not in the runs above; add them to ``--systems``): ``faiss-ivfpqfs``
(faiss ``IVF{nlist},PQ{d/2}x4fs`` fast-scan codes in ``IndexRefineFlat``; sweeps
``--ivfpqfs-nprobe`` x ``--ivfpqfs-kfactor``) and ``scann`` (ScaNN's k-means tree of
``--scann-leaves`` leaves, anisotropic 4-bit AH, exact reorder; sweeps ``--scann-search``
leaves x ``--scann-reorder`` pre-reorder neighbours). Their rows carry both knobs in
``params``; the plot joins each system's points in recall order. See their classes for how
KiB/query is counted and how ScaNN's threads are set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROW = "@@ROW "  # child stdout lines carrying a JSON row; anything else is passed to stderr


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    # asteria_store.testing.recall_at_k, not imported: the peers' child processes must not
    # load asteria_store (and torch), or their peak RSS would include it.
    k = min(k, found.shape[1], truth.shape[1])
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))


def load_unit(path: str, limit: int | None = None) -> np.ndarray:
    x = np.load(path, mmap_mode="r")
    x = np.array(x[:limit], dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def ints(s: str) -> list[int]:
    return [int(v) for v in str(s).split(",")]


# ----------------------------------------------------------------------------- systems
class System:
    """One index. Disk systems: ``prepare()`` builds it once if missing (in its own process).
    ``build()`` builds it in RAM or opens it; then for each ``sweep`` value p: ``set(p)``,
    ``batch(q, k) -> (ids (nq, k), extra row fields)`` and ``one(v)`` (a k=10 query)."""
    label, params, on_disk, sweep = "", "", False, ("-",)

    def __init__(self, a: argparse.Namespace):
        self.a, self.k_single = a, a.single

    def set(self, p) -> None:
        self.p = p

    def one(self, v: np.ndarray) -> None:
        self.batch(v[None, :], 10)

    def after(self, q: np.ndarray) -> dict:
        """Extra row fields measured after the timed runs (untimed)."""
        return {}

    def describe(self, p) -> str:
        """The row's ``params`` for sweep value ``p``."""
        return f"{self.params}={p}"


class Asteria(System):
    label, params, on_disk = "asteria-store (disk)", "probes", True

    def __init__(self, a):
        super().__init__(a)
        import torch

        import asteria_store
        torch.set_num_threads(a.threads_n)
        self.lib, self.sweep = asteria_store, ints(a.asteria_probes)
        self.version = f"asteria-store {asteria_store.__version__}, torch {torch.__version__}"

    def prepare(self):
        built, t = False, time.perf_counter()
        if not Path(self.a.store).exists():
            if not self.a.build_ok:
                return {"skipped": f"no store at {self.a.store}"}
            with self.lib.create(self.a.store, dim=self.a.dim, expected_size=self.a.n) as s:
                s.ingest(self.a.base, progress=True)
            built = True
        with self.lib.open(self.a.store, readonly=True) as s:
            info = s.info()
        return {"built": built, "build_s": time.perf_counter() - t if built else None,
                "path": str(Path(self.a.store).resolve()), "buckets": info["buckets"], "count": info["count"]}

    def build(self):
        self.store = self.lib.open(self.a.store, readonly=True)

    def batch(self, q, k):
        ids, _, st = self.store.search(q, k, probes=self.p, explain=True, threads=self.a.threads_n)
        return ids, {"scanned_per_query": float(st.scanned.mean()),
                     "batch_kib_per_query": float(st.batch_bytes / len(q) / 1024)}

    def after(self, q):
        """Untimed: what one query reads on its own (LRSQ codes and ids of every probed row,
        full vectors of the rows its bounds could not rule out)."""
        one = [self.store.query(v, 10, probes=self.p, explain=True)[2]["bytes_read"] for v in q[: self.k_single]]
        return {"kib_read_per_query": float(np.mean(one) / 1024)}

    def one(self, v):
        self.store.query(v, 10, probes=self.p)


class AsteriaRerank(Asteria):
    """The same store searched by sketch: every probed row scored from its sketch codes,
    the ``--asteria-rerank`` best rescored exactly (``search(rerank=)``)."""
    label = "asteria-store, sketch + rerank (disk)"

    def batch(self, q, k):
        ids, _, st = self.store.search(q, k, probes=self.p, explain=True, threads=self.a.threads_n,
                                       rerank=self.a.asteria_rerank)
        return ids, {"scanned_per_query": float(st.scanned.mean()),
                     "batch_kib_per_query": float(st.batch_bytes / len(q) / 1024)}

    def after(self, q):
        one = [self.store.query(v, 10, probes=self.p, explain=True, rerank=self.a.asteria_rerank)[2]["bytes_read"]
               for v in q[: self.k_single]]
        return {"kib_read_per_query": float(np.mean(one) / 1024)}

    def one(self, v):
        self.store.query(v, 10, probes=self.p, rerank=self.a.asteria_rerank)

    def describe(self, p):
        return f"probes={p},rerank={self.a.asteria_rerank}"


class Faiss(System):
    label = "faiss Flat (RAM)"

    def __init__(self, a):
        super().__init__(a)
        import faiss
        faiss.omp_set_num_threads(a.threads_n)
        self.faiss, self.version = faiss, f"faiss-cpu {faiss.__version__}"

    def make(self, d: int):
        return self.faiss.IndexFlatIP(d)

    def build(self):
        base = load_unit(self.a.base)
        self.index = self.make(base.shape[1])
        self.index.train(base)
        self.index.add(base)

    def batch(self, q, k):
        return self.index.search(q, k)[1], self.stats(q, k)

    def one(self, v):
        self.index.search(v[None, :], 10)

    def stats(self, q, k) -> dict:
        return {"scanned_per_query": self.a.n, "kib_read_per_query": self.a.n * self.a.dim * 4 / 1024}


class FaissIVF(Faiss):
    label, params = "faiss IVF-Flat (RAM)", "nprobe"

    def __init__(self, a):
        super().__init__(a)
        self.sweep = ints(a.ivf_nprobe)

    def make(self, d):
        self.quant = self.faiss.IndexFlatIP(d)
        return self.faiss.IndexIVFFlat(self.quant, d, self.a.nlist, self.faiss.METRIC_INNER_PRODUCT)

    def set(self, p):
        self.ivf = self.faiss.extract_index_ivf(self.index)
        self.ivf.nprobe = self.p = p
        self.sizes = np.array([self.ivf.invlists.list_size(i) for i in range(self.ivf.nlist)])

    def scanned(self, q) -> np.ndarray:  # rows in the probed lists, per query
        return self.sizes[self.quant.search(q, self.p)[1]].sum(axis=1)

    def stats(self, q, k):
        s = float(self.scanned(q).mean())
        return {"scanned_per_query": s, "kib_read_per_query": s * (self.a.dim * 4 + 8) / 1024}


class FaissIVFPQ(FaissIVF):
    label, params = "faiss IVF-PQ+refine (RAM)", "nprobe"

    def make(self, d):
        self.quant, self.m = self.faiss.IndexFlatIP(d), d // 8
        self.pq = self.faiss.IndexIVFPQ(self.quant, d, self.a.nlist, self.m, 8, self.faiss.METRIC_INNER_PRODUCT)
        return self.faiss.IndexRefineFlat(self.pq)

    def set(self, p):
        super().set(p)
        self.index.k_factor = self.a.refine

    def describe(self, p):
        return f"{self.params}={p},refine={self.a.refine}"

    def stats(self, q, k):
        s = float(self.scanned(q).mean())
        return {"scanned_per_query": s,
                "kib_read_per_query": (s * (self.m + 8) + k * self.a.refine * self.a.dim * 4) / 1024}


class FaissIVFPQFastScan(FaissIVF):
    """``IVF{nlist},PQ{d/2}x4fs`` (4-bit PQ codes of 2 dims each, scanned 32 rows at a time from
    SIMD registers) in an ``IndexRefineFlat`` that reranks ``k_factor x k`` candidates exactly.
    Sweeps nprobe (``--ivfpqfs-nprobe``) for each k_factor (``--ivfpqfs-kfactor``); trained on
    the whole base like the other faiss IVF indexes (faiss samples 256 rows per centroid)."""
    label, params = "faiss IVF-PQ4fs+refine (RAM)", "nprobe"

    def __init__(self, a):
        super().__init__(a)
        self.sweep = [(nprobe, kf) for kf in ints(a.ivfpqfs_kfactor) for nprobe in ints(a.ivfpqfs_nprobe)]

    def make(self, d):
        self.code_bytes = d // 4  # d/2 sub-quantizers of 4 bits
        index = self.faiss.index_factory(d, f"IVF{self.a.nlist},PQ{d // 2}x4fs,RFlat", self.faiss.METRIC_INNER_PRODUCT)
        self.quant = self.faiss.extract_index_ivf(index).quantizer
        return index

    def set(self, p):
        super().set(p[0])
        self.p, self.index.k_factor = p, p[1]

    def describe(self, p):
        return f"nprobe={p[0]},k_factor={p[1]}"

    def scanned(self, q):
        return self.sizes[self.quant.search(q, self.p[0])[1]].sum(axis=1)

    def stats(self, q, k):
        """Bytes touched per query: the d/4-byte codes of every row in the probed lists
        (exact, from the list sizes; the padding of each list to 32-row blocks and the ids,
        read only for rows that enter the result heap, not counted) plus the k_factor x k
        float32 rows of the exact rerank."""
        s = float(self.scanned(q).mean())
        return {"scanned_per_query": s,
                "kib_read_per_query": (s * self.code_bytes + k * self.p[1] * self.a.dim * 4) / 1024}


class FaissHNSW(Faiss):
    label, params = "faiss HNSW32 (RAM)", "ef"

    def __init__(self, a):
        super().__init__(a)
        self.sweep = ints(a.ef)

    def make(self, d):
        index = self.faiss.IndexHNSWFlat(d, 32, self.faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
        return index

    def build(self):
        """Built once per base and thread count, then read back from ``--workdir`` (with
        ``--rounds``, every round after the first loads it); ``build_s`` is the build's."""
        a = self.a
        path = Path(a.workdir) / f"hnsw32_{Path(a.base).resolve().parent.name}_{Path(a.base).stem}_n{a.n}_t{a.threads_n}.faiss"
        took = path.with_suffix(".json")
        if path.exists() and took.exists():
            self.index = self.faiss.read_index(str(path))
            self.build_s = json.loads(took.read_text())["build_s"]
            return
        t = time.perf_counter()
        super().build()
        self.build_s = time.perf_counter() - t
        self.faiss.write_index(self.index, str(path))
        took.write_text(json.dumps({"build_s": self.build_s}))

    def set(self, p):
        self.index.hnsw.efSearch = p

    def batch(self, q, k):
        self.faiss.cvar.hnsw_stats.reset()
        ids = self.index.search(q, k)[1]
        s = self.faiss.cvar.hnsw_stats.ndis / len(q)  # distance computations per query
        return ids, {"scanned_per_query": s, "kib_read_per_query": s * self.a.dim * 4 / 1024}


class Scann(System):
    """ScaNN (pip ``scann``, its pybind API, no TensorFlow): a k-means tree of ``--scann-leaves``
    leaves (default 2 sqrt(n)), anisotropic 4-bit AH codes (2 dims per 16-centre codebook,
    threshold 0.2) scored with LUT16, and an exact float32 reorder of the best
    ``pre_reorder_num_neighbors``. Sweeps leaves_to_search (``--scann-search``) for each
    pre-reorder count (``--scann-reorder``, raised to k where smaller). The tree and AH train on
    ScaNN's default samples of 100,000 rows, with ``--threads`` training threads.

    Threads: one thread runs ``search_batched`` (ScaNN's serial batch) and ``search``; with t > 1
    threads the batch is ``search_batched_parallel`` after ``set_num_threads(t - 1)``: ScaNN's
    pool of N threads works alongside the calling thread, so N + 1 threads in all (counted from
    /proc in ScaNN 1.4.2; ``set_num_threads(0)`` crashes it). Its mini-batches are nq / t queries
    (at most 256) so that every thread gets work. One-query ``search`` is single-threaded.

    ``kib_read_per_query`` is an estimate: leaves_to_search / num_leaves x n rows of d/4 bytes of
    AH codes (ScaNN does not expose its leaf sizes; on WordNet held-out queries the exact count,
    read once from a serialized searcher, was 3-4% above this), plus the float32 rows reordered."""
    label, params = "ScaNN AH4+reorder (RAM)", "leaves"

    def __init__(self, a):
        super().__init__(a)
        import scann
        self.scann, self.version = scann.scann_ops_pybind, f"scann {metadata.version('scann')}"
        self.leaves = a.scann_leaves or max(1, round(2 * math.sqrt(a.n)))
        self.sweep = [(leaves, r) for r in ints(a.scann_reorder) for leaves in ints(a.scann_search)]

    def build(self):
        base = load_unit(self.a.base)
        self.searcher = (self.scann.builder(base, self.a.k, "dot_product")
                         .tree(num_leaves=self.leaves, num_leaves_to_search=self.sweep[0][0])
                         .score_ah(2, anisotropic_quantization_threshold=0.2)
                         .reorder(max(max(r for _, r in self.sweep), self.a.k))
                         .set_n_training_threads(self.a.threads_n).build())
        if self.a.threads_n > 1:
            self.searcher.set_num_threads(self.a.threads_n - 1)

    def describe(self, p):
        return f"leaves={p[0]}/{self.leaves},reorder={p[1]}"

    def batch(self, q, k):
        leaves, r = self.p
        r = max(r, k)
        if self.a.threads_n > 1:
            ids = self.searcher.search_batched_parallel(
                q, k, r, leaves, batch_size=min(256, -(-len(q) // self.a.threads_n)))[0]
        else:
            ids = self.searcher.search_batched(q, k, r, leaves)[0]
        s = leaves / self.leaves * self.a.n
        return np.asarray(ids, np.int64), {"scanned_per_query": s,
                                           "kib_read_per_query": (s * self.a.dim / 4 + r * self.a.dim * 4) / 1024}

    def one(self, v):
        self.searcher.search(v, 10, max(self.p[1], 10), self.p[0])


class HnswLib(System):
    label, params = "hnswlib M32 (RAM)", "ef"

    def __init__(self, a):
        super().__init__(a)
        import hnswlib
        self.hnswlib, self.sweep = hnswlib, ints(a.ef)
        self.version = f"hnswlib {metadata.version('hnswlib')}"

    def build(self):
        base = load_unit(self.a.base)
        self.index = self.hnswlib.Index(space="ip", dim=base.shape[1])
        self.index.init_index(max_elements=len(base), ef_construction=200, M=32)
        self.index.set_num_threads(self.a.threads_n)
        self.index.add_items(base, np.arange(len(base)))

    def set(self, p):
        self.index.set_ef(p)

    def batch(self, q, k):
        return self.index.knn_query(q, k=k)[0].astype(np.int64), {}


class Lance(System):
    label, params, on_disk = "lancedb IVF-PQ+refine (disk)", "nprobes", True

    def __init__(self, a):
        super().__init__(a)
        import lancedb
        self.lancedb, self.sweep = lancedb, ints(a.lance_nprobe)
        self.k_single = min(a.single, a.lance_nq)
        self.version = f"lancedb {lancedb.__version__}"
        # lance trains at most n / sample_rate partitions (default 256): lower it to get nlist
        self.sample_rate = max(16, min(256, a.n // a.nlist))
        stem = f"{Path(a.base).parent.name}-{Path(a.base).stem}-n{a.n}-ivfpq{a.nlist}x{a.dim // 8}-s{self.sample_rate}"
        self.name, self.uri = re.sub(r"[^A-Za-z0-9_-]", "_", stem), str(Path(a.workdir) / "lancedb")

    def prepare(self):
        import pyarrow as pa
        from lancedb.index import IvfPq
        db, path = self.lancedb.connect(self.uri), str(Path(self.uri, self.name).resolve())
        try:
            if db.open_table(self.name).list_indices():
                return {"built": False, "path": path}
        except ValueError:  # no such table
            pass
        t = time.perf_counter()
        base = load_unit(self.a.base)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(base.ravel()), base.shape[1])
        tbl = db.create_table(self.name, pa.table({"id": np.arange(len(base)), "vector": vec}), mode="overwrite")
        tbl.create_index("vector", config=IvfPq(distance_type="dot", num_partitions=self.a.nlist,
                                                num_sub_vectors=base.shape[1] // 8, sample_rate=self.sample_rate))
        return {"built": True, "build_s": time.perf_counter() - t, "path": path}

    def build(self):
        self.tbl = self.lancedb.connect(self.uri).open_table(self.name)

    def search(self, v, k):
        return (self.tbl.search(v).nprobes(self.p).refine_factor(self.a.refine).limit(k)
                .select(["id", "_distance"]).to_arrow())

    def batch(self, q, k):  # one multi-vector query; rows come back with a query_index column
        r = self.search(q, k)
        ids, dist = r["id"].to_numpy(), r["_distance"].to_numpy()
        qi = r["query_index"].to_numpy() if "query_index" in r.column_names else np.zeros(len(ids), int)
        order = np.lexsort((dist, qi))
        qi, ids = qi[order], ids[order]
        rank = np.arange(len(qi)) - np.searchsorted(qi, qi)
        out = np.full((len(q), k), -1, np.int64)
        out[qi, rank] = ids
        return out, {}

    def one(self, v):
        self.search(v, 10)

    def describe(self, p):
        return f"{self.params}={p},refine={self.a.refine}"


SYSTEMS = {"asteria": Asteria, "asteria-rerank": AsteriaRerank, "faiss-flat": Faiss, "faiss-ivf": FaissIVF, "faiss-ivfpq": FaissIVFPQ,
           "faiss-ivfpqfs": FaissIVFPQFastScan, "faiss-hnsw": FaissHNSW, "hnswlib": HnswLib,
           "scann": Scann, "lancedb": Lance}


# ----------------------------------------------------------------------------- child
def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over
    from the parent across fork+exec, so every child would report at least the parent's peak."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def child(a: argparse.Namespace) -> None:
    def emit(row: dict) -> None:
        print(ROW + json.dumps(row), flush=True)

    try:
        s = SYSTEMS[a.child](a)
    except ImportError as e:
        return emit({"skipped": f"not installed: {e}"})
    if a.prepare:
        return emit(s.prepare())
    q, truth = load_unit(a.queries, a.nq), np.load(a.gt)[: a.nq]
    t = time.perf_counter()
    s.build()
    head = {"label": s.label, "version": s.version,
            ("load_s" if s.on_disk else "build_s"): getattr(s, "build_s", time.perf_counter() - t),
            "rss_mib": rss_mib("VmRSS")}
    rows = []
    for p in s.sweep:
        s.set(p)
        s.batch(q, a.k)  # warm-up: the same batch, untimed (page cache, memory maps, lazy init)
        s.one(q[0])  # and one query alone (asteria compiles or loads its one-query kernel)
        t = time.perf_counter()
        ids, extra = s.batch(q, a.k)
        batch_s = time.perf_counter() - t
        lat = []
        for v in q[: s.k_single]:
            t = time.perf_counter()
            s.one(v)
            lat.append(time.perf_counter() - t)
        lat = np.array(lat) * 1000
        extra.update(s.after(q))
        params = "exact" if p == "-" else s.describe(p)
        row = {**head, "params": params, "batch_qps": len(q) / batch_s, "single_qps": 1000 / lat.mean(),
               "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
               "single_n": len(lat), "recall@1": recall(ids, truth, 1), "recall@10": recall(ids, truth, 10)}
        if a.k >= 100:
            row["recall@100"] = recall(ids, truth, 100)
        rows.append({**row, "scanned_per_query": None, "kib_read_per_query": None, **extra})
    peak = rss_mib("VmHWM")
    for row in rows:
        emit({**row, "peak_rss_mib": peak})


# ----------------------------------------------------------------------------- parent
def run_child(name: str, threads: int, extra: list[str]) -> list[dict]:
    env = {**os.environ, **{v: str(threads) for v in
                            ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LANCE_CPU_THREADS")}}
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--threads", str(threads), *extra]
    p = subprocess.run(cmd, check=False, env=env, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line[len(ROW):]) for line in p.stdout.splitlines() if line.startswith(ROW)]
    sys.stderr.write("".join(line + "\n" for line in p.stdout.splitlines() if not line.startswith(ROW)))
    if p.returncode != 0:
        rows.append({"skipped": f"child exited with code {p.returncode} (see stderr)"})
    return [{"system": name, "threads": threads, **r} for r in rows]


def exact_topk(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), 256):
        sims = q[s: s + 256] @ base.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        out[s: s + 256] = np.take_along_axis(part, order, 1)
    return out


def fmt(v, spec: str = ",.0f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(rows: list[dict], target: float) -> str:
    head = ("| system | params | threads | batch QPS | 1-query QPS | p50 ms | p99 ms | recall@10 | "
            "KiB read/q | peak RSS MiB | build s |")
    lines = [head, "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['params']} | {r['threads']} | {fmt(r['batch_qps'])} | "
                     f"{fmt(r['single_qps'])} | {fmt(r['p50_ms'], '.2f')} | {fmt(r['p99_ms'], '.2f')} | "
                     f"{r['recall@10']:.3f} | {fmt(r['kib_read_per_query'], ',.1f')} | "
                     f"{fmt(r['peak_rss_mib'])} | {fmt(r.get('build_s'), '.1f')} |")
    lines.append(f"\nBest batch QPS at recall@10 >= {target}, and ratios to faiss IVF-Flat's and HNSW's best there:")
    for t in sorted({r["threads"] for r in rows}):
        best: dict[str, dict] = {}
        for r in (r for r in rows if r["threads"] == t):
            b = best.setdefault(r["label"], {})
            if r["recall@10"] >= target and r["batch_qps"] > b.get("batch_qps", -1):
                best[r["label"]] = r
        refs = {name: next((b for b in best.values() if b.get("system") == name), None)
                for name in ("faiss-ivf", "faiss-hnsw")}
        for label, b in best.items():
            if not b:
                lines.append(f"- {label}, {t} thread(s): recall@10 {target} not reached")
                continue
            ratios = [f"{b['batch_qps'] / r['batch_qps']:.2f}x {r['label']}'s batch QPS, "
                      f"{r['p50_ms'] / b['p50_ms']:.2f}x its one-query speed (p50)"
                      for r in refs.values() if r and r is not b]
            lines.append(f"- {label}, {t} thread(s): {b['batch_qps']:,.0f} QPS, p50 {b['p50_ms']:.2f} ms at "
                         f"{b['params']} (recall@10 {b['recall@10']:.3f})" + (": " + "; ".join(ratios) if ratios else ""))
    return "\n".join(lines)


def plot_title(dataset: str, queries: str, n: int, k: int, threads: str) -> str:
    styles = ", ".join(f"{t} thr {ls}" for t, ls in zip(threads.split(","), ("solid", "dashed", "dotted")))
    return f"{dataset} / {queries}: n={n:,}, k={k}; {styles}"


def replot(jsonl: str, path: str, target: float) -> None:
    """Redraw the plot of a finished run from its JSON lines (skipped systems left out)."""
    rows = [r for r in map(json.loads, Path(jsonl).read_text().splitlines()) if r.get("batch_qps")]
    threads = ",".join(str(t) for t in sorted({r["threads"] for r in rows}))
    plot(rows, path, plot_title(rows[0]["dataset"], rows[0]["queries"], rows[0]["n"], rows[0]["k"], threads), target)


def plot(rows: list[dict], path: str, title: str, target: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    several = len({r["threads"] for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(8, 5.5))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colour = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    styles = {t: ls for t, ls in zip(sorted({r["threads"] for r in rows}), ("-", "--", ":", "-."))}
    for key in dict.fromkeys((r["label"], r["threads"]) for r in rows):
        pts = sorted((r["recall@10"], r["batch_qps"]) for r in rows if (r["label"], r["threads"]) == key)
        ax.plot(*zip(*pts), marker="o", color=colour[key[0]], ls=styles[key[1]],
                label=f"{key[0]}, {key[1]} thr" if several else key[0])
    ax.axvline(target, color="grey", ls=":", lw=1)
    ax.set(yscale="log", xlabel="recall@10", ylabel="batch QPS (log)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parent(a: argparse.Namespace) -> None:
    names = a.systems.split(",")
    if unknown := [s for s in names if s not in SYSTEMS]:
        sys.exit(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    on_store = [n for n in names if n.startswith("asteria")]  # systems searching the asteria store
    if on_store and not a.store:
        sys.exit("--store is required for asteria")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    threads, extra = ints(a.threads), []
    dataset, queries = Path(a.base).resolve().parent.name, Path(a.queries).name
    if a.gt is None:
        q, base = load_unit(a.queries, a.nq), load_unit(a.base)
        gt = work / f"gt_{dataset}_{Path(a.queries).stem}_n{len(base)}_q{len(q)}_k{a.k}.npy"
        np.save(gt, exact_topk(base, q, a.k))
        print(f"exact top-{a.k} of {len(q)} queries saved to {gt}", file=sys.stderr)
        extra += ["--gt", str(gt)]
        del base
    nq = min(a.nq, len(np.load(a.queries, mmap_mode="r")))
    builds_path = work / "builds.json"
    builds = json.loads(builds_path.read_text()) if builds_path.exists() else {}
    disk: dict[str, dict] = {}

    def prepare(name: str, more: list[str]) -> None:  # build time is kept per artifact path
        info = run_child(name, max(threads), extra + more + ["--prepare"])[-1]
        if info.get("built"):
            builds[info["path"]] = info["build_s"]
            builds_path.write_text(json.dumps(builds, indent=1))
        disk[name] = {**info, "build_s": builds.get(info.get("path"))}

    if on_store or (a.store and Path(a.store).exists()):
        prepare("asteria", ["--build-ok"] if on_store else [])
        disk["asteria-rerank"] = disk["asteria"]
    if disk.get("asteria", {}).get("count", a.n) != a.n:
        print(f"WARNING: {a.store} holds {disk['asteria']['count']:,} vectors, --base {a.n:,}", file=sys.stderr)
    nlist = a.nlist or disk.get("asteria", {}).get("buckets") or int(4 * math.sqrt(a.n))
    extra += ["--nlist", str(nlist)]
    print(f"{a.n:,} x {a.dim} base, {nq} queries, k={a.k}, IVF lists (faiss, lancedb): {nlist}", file=sys.stderr)
    if "lancedb" in names:
        prepare("lancedb", [])
    rows = []
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    if spinners:
        print(f"{a.busy} busy process(es) spinning on the cores while the systems run", file=sys.stderr)
    try:
        rows = run_all(names, threads, disk, extra, a.rounds)
    finally:
        for sp in spinners:
            sp.kill()
            sp.wait()
    meta = {"n": a.n, "dim": a.dim, "nq": nq, "k": a.k, "dataset": dataset, "queries": queries,
            "gt": Path(a.gt).name if a.gt else "numpy brute force", "nlist": nlist, "busy": a.busy,
            "n_rounds": a.rounds,
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    rows = [{**r, **meta} for r in rows]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    if not rows:
        sys.exit("no system produced results")
    text = report(rows, a.target_recall)
    busy = f", {a.busy} core(s) kept busy" if a.busy else ""
    print(f"\n{dataset} / {queries}: {a.n:,} x {a.dim}, {nq} queries, k={a.k}, threads {a.threads}{busy}\n\n{text}")
    if a.table:
        Path(a.table).write_text(text + "\n")
    if a.plot:
        plot(rows, a.plot, plot_title(dataset, queries, a.n, a.k, a.threads), a.target_recall)
        print(f"\nplot: {a.plot}", file=sys.stderr)


#: Per-setting fields that are timings: with --rounds, each is the median over the rounds.
TIMED = ("batch_qps", "single_qps", "p50_ms", "p99_ms")


def run_all(names: list[str], threads: list[int], disk: dict, extra: list[str], rounds: int = 1) -> list[dict]:
    """Every system at every thread count, ``rounds`` times over, the systems taking turns
    (a machine whose speed drifts then slows them alike); per setting, the median of each
    timing over the rounds (and the per-round values under ``rounds``)."""
    by_setting: dict[tuple, list[dict]] = {}
    for r in range(rounds):
        if rounds > 1:
            print(f"=== round {r + 1} of {rounds}", file=sys.stderr)
        for row in _run_once(names, threads, disk, extra):
            by_setting.setdefault((row["system"], row["threads"], row["params"]), []).append(row)
    out = []
    for runs in by_setting.values():
        row = dict(runs[0])
        if rounds > 1:
            row["rounds"] = {f: [x[f] for x in runs] for f in TIMED}
            row.update({f: float(np.median(row["rounds"][f])) for f in TIMED})
        out.append(row)
    return out


def _run_once(names: list[str], threads: list[int], disk: dict, extra: list[str]) -> list[dict]:
    rows = []
    for t in threads:
        for name in names:
            if "skipped" in disk.get(name, {}):
                out = [{"system": name, "skipped": disk[name]["skipped"]}]
            else:
                print(f"--- {name}, {t} thread(s)", file=sys.stderr)
                out = run_child(name, t, extra)
            for r in out:
                if "skipped" in r:
                    print(f"skipped {name}: {r['skipped']}", file=sys.stderr)
                else:
                    if name in disk:
                        r["build_s"] = disk[name]["build_s"]
                    rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help=".npy base vectors (ids = row numbers)")
    ap.add_argument("--queries", required=True)
    ap.add_argument("--gt", default=None, help="exact top-k ids .npy (default: numpy brute force)")
    ap.add_argument("--store", default=None, help="asteria store (built from --base if missing)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--nq", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--single", type=int, default=300, help="queries timed one by one")
    ap.add_argument("--threads", default="1", help="thread count(s), e.g. 1 or 1,2")
    ap.add_argument("--asteria-probes", default="16,32,48,64,96")
    ap.add_argument("--asteria-rerank", type=int, default=50, help="rerank of the asteria-rerank system")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default: asteria buckets or 4 sqrt(n))")
    ap.add_argument("--ivf-nprobe", default="16,32,64,128")
    ap.add_argument("--refine", type=int, default=4, help="k_factor / refine_factor of faiss-ivfpq and lancedb")
    ap.add_argument("--ivfpqfs-nprobe", default="16,32,64,128", help="faiss-ivfpqfs nprobe sweep")
    ap.add_argument("--ivfpqfs-kfactor", default="2,4", help="faiss-ivfpqfs refine k_factor sweep")
    ap.add_argument("--scann-leaves", type=int, default=None, help="ScaNN tree leaves (default 2 sqrt(n))")
    ap.add_argument("--scann-search", default="16,32,64,128", help="ScaNN leaves_to_search sweep")
    ap.add_argument("--scann-reorder", default="40,100", help="ScaNN pre_reorder_num_neighbors sweep")
    ap.add_argument("--ef", default="16,32,64,128", help="HNSW efSearch sweep")
    ap.add_argument("--lance-nprobe", default="16,32,64")
    ap.add_argument("--lance-nq", type=int, default=300, help="cap on lancedb queries timed one by one")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every system this many times, taking turns; timings are the medians")
    ap.add_argument("--busy", type=int, default=0,
                    help="processes spinning on the cores while the systems run (a loaded machine)")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--table", default=None, help="also write the markdown table here")
    ap.add_argument("--plot", default=None, help="recall@10 vs batch QPS PNG")
    ap.add_argument("--workdir", default="/tmp/asteria-bench/compare")
    ap.add_argument("--replot", default=None, metavar="JSONL",
                    help="only redraw --plot from the JSON lines of a finished run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build-ok", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.replot:
        replot(a.replot, a.plot, a.target_recall)
        return
    a.n, a.dim = np.load(a.base, mmap_mode="r").shape
    if a.child:
        a.threads_n = int(a.threads)
        child(a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
