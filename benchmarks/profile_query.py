"""Where one pruned query's time goes, stage by stage (median over queries, one thread).

    python benchmarks/profile_query.py --store /tmp/asteria-bench/wordnet-store \\
        --queries ../shared/datasets/wordnet-minilm/queries_examples.f16.npy --probes 64

Runs the stages of ``asteria_store.query.engine``'s one-query pruned path by hand on a built
learned store: probe order, extents and ids of the probed buckets, gathering their LRSQ
codes, rotating the query, the bound estimate, the threshold, reading the survivors' full
vectors, exact scores. Also times ``Store.query`` end to end (the difference is the store
layer: input checks, normalisation, catalog generation check).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


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
    from asteria_store.query.engine import _Rows, _visits, probe_order

    q = np.load(args.queries)[: args.nq].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    store = asteria_store.open(args.store, readonly=True)
    view, router = store._current_view(), store.router
    lrsq, k = router.lrsq, args.k
    stages = ["probe order", "extents+ids", "gather codes", "rotate", "estimate", "threshold",
              "survivor vectors", "exact scores"]
    times, rows_n, kept = [], [], []
    for rep in range(2):  # the first pass warms the page cache and the extent cache
        times.clear()
        for v in q:
            t = [time.perf_counter()]
            keys = probe_order(router, v[None, :], args.probes)
            keys = keys[_visits(view, keys, None)].tolist()
            t.append(time.perf_counter())
            rows = _Rows.gather(view, keys)
            t.append(time.perf_counter())
            codes, aux, _ = rows.codes()
            t.append(time.perf_counter())
            qy = router.rotate(v[None, :])
            t.append(time.perf_counter())
            _, lo, hi = lrsq.estimate(qy, codes, aux)
            t.append(time.perf_counter())
            m = len(rows.ids)
            keep = np.flatnonzero(hi[0] >= np.partition(lo[0], m - k)[m - k])
            t.append(time.perf_counter())
            vecs = rows.vectors(keep)
            t.append(time.perf_counter())
            _ = vecs @ v
            t.append(time.perf_counter())
            times.append(np.diff(t) * 1000)
            rows_n.append(m)
            kept.append(len(keep))
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
