"""Stopping rules for the probe sequence, measured on a built store: fixed probe counts
against (a) a certified cap bound and (b) an adaptive probe-score gap rule.

    python benchmarks/bench_probe_rules.py --store /tmp/asteria-bench/wordnet-store \\
        --data ../shared/datasets/wordnet-minilm

(a) Certified stop: a bucket whose rows all lie within angle r_b of its probe direction c_b
holds no row scoring above cos(max(0, angle(q, c_b) - r_b)); once that bound is below the
query's k-th best score, the bucket cannot matter. Reported: the share of buckets the bound
rules out even at the TRUE k-th score (the best case for the rule).
(b) Gap rule: visit every bucket whose probe score is within ``delta`` of the query's best
(at least 8). Recall@10 (routing recall: share of the true top 10 whose bucket is visited)
and share of the base scanned, next to fixed probe counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import asteria_store


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--data", required=True, help="wordnet-minilm directory")
    ap.add_argument("--nq", type=int, default=2000)
    args = ap.parse_args()
    data = Path(args.data)
    router = asteria_store.open(args.store, readonly=True).router
    base = unit(np.load(data / "base.f16.npy"))
    keys = router.keys(base).astype(np.int64)
    nb = 2 ** router.bits
    sizes = np.bincount(keys, minlength=nb)
    cents = router.probe_centroids
    min_cos = np.ones(nb)
    np.minimum.at(min_cos, keys, np.einsum("nd,nd->n", base, cents[keys]))
    radius = np.arccos(np.clip(min_cos, -1, 1))
    print(f"bucket angular radius: median {np.degrees(np.median(radius)):.1f} deg, "
          f"min {np.degrees(radius.min()):.1f} deg")
    for name in ("examples", "heldout"):
        q = unit(np.load(data / f"queries_{name}.f16.npy")[: args.nq])
        gt = np.load(data / f"gt_{name}_ids.npy")[: args.nq, :10]
        kth = np.load(data / f"gt_{name}_scores.npy")[: args.nq, 9]
        cap = np.cos(np.maximum(0, np.arccos(np.clip(q @ cents.T, -1, 1)) - radius[None, :]))
        print(f"\n{name}: certified cap bound rules out {(cap < kth[:, None]).mean() * 100:.3f}% of "
              "buckets at the true 10th score")
        s = router.probe_scores(q)
        order = np.argsort(-s, axis=1, kind="stable")
        ss = np.take_along_axis(s, order, axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(nb), order.shape), axis=1)
        gt_rank = np.take_along_axis(rank, keys[gt], axis=1)  # probe position of each true neighbour
        scanned = np.cumsum(sizes[order], axis=1) / len(base) * 100
        print("| rule | mean probes | routing recall@10 | % of base scanned |\n|---|---|---|---|")
        for p in (16, 24, 32, 48, 64, 96):
            print(f"| fixed {p} | {p} | {(gt_rank < p).mean():.3f} | {scanned[:, p - 1].mean():.2f} |")
        best = ss[:, 1]  # the home bucket (first) scores +inf
        for delta in (0.16, 0.18, 0.20, 0.22, 0.24):
            n = np.maximum(8, (ss >= best[:, None] - delta).sum(axis=1))
            print(f"| gap {delta:.2f} | {n.mean():.0f} | {(gt_rank < n[:, None]).mean():.3f} | "
                  f"{scanned[np.arange(len(q)), n - 1].mean():.2f} |")


if __name__ == "__main__":
    main()
