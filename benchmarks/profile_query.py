"""Where one pruned query's time goes, stage by stage (median over queries, one thread).

    python benchmarks/profile_query.py --store /tmp/asteria-bench/wordnet-store \\
        --queries ../shared/datasets/wordnet-minilm/queries_examples.f16.npy --probes 64

Runs the stages of ``asteria_store.query.engine``'s one-query path by hand on a built
learned store: the routing (for a router whose probe order is one product, the compiled
rotation and probe order of query/native.py; else numpy's probe order and rotation), the
view's bucket table (query/table.py), the query's LRSQ terms, and the compiled search
(bounds from the codes, threshold, exact rescoring of the survivors, top k). Also times
``Store.query`` end to end (the difference is the store layer: input checks,
normalisation, the read snapshot).
"""

from __future__ import annotations

from harness import pin_threads_from_argv

pin_threads_from_argv()  # one thread, before numpy is imported

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--nq", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    import asteria_store
    from asteria_store.query import native
    from asteria_store.query.engine import probe_order

    q = np.load(args.queries)[: args.nq].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    store = asteria_store.open(args.store, readonly=True)
    view, router = store._current_view(), store.router
    lrsq, k = router.lrsq, args.k
    routing = router.compiled_routing()
    stages = ["routing (compiled)" if routing is not None else "probe order and rotation (numpy)",
              "bucket table", "LRSQ query terms", "search (compiled)"]
    times, rows_n, kept = [], [], []
    for rep in range(2):  # the first pass warms the page cache, the bucket table and the kernel
        times.clear()
        for v in q:
            t = [time.perf_counter()]
            if routing is not None:
                keys, qy = native.route(routing, v, args.probes)
            else:
                keys = np.ascontiguousarray(probe_order(router, v[None, :], args.probes)[0])
                qy = router.rotate(v[None, :])[0]
            t.append(time.perf_counter())
            table = view.table(lrsq, router.n_buckets).ready(view, keys)
            t.append(time.perf_counter())
            terms = lrsq.query_terms(qy)
            t.append(time.perf_counter())
            _, _, st = native.search_one(table, keys, None, terms, v, k)
            t.append(time.perf_counter())
            times.append(np.diff(t) * 1000)
            rows_n.append(st[native.ROWS])
            kept.append(st[native.KEPT])
    med = np.median(np.array(times), axis=0)
    lat = []
    for v in q:
        t0 = time.perf_counter()
        store.query(v, k, probes=args.probes)
        lat.append(time.perf_counter() - t0)
    print(f"{args.probes} probes, {np.mean(rows_n):,.0f} rows scanned, {np.mean(kept):,.0f} survive the bounds\n")
    print("| stage | median ms |\n|---|---|")
    for name, ms in zip(stages, med):
        print(f"| {name} | {ms:.3f} |")
    print(f"| sum of stages | {med.sum():.3f} |")
    print(f"| Store.query end to end (p50) | {np.median(lat) * 1000:.3f} |")


if __name__ == "__main__":
    main()
