"""One store against a compacted copy of itself: what its segments cost a query.

    cp -r GROWN COMPACTED && python -c "import asteria_store; asteria_store.open('COMPACTED').compact()"
    OMP_NUM_THREADS=1 python benchmarks/bench_segments_ab.py GROWN COMPACTED --queries Q.npy

Same data, same model, same buckets: only the number of segments (extents per probed
bucket) differs. Per store and probe count: one-query p50 over 200 queries (after 30
warm-up queries) and the QPS of one batch of all the queries.
"""

from __future__ import annotations

import argparse

import numpy as np
from harness import time_search


def main() -> None:
    import asteria_store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--queries", default="/tmp/asteria-bench/growth-3m/queries.f16.npy")
    ap.add_argument("--probes", default="8,32")
    args = ap.parse_args()
    q = np.load(args.queries).astype(np.float32)
    for path in args.stores:
        with asteria_store.open(path, readonly=True) as s:
            segments = s.info()["segments"]
            for p in (int(x) for x in args.probes.split(",")):
                _, batch, lat = time_search(s, q, p)
                print(f"{path}: {segments} segments, probes {p}: one-query p50 {1000 * np.median(lat):.2f} ms, "
                      f"batch {len(q) / batch:.0f} QPS")


if __name__ == "__main__":
    main()
