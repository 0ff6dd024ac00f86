"""Anonymous memory of a process serving queries: RssAnon after open, after one query,
and after each batch of ``--nq`` queries at each probe count, per kernel; with
``--rerank``, search by sketch instead, then ``--single`` queries one by one.

    python benchmarks/bench_serving_memory.py --store /tmp/asteria-bench/stores3m/grown \\
        --queries /tmp/asteria-bench/growth-3m/queries.f16.npy --probes 16,32,64 --threads 1
    python benchmarks/bench_serving_memory.py --store /tmp/asteria-bench/s10m/oneshot-10000000 \\
        --queries /tmp/asteria-bench/growth-10m/queries.f16.npy --probes 12 --rerank 70 \\
        --nq 500 --single 200 --kernels f32 --trace

Each kernel runs in its own process (a kernel's caches stay with its process): nothing
else lives there (no ground truth, no earlier settings). ``--trace`` also records what
tracemalloc traces at each stage (numpy arrays included, numba's runtime and compiled
code not; its own bookkeeping adds to RssAnon) and the largest allocation sites at the
end. Prints one JSON line per kernel.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tracemalloc

from harness import anon_mib


def serve(args) -> None:
    import numpy as np

    import asteria_store

    q = np.load(args.queries)[: args.nq + args.single + 1].astype(np.float32)
    batch, single = q[1 : 1 + args.nq], q[1 + args.nq :]
    row = {"kernel": args.kernel, "threads": args.threads, "nq": len(batch), "rerank": args.rerank}

    def mark(name: str) -> None:
        row[name] = round(anon_mib(), 1)
        if args.trace:
            row[f"{name}_traced"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)

    if args.trace:
        tracemalloc.start(4)
    store = asteria_store.open(args.store, readonly=True)
    mark("after_open")
    probes = [int(x) for x in args.probes.split(",")]
    store.query(q[0], 10, probes=probes[0], rerank=args.rerank)
    mark("after_one_query")
    for p in probes:
        if args.rerank is not None:
            store.search(batch, 10, probes=p, threads=args.threads, rerank=args.rerank)
            mark(f"after_batch_p{p}_rerank_{args.rerank}")
            continue
        for prune in (True, False):
            store.search(batch, 10, probes=p, kernel=args.kernel, threads=args.threads, prune=prune)
            mark(f"after_batch_p{p}_prune_{prune}")
    for one in single:
        store.query(one, 10, probes=probes[-1], rerank=args.rerank)
    if len(single):
        gc.collect()
        mark(f"after_{len(single)}_single")
    if args.trace:
        row["top_sites"] = [{"mib": round(st.size / 2**20, 1), "blocks": st.count, "at": str(st.traceback[0])}
                            for st in tracemalloc.take_snapshot().statistics("lineno")[:5]]
    row.update(rows=len(store), buckets=store.info()["buckets"])
    store.close()
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--probes", default="16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kernels", default="f32,bf16")
    ap.add_argument("--rerank", type=int, default=None, help="search by sketch with this rerank")
    ap.add_argument("--single", type=int, default=0, help="queries one by one after the batches")
    ap.add_argument("--trace", action="store_true", help="also trace Python allocations (tracemalloc)")
    ap.add_argument("--kernel", help=argparse.SUPPRESS)  # set in the child
    args = ap.parse_args()
    if args.kernel:
        serve(args)
        return
    for kernel in args.kernels.split(","):
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--kernel", kernel], check=True)


if __name__ == "__main__":
    main()
