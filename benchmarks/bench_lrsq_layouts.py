"""LRSQ layouts (rank, block) on a built store's rotation: bytes per row, interval width and
the rows that survive one query's bounds, over each query's probed buckets.

    python benchmarks/bench_lrsq_layouts.py --store /tmp/asteria-bench/wordnet-store \\
        --base ../shared/datasets/wordnet-minilm/base.f16.npy \\
        --queries ../shared/datasets/wordnet-minilm/queries_heldout.f16.npy --probes 32

Encodes every base row with each layout (the store's model rotation and routing), then for
each query takes the rows of its ``--probes`` probed buckets, their intervals, the
threshold the one-query path uses (the k-th best lower bound) and the rows whose upper
bound reaches it: what the search rescores from full vectors. Checks that every interval
holds the exact score. Prints one line per layout (docs/model.md has the wordnet table).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--nq", type=int, default=200)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--layouts", default="288/32,288/288,384/384,384/192,512/32",
                    help="rank/block pairs")
    a = ap.parse_args()

    import asteria_store
    from asteria_store.model.lrsq import LRSQ

    router = asteria_store.open(a.store, readonly=True).router
    x = np.load(a.base).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = np.load(a.queries)[: a.nq].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    y, qy = router.rotate(x), router.rotate(q)
    keys = router.keys(x).astype(np.int64)
    order = router.probe_order(q, a.probes)
    print(f"model rotation {router.rotate(x[:1]).shape[1]} wide; its LRSQ: {router.lrsq}")
    for spec in a.layouts.split(","):
        rank, block = (int(v) for v in spec.split("/"))
        lrsq = LRSQ(rank=rank, block=block)
        codes, aux = lrsq.encode(y)
        survivors, widths = [], []
        for i in range(len(q)):
            sel = np.flatnonzero(np.isin(keys, order[i]))
            _, lo, hi = lrsq.estimate(qy[i : i + 1], codes[sel], aux[sel])
            exact = x[sel] @ q[i]
            if not ((lo[0] <= exact + 1e-6).all() and (exact <= hi[0] + 1e-6).all()):
                raise SystemExit(f"{lrsq}: an interval misses its exact score")
            thr = np.partition(lo[0], len(sel) - a.k)[len(sel) - a.k] if len(sel) >= a.k else -np.inf
            survivors.append(int((hi[0] >= thr).sum()))
            widths.append(float(np.median(hi[0] - lo[0])))
        print(f"rank {rank}, block {block}: {lrsq.bytes_per_vector} B/row, median width "
              f"{np.median(widths):.4f}, survivors median {np.median(survivors):.1f} "
              f"(mean {np.mean(survivors):.1f})")


if __name__ == "__main__":
    main()
