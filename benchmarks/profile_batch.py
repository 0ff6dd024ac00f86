"""Where a batch search's time goes, stage by stage (wall time of each stage, median of runs).

    python benchmarks/profile_batch.py --store /tmp/asteria-bench/wordnet-store \\
        --queries ../shared/datasets/wordnet-minilm/queries_heldout.f16.npy --probes 32 --threads 1,2

Wraps the stages of ``asteria_store.query.engine._Block`` (the batch path's three passes):
probe order, gathering the probed buckets' row ranges, pass 1 (one product per bucket into
the score buffer), thresholds from the home buckets, pass 3 (the rows above them, one pass;
plus LRSQ-pruned buckets), counting stats, and the final top k. ``Store.search`` end to end
is timed separately (the rest is input checks, normalisation and the snapshot). Stages run
on the threads where the engine runs them there; each is timed from the calling thread.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

STAGES = {"_bucket": "bucket rows (gather)", "_score": "pass 1: products",
          "_thresholds": "pass 2: thresholds", "_above": "pass 3: rows above", "_prune": "pass 3: pruned buckets",
          "_count": "stats"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--nq", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import asteria_store
    from asteria_store.query import engine

    totals: dict[str, float] = defaultdict(float)

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[label] += time.perf_counter() - t

        raw = vars(owner).get(name)
        setattr(owner, name, staticmethod(wrapper) if isinstance(raw, staticmethod) else wrapper)

    timed(engine, "probe_order_chunked", "probe order")
    for name, label in STAGES.items():
        timed(engine._Block, name, label)
    timed(engine, "top_per_query", "final top k")
    q = np.load(args.queries)[: args.nq].astype(np.float32)
    store = asteria_store.open(args.store, readonly=True)
    labels = ["probe order", *STAGES.values(), "final top k"]
    print(f"{len(q):,} queries, k={args.k}, probes={args.probes}\n")
    print("| threads | " + " | ".join(labels) + " | sum of stages | Store.search | QPS |")
    print("|---" * (len(labels) + 4) + "|")
    for threads in [int(t) for t in args.threads.split(",")]:
        store.search(q, args.k, probes=args.probes, threads=threads)  # warm-up
        runs, walls = [], []
        for _ in range(args.repeat):
            totals.clear()
            t = time.perf_counter()
            store.search(q, args.k, probes=args.probes, threads=threads)
            walls.append(time.perf_counter() - t)
            runs.append([totals[label] for label in labels])
        med = np.median(np.array(runs), axis=0) * 1000
        wall = float(np.median(walls))
        cells = " | ".join(f"{ms:.1f}" for ms in med)
        print(f"| {threads} | {cells} | {med.sum():.1f} | {wall * 1000:.1f} | {len(q) / wall:,.0f} |")
    print("\n(milliseconds per batch, median of", args.repeat, "runs; pruned buckets run inside _map)")


if __name__ == "__main__":
    main()
