"""Search speed and recall of a store: batch and one-query QPS, latency, recall@1/10/100.

    python benchmarks/bench_search.py --build ../shared/datasets/wordnet-minilm/base.f16.npy \\
        --store /tmp/asteria-bench/wordnet-store \\
        --queries ../shared/datasets/wordnet-minilm/queries_examples.f16.npy \\
        --gt ../shared/datasets/wordnet-minilm/gt_examples_ids.npy --nq 2000 --probes 4,8,16,32,64

``--build FILE.npy`` (re)creates the store from FILE (default learned router, trained at
ingest) unless it exists. For each probe budget: batch QPS (one ``search`` call over all
queries), one-query QPS and p50/p99 latency (``query`` per vector), recall@1/10/100 against
``--gt`` (ids into the base, best first) or, without it, an internal brute force, and
bytes read per query: alone (``query(..., explain=True)``) and as its share of the batch
(``SearchStats.batch_bytes``: each probed bucket is read once for all its queries). Exact numpy brute force over the same float32 base runs
in the same process as the reference (QPS ratio). Threads are pinned (``--threads``,
default 1) before numpy is imported. One JSON line per row goes to ``--out``.
"""

from __future__ import annotations

import os
import sys

from harness import pin_threads_from_argv

pin_threads_from_argv()  # before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """``recall_at_k`` at k capped by the columns found and known."""
    from asteria_store.testing import recall_at_k

    return recall_at_k(found, truth, min(k, found.shape[1], truth.shape[1]))


def run_faiss(base: np.ndarray, q: np.ndarray, truth: np.ndarray, k: int, nlist: int, nprobes: str,
              threads: int, single: int) -> list[dict]:
    """faiss-cpu in RAM on the same vectors: exact flat index, then IVF-Flat by nprobe."""
    import faiss

    faiss.omp_set_num_threads(threads)
    out = []
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    quant = faiss.IndexFlatIP(base.shape[1])
    ivf = faiss.IndexIVFFlat(quant, base.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    ivf.train(base)
    ivf.add(base)
    print(f"faiss IVF-Flat ({nlist} lists) built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    for name, index, probes in [("faiss Flat (RAM)", flat, ["-"])] + [
            ("faiss IVF-Flat (RAM)", ivf, [int(p) for p in nprobes.split(",")])]:
        for p in probes:
            if p != "-":
                index.nprobe = p
            t = time.perf_counter()
            _, ids = index.search(q, k)
            batch_s = time.perf_counter() - t
            lat = []
            for v in q[:single]:
                t0 = time.perf_counter()
                index.search(v[None, :], 10)
                lat.append(time.perf_counter() - t0)
            lat = np.array(lat) * 1000
            row = {"system": name, "probes": p, "batch_qps": len(q) / batch_s, "single_qps": 1000 / lat.mean(),
                   "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                   "recall@1": recall(ids, truth, 1), "recall@10": recall(ids, truth, 10),
                   "recall@100": recall(ids, truth, 100)}
            if p != "-":  # IVF-Flat reads every vector of the probed lists
                sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)])
                cq = quant.search(q, p)[1]
                scanned = sizes[cq].sum(axis=1)
                row["scanned_per_query"] = float(scanned.mean())
                row["kib_read_per_query"] = float(scanned.mean() * (base.shape[1] * 4 + 8) / 1024)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--build", default=None, help="base .npy to build the store from if missing")
    ap.add_argument("--queries", required=True)
    ap.add_argument("--gt", default=None)
    ap.add_argument("--nq", type=int, default=2000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--probes", default="4,8,16,32,64")
    ap.add_argument("--single", type=int, default=300, help="queries timed one by one")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--prune", choices=["auto", "on", "off"], default="auto",
                    help="asteria's LRSQ pruning (search/query prune=): auto (default), on, off")
    ap.add_argument("--faiss", default=None, metavar="NPROBES",
                    help="also run faiss-cpu (the `peers` extra) in this process on the same vectors: "
                         "IndexFlatIP and IndexIVFFlat with as many lists as the store has buckets, "
                         "at these nprobe values (e.g. 8,16,32,64,128)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.jsonl"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(args.threads))
    import asteria_store
    from asteria_store.testing import brute_force_topk

    if not Path(args.store).exists():
        if args.build is None:
            sys.exit(f"no store at {args.store!r}; pass --build BASE.npy")
        t = time.perf_counter()
        with asteria_store.create(args.store, dim=int(np.load(args.build, mmap_mode="r").shape[1]),
                                  expected_size=len(np.load(args.build, mmap_mode="r"))) as s:
            res = s.ingest(args.build, progress=True)
        print(f"built {args.store} in {time.perf_counter() - t:.1f} s (training {res.train_seconds:.1f} s)",
              file=sys.stderr)
    q = np.load(args.queries)[: args.nq].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    store = asteria_store.open(args.store, readonly=True)
    info = store.info()
    k = args.k
    if args.gt is not None:
        truth = np.load(args.gt)[: args.nq].astype(np.int64)
    else:
        truth = store.search(q, k, probes="all")[0]
    rows = []
    meta = {"store": args.store, "n": info["count"], "buckets": info["buckets"],
            "router": info["router"], "nq": len(q), "k": k, "threads": int(args.threads),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}

    # Reference: exact numpy brute force over the same vectors, in RAM.
    base = np.concatenate([store.get(np.arange(s, min(s + 65536, info["count"])))
                           for s in range(0, info["count"], 65536)])
    t = time.perf_counter()
    bf_ids, _ = brute_force_topk(base, q, k)
    bf_s = time.perf_counter() - t
    rows.append({"system": "numpy brute force (RAM)", "probes": "-", "batch_qps": len(q) / bf_s,
                 "recall@1": recall(bf_ids, truth, 1), "recall@10": recall(bf_ids, truth, 10),
                 "recall@100": recall(bf_ids, truth, 100)})
    if args.faiss:
        rows.extend(run_faiss(base, q, truth, k, meta["buckets"], args.faiss, int(args.threads), args.single))
    del base

    prune = {"auto": "auto", "on": True, "off": False}[args.prune]
    for probes in [p if p == "all" else int(p) for p in args.probes.split(",")]:
        store.search(q[:50], k, probes=probes, prune=prune)  # warm the page cache and the catalog
        t = time.perf_counter()
        ids, _, stats = store.search(q, k, probes=probes, prune=prune, explain=True)
        batch_s = time.perf_counter() - t
        lat = []
        for v in q[: args.single]:
            t0 = time.perf_counter()
            store.query(v, 10, probes=probes, prune=prune)
            lat.append(time.perf_counter() - t0)
        lat = np.array(lat) * 1000
        # what one query reads on its own (untimed): LRSQ codes and ids of every probed
        # row, plus the full vectors of the rows its bounds could not rule out
        one = [store.query(v, 10, probes=probes, prune=prune, explain=True)[2] for v in q[: args.single]]
        rows.append({
            "system": "asteria-store", "probes": probes, "prune": args.prune, "batch_qps": len(q) / batch_s,
            "single_qps": 1000 / lat.mean(), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "recall@1": recall(ids, truth, 1), "recall@10": recall(ids, truth, 10),
            "recall@100": recall(ids, truth, 100),
            "scanned_per_query": float(stats.scanned.mean()),
            "kib_read_per_query": float(np.mean([o["bytes_read"] for o in one]) / 1024),
            "batch_kib_per_query": float(stats.batch_bytes / len(q) / 1024),
        })
    store.close()
    print(f"\n{meta['n']:,} vectors, {meta['buckets']} buckets ({meta['router']}), {len(q)} queries, "
          f"k={k}, {args.threads} thread(s)\n")
    print("| system | probes | batch QPS | vs brute force | 1-query QPS | p50 ms | p99 ms | "
          "recall@1 | recall@10 | recall@100 | rows scanned/q | KiB read/q (1 query) | KiB read/q (batch) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bf = rows[0]["batch_qps"]
    for r in rows:
        print(f"| {r['system']} | {r['probes']} | {r['batch_qps']:,.0f} | {r['batch_qps'] / bf:.2f}x | "
              f"{r.get('single_qps', float('nan')):,.0f} | {r.get('p50_ms', float('nan')):.2f} | "
              f"{r.get('p99_ms', float('nan')):.2f} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | "
              f"{r['recall@100']:.3f} | {r.get('scanned_per_query', float('nan')):,.0f} | "
              f"{r.get('kib_read_per_query', float('nan')):,.0f} | "
              f"{r.get('batch_kib_per_query', r.get('kib_read_per_query', float('nan'))):,.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    main()
