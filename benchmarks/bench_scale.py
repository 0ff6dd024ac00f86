"""Routing at scale: rows a query must touch for recall@10 0.95, flat model against tree.

    python benchmarks/bench_scale.py --data /tmp/asteria-bench/growth-3m --sizes 1000000,3000000 \\
        --threads 2 --out docs/results/scale_routing.jsonl

For each size N (the first N rows of ``--data``, made by benchmarks/growth_data.py, with
exact ground truth ``gt_{N}_ids.npy``), trains the routers a store of N rows would use,
on the sample a store would draw (``fit.sample_rows_for``):

* ``flat-2048``: the flat ECVH model capped at 2**11 buckets (what every store past
  ~260k rows used before the tree);
* ``plan``: what ``fit.plan_buckets`` chooses for N now (flat up to 2**11 buckets, then a
  tree of ~TREE_BUCKET_ROWS rows per bucket);
* ``tree-<bits>`` for each ``--tree-bits``: a tree of 2**bits buckets.

It assigns all N rows (timed: rows/s of ``router.keys``, one thread per ``--threads``),
then, for the queries, walks each router's probe order and reports the rows touched (whole
buckets, in probe order; the same fixed budget for every query) to reach recall@10 0.90
and 0.95 of the exact top 10 (``model.metrics.rows_to_reach``), with the bucket balance.
This is the routing's share of the cost: what a store with one segment reads per query at
that recall, before LRSQ pruning. One JSON line per (N, router).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--sizes", default="1000000")
    ap.add_argument("--tree-bits", default="", help="comma-separated bits of extra trees to measure")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    from asteria_store.model import fit
    from asteria_store.model.metrics import fraction_for_recall, occupancy, rows_to_reach
    from asteria_store.model.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    base_all = np.load(data / "base.f16.npy", mmap_mode="r")
    queries = np.load(data / "queries.f16.npy").astype(np.float32)
    rows = []
    with threadpool_limits(args.threads):
        for n in [int(s) for s in args.sizes.split(",")]:
            truth = np.load(data / f"gt_{n}_ids.npy")[:, :10]
            base = base_all[:n]
            variants = [("flat-2048", dict(bits=11, flat_max_bits=11)), ("plan", {})]
            variants += [(f"tree-{b}", dict(bits=int(b))) for b in args.tree_bits.split(",") if b]
            for name, kw in variants:
                plan = fit.plan_buckets(n, bits=kw.get("bits"), flat_max_bits=kw.get("flat_max_bits"))
                size = fit.sample_rows_for(n, bits=kw.get("bits"), flat_max_bits=kw.get("flat_max_bits"))
                rng = np.random.default_rng(0)
                idx = np.sort(rng.choice(n, min(n, size), replace=False))
                sample = np.asarray(base[idx], dtype=np.float32)
                t0 = time.perf_counter()
                router, _ = train(sample, TrainConfig(expected_size=n, threads=args.threads, **kw))
                train_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                keys = np.concatenate([router.keys(np.asarray(base[s : s + 65536], dtype=np.float32))
                                       for s in range(0, n, 65536)]).astype(np.int64)
                assign_s = time.perf_counter() - t0
                reach = rows_to_reach(router.probe_scores(queries), keys, truth, router.n_buckets)
                occ = occupancy(keys, router.n_buckets)
                row = {"n": n, "router": name, "kind": router.kind, "buckets": router.n_buckets,
                       "tree_planned": plan.tree, "sample_rows": len(sample), "train_s": round(train_s, 1),
                       "assign_rows_per_s": round(n / assign_s),
                       "rows_at_r090": int(round(fraction_for_recall(reach, n, 0.90) * n)),
                       "rows_at_r095": int(round(fraction_for_recall(reach, n, 0.95) * n)),
                       "max_over_mean": round(occ["max_over_mean"], 2), "threads": args.threads}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    print()
    print("| N | router | kind | buckets | rows at R 0.90 | rows at R 0.95 | max/mean | assign rows/s | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['router']} | {r['kind']} | {r['buckets']:,} | {r['rows_at_r090']:,} | "
              f"{r['rows_at_r095']:,} | {r['max_over_mean']} | {r['assign_rows_per_s']:,} | {r['train_s']} |")


if __name__ == "__main__":
    main()
