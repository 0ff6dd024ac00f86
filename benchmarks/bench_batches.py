"""A new user's store filled batch by batch, against the same data ingested at once.

The scenario of issue 10: wordnet-minilm (106,697 real MiniLM vectors) ingested in batches
of 2,000 (54 ingests, the first one trains), next to one ingest of everything. For each
store: buckets, segments, extents per probed bucket, upkeep (re-fits, merges), ingest time,
and recall@10 / batch QPS / one-query p50 at fixed probe counts on the held-out queries
(exact ground truth shipped with the data set). One thread (``torch`` and BLAS), so the
figures compare like with like on a shared machine.

    OMP_NUM_THREADS=1 python benchmarks/bench_batches.py --out /tmp/asteria-bench/batches
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from harness import time_search

from asteria_store.testing import recall_at_k

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wordnet-minilm"


def measure(store, q: np.ndarray, gt: np.ndarray, probes: list[int]) -> list[dict]:
    rows = []
    for p in probes:
        (ids, _, stats), batch_s, lat = time_search(store, q, p, explain=True)
        rows.append({"probes": p, "recall@10": round(recall_at_k(ids, gt, 10), 4),
                     "batch_qps": round(len(q) / batch_s, 1),
                     "one_query_p50_ms": round(1000 * float(np.median(lat)), 3),
                     "rows_scanned_per_query": int(np.mean(stats.scanned))})
    return rows


def extents_per_bucket(store) -> float:
    info = store.info()
    with store._catalog.read() as txn:
        buckets = {b for b, *_ in store._catalog.iter_extents(txn)}
    return info["internals"]["extents"] / max(1, len(buckets))


def main() -> None:
    import torch

    import asteria_store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/asteria-bench/batches"))
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--probes", default="8,16,32,64")
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    probes = [int(p) for p in args.probes.split(",")]
    base = np.load(DATA / "base.f16.npy").astype(np.float32)
    q = np.load(DATA / "queries_heldout.f16.npy").astype(np.float32)
    gt = np.load(DATA / "gt_heldout_ids.npy")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    ids = np.arange(len(base))
    results = {}
    for name in ("one-ingest", "batches"):
        path = args.out / name
        t0 = time.perf_counter()
        upkeep = []
        with asteria_store.create(path, dim=base.shape[1], dtype=args.dtype) as store:
            if name == "one-ingest":
                store.ingest(base, ids=ids)
            else:
                for start in range(0, len(base), args.batch):
                    r = store.ingest(base[start : start + args.batch], ids=ids[start : start + args.batch])
                    if r.trained or r.refitted or r.merged_segments:
                        upkeep.append({"after_rows": start + len(r.ids), "trained": r.trained,
                                       "refitted": r.refitted, "merged": r.merged_segments,
                                       "seconds": round(r.upkeep_seconds or r.train_seconds, 2)})
            ingest_s = time.perf_counter() - t0
            info = store.info()
            results[name] = {
                "ingest_seconds": round(ingest_s, 1), "buckets": info["buckets"], "segments": info["segments"],
                "extents_per_bucket": round(extents_per_bucket(store), 2),
                "maintenance": info["internals"]["maintenance"],
                "disk_mb": round(info["disk_bytes"] / 2**20, 1), "upkeep_events": upkeep,
                "search": measure(store, q, gt, probes),
            }
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "upkeep_events"}}, indent=1))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| store | ingest s | buckets | segments | extents/bucket | probes | recall@10 | batch QPS | "
          "1-query p50 ms | rows scanned/query |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        for s in r["search"]:
            print(f"| {name} | {r['ingest_seconds']} | {r['buckets']} | {r['segments']} | {r['extents_per_bucket']} | "
                  f"{s['probes']} | {s['recall@10']} | {s['batch_qps']} | {s['one_query_p50_ms']} | "
                  f"{s['rows_scanned_per_query']} |")


if __name__ == "__main__":
    main()
