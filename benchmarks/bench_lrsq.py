"""LRSQ on real vectors: estimate error, certified interval width, bound violations, and
how many candidates the bound could prune, by rank.

    python benchmarks/bench_lrsq.py --model-dir /tmp/asteria-bench/encode-model

Uses the rotation of a trained model (trains the default one on the wordnet-minilm base
first if --model-dir holds none), encodes --base base vectors at each rank, and scores
--queries example-sentence queries against them: mean |estimate - exact|, mean interval
width, intervals missing the exact inner product (must be 0), and the share of candidates
whose upper bound lies below the query's true 10th best score (prunable without reading
their full vector).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/wordnet-minilm")
    ap.add_argument("--model-dir", default="/tmp/asteria-bench/encode-model")
    ap.add_argument("--base", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ranks", default="64,128,256")
    args = ap.parse_args()

    from asteria_store.model.lrsq import LRSQ
    from asteria_store.model.persist import load_router, save_router

    d = Path(args.data)
    if not (Path(args.model_dir) / "router.json").exists():
        from asteria_store.model.train import TrainConfig, train

        router, _ = train(np.load(d / "base.f16.npy").astype(np.float32), TrainConfig(device="cpu"))
        save_router(router, args.model_dir)
    router = load_router(args.model_dir)
    base = np.load(d / "base.f16.npy")[: args.base].astype(np.float32)
    q = np.load(d / "queries_examples.f16.npy")[: args.queries].astype(np.float32)
    yb, yq = router.rotate(base), router.rotate(q)
    exact = q.astype(np.float64) @ base.T.astype(np.float64)
    tenth = np.sort(exact, axis=1)[:, -10][:, None]
    print("| rank | bytes/vector | mean abs error | mean interval width | violations | prunable vs true 10th |")
    print("|---|---|---|---|---|---|")
    for rank in [int(r) for r in args.ranks.split(",")]:
        lrsq = LRSQ(rank=rank, block=32)
        codes, aux = lrsq.encode(yb)
        est, lo, hi = lrsq.estimate(yq, codes, aux)
        row = {"rank": rank, "bytes_per_vector": lrsq.bytes_per_vector,
               "mae": float(np.abs(est - exact).mean()), "width": float((hi - lo).mean()),
               "violations": int(((exact < lo) | (exact > hi)).sum()),
               "prunable": float((hi < tenth).mean())}
        print(f"| {rank} | {row['bytes_per_vector']} | {row['mae']:.4f} | {row['width']:.3f} | "
              f"{row['violations']} | {row['prunable']:.1%} |")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
