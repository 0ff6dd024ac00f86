"""Anonymous memory of a process serving batches: RssAnon after open, after one query,
and after each batch of ``--nq`` queries at each probe count, per kernel.

    python benchmarks/bench_serving_memory.py --store /tmp/asteria-bench/stores3m/grown \\
        --queries /tmp/asteria-bench/growth-3m/queries.f16.npy --probes 16,32,64 --threads 1

Each kernel runs in its own process (a kernel's caches stay with its process). Prints one
JSON line per kernel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def anon_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def serve(args) -> None:
    import numpy as np

    import asteria_store

    q = np.load(args.queries)[: args.nq].astype(np.float32)
    store = asteria_store.open(args.store, readonly=True)
    row = {"kernel": args.kernel, "threads": args.threads, "nq": len(q), "after_open": anon_mib()}
    store.query(q[0], 10)
    row["after_one_query"] = anon_mib()
    for p in [int(x) for x in args.probes.split(",")]:
        for prune in (True, False):
            store.search(q, 10, probes=p, kernel=args.kernel, threads=args.threads, prune=prune)
            row[f"after_batch_p{p}_prune_{prune}"] = anon_mib()
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--probes", default="16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kernels", default="f32,bf16")
    ap.add_argument("--kernel", help=argparse.SUPPRESS)  # set in the child
    args = ap.parse_args()
    if args.kernel:
        serve(args)
        return
    for kernel in args.kernels.split(","):
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--kernel", kernel], check=True)


if __name__ == "__main__":
    main()
