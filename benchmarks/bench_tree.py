"""The routing tree against the flat model at the same bucket count, on wordnet-minilm.

    python benchmarks/bench_tree.py --bits 10 --threads 2

Trains the flat ECVH model of 2**bits buckets and a tree of about as many (coarse cells
per ``fit.plan_buckets``), then sweeps the tree's ``assign_cells`` (cells a vector is
compared against when assigned) and its refinement steps (Lloyd steps over the tree's own
assignment). For each: the fraction of the base scanned (whole buckets, probe order, one
fixed budget for all queries) for recall@10 0.95 of the exact top 10, on the first 2,000
held-out and example queries, and the bucket balance. Prints one line per variant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wordnet-minilm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--assign", default="1,2,4,8")
    ap.add_argument("--refine", default="0,1,3")
    args = ap.parse_args()

    import torch

    from asteria_store.model.metrics import fraction_for_recall, occupancy, rows_to_reach
    from asteria_store.model.train import TrainConfig, train
    from asteria_store.model.tree import TreeRouter

    torch.set_num_threads(args.threads)
    base = np.load(DATA / "base.f16.npy").astype(np.float32)
    sets = [(np.load(DATA / f"queries_{s}.f16.npy")[:2000].astype(np.float32),
             np.load(DATA / f"gt_{s}_ids.npy")[:2000, :10]) for s in ("heldout", "examples")]

    def measure(router, name: str) -> None:
        keys = router.keys(base).astype(np.int64)
        scans = [fraction_for_recall(rows_to_reach(router.probe_scores(q), keys, g, router.n_buckets), len(base), 0.95)
                 for q, g in sets]
        occ = occupancy(keys, router.n_buckets)
        print(f"{name:28s} buckets {router.n_buckets:5d}  scan for R 0.95: held-out {scans[0]:.2%}  "
              f"examples {scans[1]:.2%}  max/mean {occ['max_over_mean']:.1f}", flush=True)

    flat, _ = train(base, TrainConfig(bits=args.bits, threads=args.threads))
    measure(flat, "flat")
    tree, _ = train(base, TrainConfig(bits=args.bits, threads=args.threads, flat_max_bits=args.bits - 1,
                                      sample_size=len(base), tree_refine=0))
    for a in (int(v) for v in args.assign.split(",")):
        router = TreeRouter(tree.coarse, tree.children, tree.offsets, assign_cells=a)
        for steps in range(max(int(v) for v in args.refine.split(",")) + 1):
            if str(steps) in args.refine.split(","):
                measure(router, f"tree assign={a} refine={steps}")
            router = router.refined(base)


if __name__ == "__main__":
    main()
