"""Anonymous memory of a process that serves a store, stage by stage, and what Python holds.

    python benchmarks/serve_memory.py /tmp/asteria-bench/s10m/oneshot-10000000 \\
        --queries /tmp/asteria-bench/growth-10m/queries.f16.npy --probes 12 --rerank 70

Prints one JSON line: ``RssAnon`` of ``/proc/self/status`` (MiB) after importing
asteria_store, after opening the store read-only, after one query (the compiled kernels
load), after a batch of ``--batch`` queries and after ``--single`` more one by one; the
bytes tracemalloc traces at each stage (numpy arrays included, the numba runtime and
compiled code not); and the largest traced allocation sites at the end. Unlike the serve
phase of bench_growth.py, nothing else lives in the process: the ground truth, earlier
settings and the benchmark's warm-ups are not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc

import numpy as np


def anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--queries", required=True, help=".npy of queries (float16 or float32)")
    ap.add_argument("--probes", type=int, default=12)
    ap.add_argument("--rerank", type=int, default=None, help="search by sketch with this rerank (default: certified)")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--single", type=int, default=200)
    ap.add_argument("--top", type=int, default=5, help="allocation sites to list")
    a = ap.parse_args()

    stages = {}

    def mark(name: str) -> None:
        traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
        stages[name] = {"anon_mib": round(anon_mib(), 1), "traced_mib": round(traced / 2**20, 1)}

    import asteria_store

    mark("import")
    tracemalloc.start(4)
    store = asteria_store.open(a.store, readonly=True)
    mark("open")
    q = np.load(a.queries).astype(np.float32)
    store.query(q[0], 10, probes=a.probes, rerank=a.rerank)
    mark("first query")
    store.search(q[1 : 1 + a.batch], 10, probes=a.probes, rerank=a.rerank)
    mark(f"batch of {a.batch}")
    for row in q[1 + a.batch : 1 + a.batch + a.single]:
        store.query(row, 10, probes=a.probes, rerank=a.rerank)
    gc.collect()
    mark(f"{a.single} single")
    sites = [{"mib": round(st.size / 2**20, 1), "blocks": st.count, "at": str(st.traceback[0])}
             for st in tracemalloc.take_snapshot().statistics("lineno")[: a.top]]
    print(json.dumps({"store": a.store, "rows": len(store), "buckets": store.info()["buckets"],
                      "probes": a.probes, "rerank": a.rerank, "stages": stages, "top_sites": sites}))
    store.close()


if __name__ == "__main__":
    main()
